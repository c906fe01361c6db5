"""The soft-label bank's on-disk format: records, chunks, manifest, and every refusal of the reader."""

import json
import os
import zlib

import numpy as np
import pytest

from fastmeal.bank import store

TEACHERS = [{"tag": "a", "weights": "", "sha256": "0" * 64}]


def _manifest(**over):
    fields = {"teachers": TEACHERS, "dataset_digest": "d1", "dataset_size": 1000, "num_classes": 10, "seed": 3,
              "image_size": 32, "plan_version": 1, "top_k": 5}
    fields.update(over)
    return store.make_manifest(**fields)


def _write_epoch(root, manifest, epoch, *, world_size=3, chunk_records=128, seed=0, order=None):
    """Each rank writes its slice of ``order`` (default: a random permutation of the dataset), padded to a
    multiple of the world size like DistributedSampler, as a build would; returns the truth by image."""
    n = manifest["dataset_size"]
    rng = np.random.default_rng(seed + epoch)
    order = rng.permutation(n) if order is None else np.asarray(order)
    per_rank = -(-len(order) // world_size)
    order = np.concatenate([order, order[:per_rank * world_size - len(order)]])  # padded like DistributedSampler
    table = {"probs": rng.random((n, 5)).astype(np.float16), "classes": rng.integers(0, 10, (n, 5)).astype(np.int16)}
    truth = {i: (table["probs"][i], table["classes"][i]) for i in range(n)}
    layout = store.EpochLayout(world_size=world_size, records_per_rank=per_rank, chunk_records=chunk_records)
    for rank in range(world_size):
        mine = order[rank::world_size]
        writer = store.EpochWriter(root, manifest, epoch, layout, rank)
        for chunk in range(layout.chunks_per_rank):
            _, count = layout.chunk_span(rank, chunk)
            idx = mine[chunk * chunk_records:chunk * chunk_records + count]
            rows = np.zeros(count, dtype=writer.dtype)
            rows["index"] = idx
            rows["probs"], rows["classes"] = table["probs"][idx % n], table["classes"][idx % n]
            writer.write_chunk(chunk, rows, {"mass_sum": 0.9 * count, "kl_sum": 0.01 * count, "samples": count})
    return truth


@pytest.fixture
def bank(tmp_path):
    root = tmp_path / "bank"
    manifest = store.open_or_create(root, _manifest())
    truths = {e: _write_epoch(root, manifest, e) for e in range(2)}
    return root, truths


def test_record_is_24_bytes_at_k5():
    assert store.record_dtype(5).itemsize == 24
    assert _manifest()["record_bytes"] == 24


def test_reader_returns_each_images_record_whatever_the_build_order(bank):
    root, truths = bank
    reader = store.BankReader(root, expect={"seed": 3, "dataset_digest": "d1"}, epochs=range(2))
    assert reader.epochs == [0, 1]
    assert (reader.top_k, reader.num_classes, reader.dataset_size) == (5, 10, 1000)  # the manifest's
    # 1000 images over 3 build ranks: 1002 records, two images twice (the sampler's padding).
    assert sum(c["count"] for c in store.scan_chunks(root)[0]) == 1002
    for epoch, truth in truths.items():
        query = np.array([999, 0, 17, 500, 17])
        probs, classes = reader.records(epoch, query)
        assert probs.dtype == np.float16 and classes.dtype == np.int16 and probs.shape == (5, 5)
        for row, i in enumerate(query):
            np.testing.assert_array_equal(probs[row], truth[i][0])
            np.testing.assert_array_equal(classes[row], truth[i][1])


def test_rank_regions_are_whole_pages(tmp_path):
    layout = store.EpochLayout(world_size=3, records_per_rank=1000, chunk_records=300)
    assert layout.region_records * 24 % 4096 == 0
    assert [layout.chunk_span(1, c) for c in range(layout.chunks_per_rank)] == [
        (1024, 300), (1324, 300), (1624, 300), (1924, 100)]


@pytest.mark.parametrize("field,value", [("seed", 4), ("dataset_digest", "other"), ("image_size", 64),
                                         ("plan_version", 2), ("num_classes", 100)])
def test_refuses_a_bank_of_another_run_naming_the_field(bank, field, value):
    root, _ = bank
    with pytest.raises(store.BankError, match=f"{field}: the bank has"):
        store.BankReader(root, expect={field: value})


def test_refuses_missing_epochs(bank):
    root, _ = bank
    with pytest.raises(store.BankError, match=r"lacks epoch\(s\) 2 \(not built\), 3 \(not built\).*holds 0-1"):
        store.BankReader(root, epochs=range(4))


def test_refuses_an_unfinished_epoch(bank):
    root, _ = bank
    next(iter(sorted((root / "chunks").glob("e0001-*")))).unlink()
    with pytest.raises(store.BankError, match=r"1 \(1 of 9 chunks not finished\) that this run needs \(it holds 0\)"):
        store.BankReader(root, epochs=range(2))
    assert store.BankReader(root).epochs == [0]  # what the bank holds: the complete epochs only
    # 1000 images over 3 ranks: 334 records per rank, chunks of 128
    assert store.complete_epochs(root) == {0: store.EpochLayout(world_size=3, records_per_rank=334, chunk_records=128)}


def test_refuses_a_truncated_file(bank):
    root, _ = bank
    path = store.epoch_file(root, 1)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(store.BankError, match=r"epoch_0001.bin is truncated"):
        store.BankReader(root, epochs=range(2))


def test_refuses_damaged_records_naming_the_chunk(bank):
    root, _ = bank
    path = store.epoch_file(root, 0)
    data = bytearray(path.read_bytes())
    data[24 * 5 + 7] ^= 0xFF  # one byte of rank 0's first chunk
    path.write_bytes(bytes(data))
    reader = store.BankReader(root, epochs=range(2))  # sizes are fine: checksums are checked on first use
    reader.records(1, np.arange(3))
    with pytest.raises(store.BankError, match=r"e0000-w3-r0-c0000.json fail their CRC-32"):
        reader.records(0, np.arange(3))


@pytest.mark.parametrize("change,message", [
    # image 1 twice, image 0 never: a record for every position, none for image 0
    (lambda order: np.where(order == 0, 1, order), r"has no record for 1 image\(s\) of the dataset \(e\.g\. index 0\)"),
    (lambda order: np.where(order == 7, -1, order), "holds a negative dataset index"),
    (lambda order: np.where(order == 7, 1000, order), "names dataset index 1000 but the dataset has 1000 images"),
])
def test_refuses_an_epoch_that_does_not_hold_each_image_once(tmp_path, change, message):
    root = tmp_path / "bank"
    manifest = store.open_or_create(root, _manifest())
    _write_epoch(root, manifest, 0, order=change(np.random.default_rng(5).permutation(1000)))
    reader = store.BankReader(root, epochs=[0])  # complete and of the right size: checked when first read
    with pytest.raises(store.BankError, match=message):
        reader.records(0, np.array([0, 1]))


def test_refuses_a_damaged_manifest_and_a_missing_folder(bank, tmp_path):
    root, _ = bank
    with pytest.raises(store.BankError, match="is not a folder"):
        store.BankReader(tmp_path / "nope")
    (root / "manifest.json").write_text("{ not json")
    with pytest.raises(store.BankError, match="the bank manifest .*manifest.json cannot be read"):
        store.BankReader(root)
    (root / "manifest.json").unlink()
    with pytest.raises(store.BankError, match="the bank manifest .*manifest.json is missing"):
        store.BankReader(root)


def test_a_second_build_into_the_folder_must_match(bank):
    root, _ = bank
    assert store.open_or_create(root, _manifest())["seed"] == 3
    with pytest.raises(store.BankError, match="already holds a bank of another run.*top_k: the bank has 5"):
        store.open_or_create(root, _manifest(top_k=3))


def test_chunk_json_is_written_last_and_atomically(tmp_path):
    root = tmp_path / "b"
    manifest = store.open_or_create(root, _manifest(dataset_size=10))
    layout = store.EpochLayout(world_size=1, records_per_rank=10, chunk_records=10)
    writer = store.EpochWriter(root, manifest, 0, layout, 0)
    assert not writer.chunk_done(0)
    with pytest.raises(ValueError, match="needs 10 records"):
        writer.write_chunk(0, np.zeros(9, dtype=writer.dtype), {})
    assert not writer.chunk_done(0) and not list((root / "chunks").iterdir())
    rows = np.zeros(10, dtype=writer.dtype)
    rows["index"] = np.arange(10)
    writer.write_chunk(0, rows, {"samples": 10})
    doc = json.loads(store.chunk_file(root, 0, 1, 0, 0).read_text())
    assert doc["count"] == 10 and doc["offset"] == 0 and isinstance(doc["crc32"], int)
    assert [p.name for p in (root / "chunks").iterdir()] == ["e0000-w1-r0-c0000.json"]  # no temporaries left


def test_a_teacher_is_its_tag_and_weights_not_where_its_file_lies(tmp_path):
    fields = {"dataset_digest": "d1", "dataset_size": 10, "num_classes": 10, "seed": 3, "image_size": 32,
              "plan_version": 1, "top_k": 5}
    first = [{"tag": "a", "weights": "/w/a.pth", "sha256": "s1"}]  # a bank of an older fastmeal: no file_sha256
    store.open_or_create(tmp_path, store.make_manifest(teachers=first, **fields))
    moved = [{"tag": "a", "weights": "/elsewhere/a.pth", "sha256": "s1", "file_sha256": "f1"}]
    store.open_or_create(tmp_path, store.make_manifest(teachers=moved, **fields))  # continues the same bank
    other = [{"tag": "a", "weights": "/w/a.pth", "sha256": "s2", "file_sha256": "f2"}]
    with pytest.raises(store.BankError, match=r"teachers: the bank has \[\('a', 's1'\)\], this run has "
                                              r"\[\('a', 's2'\)\]"):
        store.open_or_create(tmp_path, store.make_manifest(teachers=other, **fields))


def test_a_chunk_is_synced_before_its_json_which_is_synced_before_its_rename(tmp_path, monkeypatch):
    from test_checkpoint import _record_syncs

    root = tmp_path / "b"
    manifest = store.open_or_create(root, _manifest(dataset_size=10))
    writer = store.EpochWriter(root, manifest, 0, store.EpochLayout(world_size=1, records_per_rank=10,
                                                                     chunk_records=10), 0)
    events = _record_syncs(monkeypatch)
    rows = np.zeros(10, dtype=writer.dtype)
    rows["index"] = np.arange(10)
    writer.write_chunk(0, rows, {"samples": 10})
    final = store.chunk_file(root, 0, 1, 0, 0)
    tmp = str(final.with_name(f".{final.name}.tmp-{os.getpid()}"))
    assert events == [("fsync", str(store.epoch_file(root, 0))), ("fsync", tmp), ("replace", tmp, str(final)),
                      ("fsync", str(final.parent))]


def test_an_epoch_not_announced_up_front_is_checked_when_first_read(bank):
    root, truths = bank
    reader = store.BankReader(root)  # no epochs announced
    probs, classes = reader.records(1, np.array([3]))
    np.testing.assert_array_equal(probs[0], truths[1][3][0])
    np.testing.assert_array_equal(classes[0], truths[1][3][1])
    with pytest.raises(store.BankError, match=r"has no complete epoch 7 \(not built\)"):
        reader.records(7, np.array([3]))
    next(iter(sorted((root / "chunks").glob("e0000-*")))).unlink()
    with pytest.raises(store.BankError, match=r"has no complete epoch 0 \(1 of 9 chunks not finished\)"):
        store.BankReader(root).records(0, np.array([3]))


def test_teacher_hash_is_sha256_of_names_dtypes_shapes_and_bytes():
    """The documented format, computed here with hashlib: a bank's teacher identity must not drift between versions."""
    import hashlib

    import torch

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(7), "e": torch.zeros(0)}
    h = hashlib.sha256()
    h.update(b"e|torch.float32|(0,)|")
    h.update(b"n|torch.int64|(1,)|" + (7).to_bytes(8, "little"))
    h.update(b"w|torch.float32|(6,)|" + np.arange(6, dtype="<f4").tobytes())
    assert store.hash_state_dict(state) == h.hexdigest()


def test_manifest_is_the_documented_format():
    """The manifest, written out here field by field: a bank's on-disk description must not drift between versions."""
    manifest = store.make_manifest(teachers=TEACHERS, dataset_digest="d1", dataset_size=1000, num_classes=10, seed=3,
                                   image_size=32, plan_version=1, top_k=5, extra={"backend": "dali"})
    assert manifest == {
        "format": "fastmeal-soft-label-bank", "version": 1, "teachers": TEACHERS, "dataset_digest": "d1",
        "dataset_size": 1000, "num_classes": 10, "seed": 3, "image_size": 32, "plan_version": 1, "top_k": 5,
        "record_dtype": [["index", "<i4"], ["probs", "<f2", [5]], ["classes", "<i2", [5]]], "record_bytes": 24,
        "layout": {"file": "epoch_{epoch:04d}.bin",
                   "order": "build rank regions of whole pages; each record names its dataset index; only the "
                            "chunks' spans hold records",
                   "align_records": 512,
                   "chunks": "chunks/e{epoch}-w{world}-r{rank}-c{chunk}.json (offset, count, crc32)"},
        "backend": "dali"}
    assert "backend" not in _manifest()
    # The record: int32 index, then K fp16 probabilities, then K int16 classes, little-endian and packed.
    rows = np.zeros(2, dtype=store.record_dtype(3))
    rows["index"], rows["probs"], rows["classes"] = [7, -1], [[0.5, 0.25, 2.0]] * 2, [[1, -2, 3]] * 2
    want = b"".join(np.array([i], "<i4").tobytes() + np.array([0.5, 0.25, 2.0], "<f2").tobytes()
                    + np.array([1, -2, 3], "<i2").tobytes() for i in (7, -1))
    assert rows.tobytes() == want and store.record_dtype(3).itemsize == 4 + 2 * 3 + 2 * 3


@pytest.mark.parametrize("top_k,num_classes,ok", [(0, 10, False), (1, 10, True), (10, 10, True), (11, 10, False),
                                                   (5, 32768, True), (5, 32769, False)])
def test_top_k_is_between_1_and_the_classes_which_fit_int16(top_k, num_classes, ok):
    if ok:
        assert _manifest(top_k=top_k, num_classes=num_classes)["top_k"] == top_k
    else:
        with pytest.raises(store.BankError, match="top-K|int16"):
            _manifest(top_k=top_k, num_classes=num_classes)


@pytest.mark.parametrize("values,text", [([], ""), ([3], "3"), ([0, 1, 2, 5], "0-2, 5"), ([1, 2], "1-2"),
                                         ([1, 3, 4, 5, 9, 10], "1, 3-5, 9-10"), ([0, 2, 4], "0, 2, 4")])
def test_format_ranges(values, text):
    assert store.format_ranges(values) == text


@pytest.mark.parametrize("field,value,message", [("format", "other", "is not a fastmeal soft-label bank manifest"),
                                                 ("version", 2, "bank format version 2 is not 1")])
def test_refuses_a_manifest_of_another_format_or_version(bank, field, value, message):
    root, _ = bank
    doc = json.loads((root / "manifest.json").read_text())
    doc[field] = value
    (root / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(store.BankError, match=message):
        store.BankReader(root)


def test_refuses_a_record_layout_other_than_this_versions(bank):
    root, _ = bank
    doc = json.loads((root / "manifest.json").read_text())
    doc["record_dtype"] = [["index", "<i4"], ["probs", "<f4", [5]], ["classes", "<i2", [5]]]
    (root / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(store.BankError, match="record_dtype .* is not this fastmeal's layout"):
        store.BankReader(root)


def test_a_bank_without_complete_epochs_says_it_holds_none(tmp_path):
    root = tmp_path / "bank"
    store.open_or_create(root, _manifest())
    assert store.scan_chunks(root) == {} and store.BankReader(root).epochs == []
    with pytest.raises(store.BankError, match=r"lacks epoch\(s\) 0 \(not built\) .*\(it holds none\)"):
        store.BankReader(root, epochs=[0])
    (root / "chunks").rmdir()  # a folder without chunks/ holds nothing either
    assert store.scan_chunks(root) == {}


def test_epoch_status_needs_every_chunk_of_one_build(tmp_path):
    root = tmp_path / "bank"
    manifest = store.open_or_create(root, _manifest())
    _write_epoch(root, manifest, 0, world_size=2, chunk_records=200)  # 500 records per rank: 3 chunks each
    chunks = store.scan_chunks(root)[0]
    assert sorted(c["_file"] for c in chunks) == [f"e0000-w2-r{r}-c000{k}.json" for r in range(2) for k in range(3)]
    assert {(c["epoch"], c["rank"], c["chunk"]) for c in chunks} == {(0, r, k) for r in range(2) for k in range(3)}
    assert store.epoch_status(chunks) == (store.EpochLayout(world_size=2, records_per_rank=500, chunk_records=200),
                                          "complete")
    assert store.epoch_status([c for c in chunks if c["chunk"] != 2]) == (None, "2 of 6 chunks not finished")
    assert store.epoch_status([c for c in chunks if c["rank"] != 1]) == (None, "3 of 6 chunks not finished")
    mixed = chunks[:-1] + [{**chunks[-1], "world_size": 1}]
    assert store.epoch_status(mixed) == (None, "chunks from builds with different world sizes [1, 2]")
    # chunks of two chunk sizes (a build continued with another chunk size) are no complete epoch, whatever the order
    _write_epoch(tmp_path / "other", store.open_or_create(tmp_path / "other", _manifest()), 0, world_size=2,
                 chunk_records=250)
    assert store.epoch_status(chunks[:1] + store.scan_chunks(tmp_path / "other")[0][1:]) == (
        None, "chunks from builds with different chunk sizes [200, 250]")
    # one chunk more than the layout has is no complete epoch either
    assert store.epoch_status(chunks + [{**chunks[-1], "chunk": 3}]) == (None, "0 of 6 chunks not finished")


def test_a_chunk_is_refused_unless_its_records_are_the_banks_dtype_and_count(tmp_path):
    root = tmp_path / "b"
    manifest = store.open_or_create(root, _manifest(dataset_size=10))
    writer = store.EpochWriter(root, manifest, 0, store.EpochLayout(world_size=1, records_per_rank=10,
                                                                     chunk_records=10), 0)
    with pytest.raises(ValueError, match="needs 10 records"):
        writer.write_chunk(0, np.zeros(10, dtype=store.record_dtype(4)), {})
    assert not writer.chunk_done(0)


def test_an_epoch_file_is_the_layouts_size_and_a_stale_temporary_of_a_chunk_is_removed(tmp_path):
    root = tmp_path / "a" / "b"  # parents made
    manifest = store.open_or_create(root, _manifest(dataset_size=10))
    old = os.umask(0)
    try:
        layout = store.EpochLayout(world_size=2, records_per_rank=10, chunk_records=4)
        writer = store.EpochWriter(root, manifest, 3, layout, 1)
    finally:
        os.umask(old)
    path = root / "epoch_0003.bin"
    assert writer.path == path and path.stat().st_size == 2 * 512 * 24 and path.stat().st_mode & 0o777 == 0o644
    stale = store.chunk_file(root, 3, 2, 1, 1)
    stale = stale.with_name(f".{stale.name}.tmp-999999")
    stale.write_text("{")
    other = stale.with_name(".e0003-w2-r1-c0002.json.tmp-999999")  # another chunk's: not this write's business
    other.write_text("{")
    rows = np.zeros(4, dtype=writer.dtype)
    rows["index"] = [3, 4, 5, 6]
    writer.write_chunk(1, rows, {"samples": 4})
    assert not stale.exists() and other.exists()
    assert [c["_file"] for c in store.scan_chunks(root)[3]] == ["e0003-w2-r1-c0001.json"]  # temporaries are skipped
    doc = json.loads(store.chunk_file(root, 3, 2, 1, 1).read_text())
    assert doc == {"epoch": 3, "world_size": 2, "rank": 1, "chunk": 1, "records_per_rank": 10, "chunk_records": 4,
                   "offset": 512 + 4, "count": 4, "crc32": zlib.crc32(rows.tobytes()), "samples": 4}
    assert path.read_bytes()[(512 + 4) * 24:(512 + 8) * 24] == rows.tobytes()
    # another rank's writer, opened later, keeps the file's size and this rank's records
    store.EpochWriter(root, manifest, 3, layout, 0)
    assert path.stat().st_size == 2 * 512 * 24 and path.read_bytes()[(512 + 4) * 24:(512 + 8) * 24] == rows.tobytes()


def test_a_teacher_is_its_tag_too(tmp_path):
    fields = {"dataset_digest": "d1", "dataset_size": 10, "num_classes": 10, "seed": 3, "image_size": 32,
              "plan_version": 1, "top_k": 5}
    store.open_or_create(tmp_path, store.make_manifest(teachers=[{"tag": "a", "sha256": "s1"}], **fields))
    with pytest.raises(store.BankError, match=r"teachers: the bank has \[\('a', 's1'\)\], this run has "
                                              r"\[\('b', 's1'\)\]"):
        store.open_or_create(tmp_path, store.make_manifest(teachers=[{"tag": "b", "sha256": "s1"}], **fields))


def test_only_the_fields_a_run_names_are_compared():
    have = {"seed": 3, "top_k": 5, "teachers": [{"tag": "a", "sha256": "s"}], "backend": "dali"}
    assert store.mismatches(have, {}) == []
    assert store.mismatches(have, {"seed": 3, "backend": "torchvision"}) == []  # backend is no identity field
    assert store.mismatches(have, {"seed": 4, "top_k": 5, "image_size": 32}) == [
        "seed: the bank has 3, this run has 4", "image_size: the bank has None, this run has 32"]
    assert store.mismatches(have, {"backend": "torchvision"}, fields=("backend",)) == [
        "backend: the bank has 'dali', this run has 'torchvision'"]


def test_refuses_a_damaged_chunk_record(bank):
    root, _ = bank
    store.chunk_file(root, 1, 3, 2, 0).write_text('{"epoch": 1')
    with pytest.raises(store.BankError, match=r"the chunk record .*e0001-w3-r2-c0000.json cannot be read"):
        store.BankReader(root)


def test_a_bank_indexed_with_mtimes_continues_with_the_same_files(tmp_path):
    """A bank built before the dataset identity left mtimes out records the mtime-including digest; a build over
    the same files (its index's ``cache_digest``) continues it under the bank's digest."""
    from types import SimpleNamespace

    root = tmp_path / "bank"
    store.open_or_create(root, _manifest(dataset_digest="with-mtimes"))
    index = SimpleNamespace(digest="copy-proof", cache_digest="with-mtimes", root=str(tmp_path / "data" / "train"))
    have = store.open_or_create(root, _manifest(dataset_digest="copy-proof"), index)
    assert have["dataset_digest"] == "with-mtimes"


def test_a_folder_left_by_a_build_killed_before_its_manifest_is_reused(tmp_path):
    root = tmp_path / "bank"
    (root / "chunks").mkdir(parents=True)  # made, then killed before the manifest was written
    assert store.open_or_create(root, _manifest())["seed"] == 3
    assert store.read_manifest(root) == _manifest()


def test_a_dataset_table_of_python_objects_is_refused_unread(tmp_path):
    """dataset.npz is read without pickle: a table of Python objects (unpickling runs code) is a damaged bank."""

    class Index:
        digest = cache_digest = "another dataset"
        root, paths = str(tmp_path / "data" / "train"), []
        labels = sizes = heights = widths = np.zeros(0, dtype=np.int64)

        def __len__(self):
            return 0

    root = tmp_path / "bank"
    manifest = store.open_or_create(root, _manifest())
    np.savez(root / "dataset.npz", paths=np.array([{"a": 1}], dtype=object))
    with pytest.raises(store.BankError, match=r"dataset.npz cannot be read \(Object arrays cannot be loaded"):
        store.check_dataset(root, manifest, Index(), "the data")
