"""The soft-label bank on disk: fixed-size records in one memory-mappable file per epoch, and a manifest.

Layout of a bank folder ``BANK``::

    BANK/manifest.json          what the bank is (teachers + weight hashes, dataset index digest, seed,
                                image size, crop-plan version, K, record layout); written once, atomically;
                                each build adds its summary (captured mass, KL) to it
    BANK/dataset.npz            the dataset's per-file identity (relative path, label, file size, image
                                size: :func:`fastmeal.data.index.identity_table`), so that a refusal names
                                the files that differ; nothing a copy changes (mtimes, the data's path)
    BANK/epoch_0000.bin         the records of epoch 0, ...
    BANK/chunks/e0000-w2-r1-c0003.json
                                one small file per finished chunk: where it lies and its CRC-32 (the
                                per-chunk checksums); a chunk exists for readers only once this is written

A record (4 + 4K bytes; 24 at K=5) is ``index`` (int32: the dataset image it belongs to), ``probs``
(K × fp16: the ensemble's top-K probabilities, largest first) and ``classes`` (K × int16). An epoch
file holds the records in the order the builder's ranks read that epoch: ``world_size`` regions, one
per build rank, each a whole number of 4 KiB pages
(:data:`ALIGN_RECORDS` records) so that no two ranks, or nodes, ever write the same page. Because every
record names its image, a reader does not need the builder's order: it inverts the ``index`` column
once per epoch (:class:`BankReader`), and trains with any world size or batch size.

Writes are chunked and atomic: a chunk's records are written at their offset and fsync'ed, then its
small JSON is written atomically (temporary file, fsync, rename). A killed build leaves at most chunks
without their JSON; they are recomputed (to the same bytes) by the next build. Readers check every
chunk's CRC-32 when they first use an epoch, and refuse a truncated file or a chunk whose bytes differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmeal.checkpoint import atomic_write_bytes
from fastmeal.data.common import DataError

FORMAT = "fastmeal-soft-label-bank"
VERSION = 1
#: Records per alignment unit: 512 records of 24 bytes are 3 pages of 4 KiB (lcm(24, 4096) = 12288).
ALIGN_RECORDS = 512
MANIFEST = "manifest.json"
DATASET_TABLE = "dataset.npz"
CHUNK_DIR = "chunks"
_CHUNK_NAME = re.compile(r"^e(\d+)-w(\d+)-r(\d+)-c(\d+)\.json$")
#: Fields of the manifest that must match between the bank and a run (or between two builds into one folder).
IDENTITY_FIELDS = ("dataset_digest", "dataset_size", "num_classes", "seed", "image_size", "plan_version", "top_k",
                   "record_dtype", "teachers")


class BankError(DataError):
    """A bank that cannot be used as asked (missing, damaged, or built for another run); says which field or file."""


def record_dtype(top_k: int) -> np.dtype:
    """The numpy structured dtype of one record (little-endian, packed)."""
    return np.dtype([("index", "<i4"), ("probs", "<f2", (top_k,)), ("classes", "<i2", (top_k,))])


def dtype_description(top_k: int) -> list[list[Any]]:
    """The record layout as plain JSON (``numpy.dtype.descr``), stored in the manifest."""
    return [list(field) if len(field) == 2 else [field[0], field[1], list(field[2])]
            for field in record_dtype(top_k).descr]


def epoch_file(root: Path, epoch: int) -> Path:
    return root / f"epoch_{epoch:04d}.bin"


def chunk_file(root: Path, epoch: int, world_size: int, rank: int, chunk: int) -> Path:
    return root / CHUNK_DIR / f"e{epoch:04d}-w{world_size}-r{rank}-c{chunk:04d}.json"


@dataclass(frozen=True)
class EpochLayout:
    """How one epoch's file is cut: ``world_size`` regions of ``region_records`` records, one per build rank.

    Rank ``r`` reads ``records_per_rank`` images in that epoch (the loader's ``epoch_indices``) and writes
    them from record ``r · region_records`` on, ``chunk_records`` per chunk.
    """

    world_size: int
    records_per_rank: int
    chunk_records: int

    @property
    def region_records(self) -> int:
        return math.ceil(self.records_per_rank / ALIGN_RECORDS) * ALIGN_RECORDS

    @property
    def total_records(self) -> int:
        return self.world_size * self.region_records

    @property
    def chunks_per_rank(self) -> int:
        return math.ceil(self.records_per_rank / self.chunk_records)

    def chunk_span(self, rank: int, chunk: int) -> tuple[int, int]:
        """``(first record in the file, number of records)`` of chunk ``chunk`` of rank ``rank``."""
        start = chunk * self.chunk_records
        count = min(self.chunk_records, self.records_per_rank - start)
        return rank * self.region_records + start, count


def hash_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a model's parameters and buffers (names, dtypes, shapes, bytes, in sorted-key order)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous().reshape(-1)  # 0-d buffers (BN's counter) too
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (a teacher's weights file), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_dataset_table(root: str | os.PathLike, table: Mapping[str, np.ndarray]) -> None:
    """Store the dataset's per-file identity in the bank (once; atomically)."""
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **table)
    atomic_write_bytes(Path(root) / DATASET_TABLE, buffer.getvalue())


def check_dataset(root: str | os.PathLike, manifest: Mapping[str, Any], index: Any, where: str) -> None:
    """Refuse a dataset other than the bank's, naming the first files that differ and what differs.

    ``index`` (a :class:`~fastmeal.data.index.DatasetIndex`) matches when its copy-proof digest equals the
    bank's, or its mtime-including ``cache_digest`` does (a bank built before the identity left mtimes out,
    over the very same files).

    Raises:
        BankError: the bank's dataset and ``where`` (the data's path) differ.
    """
    from fastmeal.data.index import describe_differences, identity_table

    have = manifest.get("dataset_digest")
    if have in (index.digest, index.cache_digest):
        return
    root = Path(root)
    size = f"the bank has {manifest.get('dataset_size')} images, {where} has {len(index)}"
    try:
        with np.load(root / DATASET_TABLE, allow_pickle=False) as f:
            stored = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise BankError(f"the bank {root} was built from another dataset than {where} ({size}); it has no "
                        f"{DATASET_TABLE} (built by an older fastmeal, whose dataset identity included file "
                        "modification times, so a copy made without them cannot be matched): use the data it was "
                        "built from, or rebuild the bank") from None
    except (OSError, ValueError, KeyError) as err:
        raise BankError(f"{root / DATASET_TABLE} cannot be read ({err}); the bank is damaged: rebuild it") from err
    differences = describe_differences(stored, identity_table(index))
    raise BankError(f"the bank {root} was built from another dataset than {where} ({size}); first differences: "
                    + "; ".join(differences or ["none per file (the files are listed in another order?)"])
                    + ". Use the data the bank was built from, or build a bank for this data")


def make_manifest(*, teachers: Iterable[Mapping[str, str]], dataset_digest: str, dataset_size: int,
                  num_classes: int, seed: int, image_size: int, plan_version: int, top_k: int,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's identity: what the records are the soft labels of."""
    if not 1 <= top_k <= num_classes:
        raise BankError(f"top-K={top_k} must be in [1, {num_classes}] (the number of classes)")
    if num_classes > np.iinfo(np.int16).max + 1:
        raise BankError(f"{num_classes} classes do not fit the bank's int16 class indices (at most 32768)")
    return {"format": FORMAT, "version": VERSION, "teachers": [dict(t) for t in teachers],
            "dataset_digest": dataset_digest, "dataset_size": int(dataset_size), "num_classes": int(num_classes),
            "seed": int(seed), "image_size": int(image_size), "plan_version": int(plan_version), "top_k": int(top_k),
            "record_dtype": dtype_description(top_k), "record_bytes": record_dtype(top_k).itemsize,
            "layout": {"file": "epoch_{epoch:04d}.bin", "order": "build rank regions of whole pages; each record "
                       "names its dataset index; only the chunks' spans hold records", "align_records": ALIGN_RECORDS,
                       "chunks": f"{CHUNK_DIR}/e{{epoch}}-w{{world}}-r{{rank}}-c{{chunk}}.json (offset, count, crc32)"},
            **(dict(extra) if extra else {})}


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise BankError(f"{what} {path} is missing") from err
    except (OSError, ValueError) as err:
        raise BankError(f"{what} {path} cannot be read ({err}); the bank is damaged: rebuild it") from err


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    root = Path(root)
    if not root.is_dir():
        raise BankError(f"bank.path={str(root)!r} is not a folder; build one with `fastmeal bank build --out {root}`")
    manifest = _read_json(root / MANIFEST, "the bank manifest")
    if manifest.get("format") != FORMAT:
        raise BankError(f"{root / MANIFEST} is not a fastmeal soft-label bank manifest (format "
                        f"{manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise BankError(f"{root / MANIFEST}: bank format version {manifest.get('version')} is not {VERSION}; "
                        "rebuild the bank with this fastmeal")
    return manifest


def mismatches(have: Mapping[str, Any], want: Mapping[str, Any],
               fields: Iterable[str] = IDENTITY_FIELDS) -> list[str]:
    """``"field: bank has X, the run has Y"`` for every identity field that differs."""
    out = []
    for name in fields:
        if name in want and _identity(name, have.get(name)) != _identity(name, want[name]):
            out.append(f"{name}: the bank has {_identity(name, have.get(name))!r}, this run has "
                       f"{_identity(name, want[name])!r}")
    return out


def _identity(name: str, value: Any) -> Any:
    """What of a manifest field identifies the bank: a teacher is its tag and its weights as loaded (sha256);
    where its file lies, or whether the file's own hash was recorded (older banks), is not part of it."""
    if name == "teachers" and isinstance(value, list):
        return [(t.get("tag"), t.get("sha256")) for t in value]
    return value


def open_or_create(root: str | os.PathLike, manifest: Mapping[str, Any], index: Any = None) -> dict[str, Any]:
    """The manifest of the bank at ``root``, created from ``manifest`` if there is none yet.

    Args:
        index: the dataset's :class:`~fastmeal.data.index.DatasetIndex`: a new bank stores its per-file
            identity; an existing one is checked against it (:func:`check_dataset`).

    Raises:
        BankError: a bank already there was built for something else (names each field, or the files).
    """
    root = Path(root)
    path = root / MANIFEST
    if path.exists():
        have = read_manifest(root)
        if index is not None:
            check_dataset(root, have, index, f"the data {Path(index.root).parent}")
            manifest = {**manifest, "dataset_digest": have["dataset_digest"]}
        bad = mismatches(have, manifest)
        if bad:
            raise BankError(f"{root} already holds a bank of another run, which this build would mix with: "
                            + "; ".join(bad) + ". Use another --out folder, or delete that one")
        return have
    root.mkdir(parents=True, exist_ok=True)
    (root / CHUNK_DIR).mkdir(exist_ok=True)
    if index is not None:
        from fastmeal.data.index import identity_table

        write_dataset_table(root, identity_table(index))  # before the manifest: a bank with one always has both
    _write_json(path, manifest)
    return dict(manifest)


def update_manifest(root: str | os.PathLike, **fields: Any) -> None:
    """Add non-identity fields (build summaries) to the manifest, atomically."""
    root = Path(root)
    manifest = read_manifest(root)
    for key in fields:
        if key in IDENTITY_FIELDS:
            raise ValueError(f"{key} is an identity field of the bank; it is never changed")
    manifest.update(fields)
    _write_json(root / MANIFEST, manifest)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class EpochWriter:
    """Writes one build rank's chunks of one epoch file (the file is shared by the ranks, the pages are not)."""

    def __init__(self, root: str | os.PathLike, manifest: Mapping[str, Any], epoch: int, layout: EpochLayout,
                 rank: int) -> None:
        self.root = Path(root)
        self.epoch, self.layout, self.rank = epoch, layout, rank
        self.dtype = record_dtype(int(manifest["top_k"]))
        self.path = epoch_file(self.root, epoch)
        size = layout.total_records * self.dtype.itemsize
        # Every rank creates/extends the file to its full size; the regions it does not own stay holes.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def chunk_done(self, chunk: int) -> bool:
        return chunk_file(self.root, self.epoch, self.layout.world_size, self.rank, chunk).exists()

    def write_chunk(self, chunk: int, records: np.ndarray, stats: Mapping[str, float]) -> None:
        """Write a chunk's records at its offset (fsync), then its JSON (atomically): the chunk is then done."""
        offset, count = self.layout.chunk_span(self.rank, chunk)
        if records.dtype != self.dtype or len(records) != count:
            raise ValueError(f"chunk {chunk} needs {count} records of {self.dtype}, got {len(records)} of "
                             f"{records.dtype}")
        data = records.tobytes()
        fd = os.open(self.path, os.O_RDWR)
        try:
            written = os.pwrite(fd, data, offset * self.dtype.itemsize)
            if written != len(data):
                raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
        path = chunk_file(self.root, self.epoch, self.layout.world_size, self.rank, chunk)
        # Only this rank of a build of this world size writes this chunk: a temporary of its JSON is a killed build's.
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        _write_json(path,
                    {"epoch": self.epoch, "world_size": self.layout.world_size, "rank": self.rank, "chunk": chunk,
                     "records_per_rank": self.layout.records_per_rank, "chunk_records": self.layout.chunk_records,
                     "offset": offset, "count": count, "crc32": zlib.crc32(data), **dict(stats)})


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def scan_chunks(root: str | os.PathLike) -> dict[int, list[dict[str, Any]]]:
    """Every finished chunk's JSON, by epoch."""
    out: dict[int, list[dict[str, Any]]] = {}
    directory = Path(root) / CHUNK_DIR
    if not directory.is_dir():
        return out
    for path in sorted(directory.iterdir()):
        match = _CHUNK_NAME.match(path.name)
        if match is None:
            continue  # temporaries of an interrupted write
        doc = _read_json(path, "the chunk record")
        doc["_file"] = path.name
        out.setdefault(int(match.group(1)), []).append(doc)
    return out


def epoch_status(chunks: list[dict[str, Any]]) -> tuple[EpochLayout | None, str]:
    """The layout of an epoch whose chunks are all finished, or None and what is missing."""
    worlds = {c["world_size"] for c in chunks}
    if len(worlds) != 1:
        return None, f"chunks from builds with different world sizes {sorted(worlds)}"
    sizes = {(c["records_per_rank"], c["chunk_records"]) for c in chunks}
    if len(sizes) != 1:
        return None, f"chunks from builds with different chunk sizes {sorted({c['chunk_records'] for c in chunks})}"
    first = chunks[0]
    layout = EpochLayout(world_size=first["world_size"], records_per_rank=first["records_per_rank"],
                         chunk_records=first["chunk_records"])
    have = {(c["rank"], c["chunk"]) for c in chunks}
    want = {(r, k) for r in range(layout.world_size) for k in range(layout.chunks_per_rank)}
    if have != want:
        return None, f"{len(want - have)} of {len(want)} chunks not finished"
    return layout, "complete"


def complete_epochs(root: str | os.PathLike) -> dict[int, EpochLayout]:
    """The epochs whose every chunk is finished, with their layouts."""
    out = {}
    for epoch, chunks in scan_chunks(root).items():
        layout, _ = epoch_status(chunks)
        if layout is not None:
            out[epoch] = layout
    return out


class BankReader:
    """The records of a bank, by (epoch, dataset index); each epoch is checked when first used.

    Args:
        root: the bank folder.
        expect: identity fields the run needs (:data:`IDENTITY_FIELDS`); any mismatch is refused.
        epochs: the epochs the run will read; a missing or unfinished one is refused up front, as is
            a truncated epoch file.

    Raises:
        BankError: naming the field or the file.
    """

    def __init__(self, root: str | os.PathLike, *, expect: Mapping[str, Any] | None = None,
                 epochs: Iterable[int] = ()) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        bad = mismatches(self.manifest, expect or {})
        if bad:
            raise BankError(f"the bank {self.root} does not fit this run: " + "; ".join(bad))
        self.top_k = int(self.manifest["top_k"])
        self.num_classes = int(self.manifest["num_classes"])
        self.dataset_size = int(self.manifest["dataset_size"])
        self.dtype = record_dtype(self.top_k)
        if dtype_description(self.top_k) != self.manifest["record_dtype"]:
            raise BankError(f"{self.root / MANIFEST}: record_dtype {self.manifest['record_dtype']} is not this "
                            f"fastmeal's layout {dtype_description(self.top_k)}")
        self._chunks = scan_chunks(self.root)
        self.layouts: dict[int, EpochLayout] = {}
        missing = []
        for epoch in sorted(set(epochs)):
            chunks = self._chunks.get(epoch)
            layout, why = epoch_status(chunks) if chunks else (None, "not built")
            if layout is None:
                missing.append(f"{epoch} ({why})")
                continue
            self._check_size(epoch, layout)
            self.layouts[epoch] = layout
        if missing:
            built = sorted(e for e, c in self._chunks.items() if epoch_status(c)[0] is not None)
            raise BankError(f"the bank {self.root} lacks epoch(s) {', '.join(missing)} that this run needs "
                            f"(it holds {format_ranges(built) or 'none'}); build them with `fastmeal bank build --out "
                            f"{self.root} --epochs A:B`, or train fewer epochs (schedule.epochs)")
        self._epoch: int | None = None
        self._records: np.ndarray | None = None
        self._position: np.ndarray | None = None

    def _check_size(self, epoch: int, layout: EpochLayout) -> None:
        path = epoch_file(self.root, epoch)
        want = layout.total_records * self.dtype.itemsize
        try:
            size = path.stat().st_size
        except FileNotFoundError as err:
            raise BankError(f"bank file {path} is missing") from err
        if size < want:
            raise BankError(f"bank file {path} is truncated: {size} bytes, its chunks need {want}; rebuild epoch "
                            f"{epoch} (delete {path} and its chunks/e{epoch:04d}-* files, then `fastmeal bank "
                            "build` again)")

    def load_epoch(self, epoch: int) -> None:
        """Map epoch ``epoch``'s file, verify every chunk's CRC-32 and index every image's record."""
        if epoch == self._epoch:
            return
        if epoch not in self.layouts:  # an epoch not announced up front
            layout, why = epoch_status(self._chunks.get(epoch, [])) if self._chunks.get(epoch) else (None, "not built")
            if layout is None:
                raise BankError(f"the bank {self.root} has no complete epoch {epoch} ({why})")
            self._check_size(epoch, layout)
            self.layouts[epoch] = layout
        path = epoch_file(self.root, epoch)
        records = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.layouts[epoch].total_records,))
        raw = records.view(np.uint8)
        for chunk in self._chunks[epoch]:
            start, count = chunk["offset"] * self.dtype.itemsize, chunk["count"] * self.dtype.itemsize
            if zlib.crc32(raw[start:start + count]) != chunk["crc32"]:
                raise BankError(f"bank file {path}: the records of chunk {chunk['_file']} fail their CRC-32 check "
                                "(the file was changed or damaged after the build); rebuild that epoch")
        index = np.asarray(records["index"])
        # Only the chunks' spans hold records (the rest of a rank's region is padding to whole pages).
        valid = np.concatenate([np.arange(c["offset"], c["offset"] + c["count"]) for c in self._chunks[epoch]])
        if len(valid) and int(index[valid].min()) < 0:
            raise BankError(f"bank file {path} holds a negative dataset index; rebuild epoch {epoch}")
        if len(valid) and int(index[valid].max()) >= self.dataset_size:
            raise BankError(f"bank file {path} names dataset index {int(index[valid].max())} but the dataset has "
                            f"{self.dataset_size} images")
        position = np.full(self.dataset_size, -1, dtype=np.int64)
        position[index[valid]] = valid
        absent = np.flatnonzero(position < 0)
        if len(absent):
            raise BankError(f"bank file {path} has no record for {len(absent)} image(s) of the dataset (e.g. index "
                            f"{int(absent[0])}); rebuild epoch {epoch}")
        self._epoch, self._records, self._position = epoch, records, position

    def records(self, epoch: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(probs [n, K] fp16, classes [n, K] int16)`` of dataset images ``indices`` in epoch ``epoch``."""
        self.load_epoch(epoch)
        rows = self._records[self._position[np.asarray(indices, dtype=np.int64)]]
        return np.ascontiguousarray(rows["probs"]), np.ascontiguousarray(rows["classes"])

    @property
    def epochs(self) -> list[int]:
        """The epochs that are complete in the bank (all chunks finished)."""
        return sorted(e for e, c in self._chunks.items() if epoch_status(c)[0] is not None)


def format_ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2, 5"``."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
