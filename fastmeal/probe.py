"""``fastmeal probe``: transfer evaluation by linear probe on frozen features (the OmniBenchmark protocol).

For each realm (a dataset with train, val and test splits) every image is resized (short side to S,
bicubic), centre-cropped to S and normalised; the frozen backbone's pooled penultimate features are
extracted once and cached on disk in fp16; a linear classifier ``Linear(d, C)`` is fitted on the train
features with full-batch L-BFGS, once per penalty λ in :data:`LAMBDAS`, and evaluated on val and test
every :data:`EVAL_EVERY` of :data:`NUM_STEPS` steps.

The fit follows the OmniBenchmark authors' linear-probe script (``linear_probe/main.py`` of
ZhangYuanhan-AI/OmniBenchmark): ``torch.optim.LBFGS`` with its defaults (lr 1, 20 iterations per
``step()``, history 100, no line search), 1,000 ``step()`` calls; the closure's gradient is the sum of
the mean cross-entropies of 10 consecutive segments of the train features plus ``λ·‖W‖`` (the norm of
the weight, not its square; the bias is not penalised). Here all λ of a realm run as one batched
problem (:class:`BatchedLBFGS`: one L-BFGS state per λ, the same arithmetic as torch's, one tensor op
over all λ instead of one Python loop each) where that was measured faster, else one by one.

Two numbers per realm:

* ``omnibench``: the best test top-1 over every λ and every evaluation (what the reference reports; it
  selects on the test split), and likewise the best test mean per-class accuracy (selected separately,
  as the reference does);
* ``clean``: λ and the evaluation step chosen on val top-1 (ties: the larger λ, then the earlier step),
  test reported at that one point.

The headline is the average of the realms' top-1. Departures from the reference script: the closure
returns the whole objective (the reference returns the last segment's loss plus the penalty, which
L-BFGS only reads for its ``tolerance_change`` stop); the features are cached in fp16 (the fit runs in
fp32 on them, so a cached and a fresh run fit the same numbers); mean per-class accuracy averages over
the classes present in the split (the reference's would be NaN with an absent class); images are
decoded with PIL through the torchvision loader (the reference's resampling, also with DALI installed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

from fastmeal.checkpoint import atomic_torch_save, atomic_write_bytes
from fastmeal.console import progress_enabled
from fastmeal.data.common import CorruptImageError, DataError, Split
from fastmeal.lifecycle import raise_if_stopped
from fastmeal.metrics import finite_json
from fastmeal.models.backbone import Backbone

log = logging.getLogger("fastmeal.probe")

LAMBDAS = (1e-5, 1e-4, 3e-4, 1e-3, 1e-2, 0.1, 1.0)  # the reference's sweep of the weight-norm penalty
NUM_STEPS = 1000  # L-BFGS step() calls (each up to 20 iterations), as the reference's total_iter
EVAL_EVERY = 100  # val and test accuracy every this many steps (the reference's val_freq)
NUM_SEGMENTS = 10  # the closure sums the mean CE of this many consecutive train segments (the reference's seg_num)
PROBE_SPLITS = ("train", "val", "test")
# The seed's published transfer figure (SPEC): MEAL V2's ResNet-50, average top-1 over OmniBenchmark's realms.
PAPER_TOP1 = {"resnet50": 36.6}
PAPER_RES = 224
CACHE_FORMAT = 1  # the feature cache file's layout; another value is extracted again
# Above this much L-BFGS history (all λ together) the batched fit ran slower than one λ at a time on the CPU
# (benchmarks/results/probe_fit_cpu-2core.json: 6x faster at 12 MB, 0.6x at 143 MB; the per-λ history stays in
# the CPU's caches). On a GPU the batched fit is chosen always (fewer kernel launches; unmeasured).
_CPU_BATCHED_HISTORY_BYTES = 64 << 20
_LOGIT_BUDGET = 1 << 25  # logits held at once by the closure (L x samples x C), to bound its memory


class ProbeError(DataError):
    """A realm that cannot be probed as asked: the message names the realm, the split and the file."""


# --------------------------------------------------------------------------------------------
# Realms: ImageFolder trees or OmniBenchmark lists
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Realm:
    """One realm's three splits with one class numbering.

    Attributes:
        name: the realm folder's name; ``root``: its path; ``layout``: ``imagefolder`` or ``lists``.
        classes: class names (folder names, or the list files' label ids as written), sorted; label ``i``
            is ``classes[i]``: OmniBenchmark's sparse ids become ``0..C-1``.
        splits: ``train``, ``val``, ``test`` → :class:`Split` (absolute paths, labels in ``0..C-1``).
        stats: per split, ``(size, mtime_ns)`` of each file: with the paths, what identifies the split.
    """

    name: str
    root: str
    layout: str
    classes: tuple[str, ...]
    splits: dict[str, Split]
    stats: dict[str, tuple[tuple[int, int], ...]]


def _stat(path: str, where: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as err:
        raise ProbeError(f"{where}: {path} does not exist or cannot be read ({err.strerror})") from None
    return st.st_size, st.st_mtime_ns


def _read_list(realm_dir: Path, split: str) -> list[tuple[str, int, str]]:
    """``(absolute path, label id, where)`` per line of ``<realm>/<split>.txt`` (``relative/path label``)."""
    list_file = realm_dir / f"{split}.txt"
    entries = []
    with list_file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"realm {realm_dir.name!r}, {list_file} line {number}"
            parts = line.rsplit(maxsplit=1)  # a path may hold spaces; the label is the last field
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ProbeError(f"{where}: expected 'relative/path label' (an integer label), got {line.strip()!r}")
            entries.append((str(realm_dir / parts[0]), int(parts[1]), where))
    if not entries:
        raise ProbeError(f"realm {realm_dir.name!r}: {list_file} lists no image")
    return entries


def _scan_lists(realm_dir: Path) -> Realm:
    raw = {split: _read_list(realm_dir, split) for split in PROBE_SPLITS}
    ids = sorted({label for entries in raw.values() for _, label, _ in entries})
    index = {label: i for i, label in enumerate(ids)}
    splits, stats = {}, {}
    for split, entries in raw.items():
        stats[split] = tuple(_stat(path, where) for path, _, where in entries)
        splits[split] = Split(root=str(realm_dir), classes=tuple(str(i) for i in ids),
                              samples=tuple((path, index[label]) for path, label, _ in entries))
    return Realm(name=realm_dir.name, root=str(realm_dir), layout="lists", classes=tuple(str(i) for i in ids),
                 splits=splits, stats=stats)


def _scan_folders(realm_dir: Path) -> Realm:
    per_split = {}
    for split in PROBE_SPLITS:
        try:
            per_split[split] = find_classes(realm_dir / split)[0]
        except FileNotFoundError:
            raise ProbeError(f"realm {realm_dir.name!r}: {realm_dir / split} holds no class folder") from None
    classes = sorted({c for names in per_split.values() for c in names})
    class_to_idx = {c: i for i, c in enumerate(classes)}
    splits, stats = {}, {}
    for split in PROBE_SPLITS:
        split_dir = realm_dir / split
        samples = make_dataset(split_dir, {c: class_to_idx[c] for c in per_split[split]}, extensions=IMG_EXTENSIONS,
                               allow_empty=True)
        if not samples:
            raise ProbeError(f"realm {realm_dir.name!r}: {split_dir} holds no image file "
                             f"(extensions {', '.join(IMG_EXTENSIONS)})")
        stats[split] = tuple(_stat(path, f"realm {realm_dir.name!r}, split {split}") for path, _ in samples)
        splits[split] = Split(root=str(split_dir), classes=tuple(classes), samples=tuple(samples))
    return Realm(name=realm_dir.name, root=str(realm_dir), layout="imagefolder", classes=tuple(classes),
                 splits=splits, stats=stats)


def _is_realm(path: Path) -> bool:
    return any((path / f"{s}.txt").is_file() or (path / s).is_dir() for s in PROBE_SPLITS)


def scan_realm(realm_dir: str | os.PathLike) -> Realm:
    """Read one realm, detecting its layout: ``train.txt``/``val.txt``/``test.txt`` lists, or ``train/``/``val/``/
    ``test/`` ImageFolder trees.

    Classes are the union over the three splits; a class without a train image is logged (the probe cannot
    learn it, and its test images count as errors).

    Raises:
        ProbeError: a missing split (list or folder), an empty list or split, a malformed list line, a
            listed file that does not exist; the message names the realm, split and file.
    """
    realm_dir = Path(realm_dir)
    name = realm_dir.name
    lists = [s for s in PROBE_SPLITS if (realm_dir / f"{s}.txt").is_file()]
    folders = [s for s in PROBE_SPLITS if (realm_dir / s).is_dir()]
    if len(lists) == len(PROBE_SPLITS):
        realm = _scan_lists(realm_dir)
    elif len(folders) == len(PROBE_SPLITS):
        realm = _scan_folders(realm_dir)
    elif lists:
        missing = ", ".join(f"{s}.txt" for s in PROBE_SPLITS if s not in lists)
        raise ProbeError(f"realm {name!r}: {missing} missing in {realm_dir} (OmniBenchmark layout: train.txt, val.txt "
                         "and test.txt, each line 'relative/path label')")
    elif folders:
        missing = ", ".join(f"{s}/" for s in PROBE_SPLITS if s not in folders)
        raise ProbeError(f"realm {name!r}: {missing} missing in {realm_dir} (ImageFolder layout: train/, val/ and "
                         "test/, each holding <class>/<image>)")
    else:
        raise ProbeError(f"realm {name!r}: {realm_dir} holds neither train/ val/ test/ folders nor train.txt val.txt "
                         "test.txt lists")
    train_labels = set(realm.splits["train"].labels)
    absent = [c for i, c in enumerate(realm.classes) if i not in train_labels]
    if absent:
        log.warning("realm %s: %d of %d classes have no train image (%s%s): the probe cannot predict them", name,
                    len(absent), len(realm.classes), ", ".join(absent[:5]), " ..." if len(absent) > 5 else "")
    return realm


def find_realms(data_dir: str | os.PathLike, names: list[str] | None = None) -> list[Realm]:
    """The realms under ``data_dir``: the named ones, else every sub-folder that holds splits; or ``data_dir``
    itself when it is a realm.

    Raises:
        ProbeError: ``data_dir`` missing, a named realm missing, no realm found, or a bad realm.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ProbeError(f"--data {str(root)!r} does not exist or is not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_realm(p))
    if names:
        for name in names:
            if not (root / name).is_dir():
                raise ProbeError(f"realm {name!r} not found: {root / name} is not a folder (realms in {root}: "
                                 f"{', '.join(found) or 'none'})")
        return [scan_realm(root / name) for name in names]
    if not found and _is_realm(root):
        return [scan_realm(root)]
    if not found:
        raise ProbeError(f"no realm in {root}: a realm is a folder with train/ val/ test/ (ImageFolder) or train.txt "
                         "val.txt test.txt (OmniBenchmark lists)")
    return [scan_realm(root / name) for name in found]


def write_synthetic_realm(out: str | os.PathLike, *, num_classes: int, train_per_class: int, eval_per_class: int,
                          seed: int, layout: str = "imagefolder", size_range: tuple[int, int] = (40, 56),
                          label_offset: int = 1000, label_stride: int = 7) -> Path:
    """A realm made of :func:`fastmeal.data.synthetic.synthesize` images (for the tests and the README's figures).

    ``train/`` and ``val/`` come from one call, ``test/`` is the ``val/`` of a second call with another seed
    (same classes, other images). ``layout="lists"`` then rewrites it in OmniBenchmark's layout: the images stay,
    ``train.txt``/``val.txt``/``test.txt`` list them with sparse label ids ``offset + stride·class`` and the
    split folders are renamed (``images_<split>/``) so that only the lists describe the realm.
    """
    import shutil
    import tempfile

    from fastmeal.data.synthetic import synthesize

    out = Path(out)
    synthesize(out, num_classes=num_classes, train_per_class=train_per_class, val_per_class=eval_per_class, seed=seed,
               size_range=size_range, progress=False)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        synthesize(tmp, num_classes=num_classes, train_per_class=1, val_per_class=eval_per_class, seed=seed + 1,
                   size_range=size_range, progress=False)
        shutil.move(str(Path(tmp) / "val"), str(out / "test"))
    (out / "fastmeal_synthetic.json").unlink()  # the test split is not synthesize's: it must not replace this realm
    if layout == "lists":
        for split in PROBE_SPLITS:
            split_dir = out / split
            classes = sorted(p.name for p in split_dir.iterdir())
            lines = [f"images_{split}/{c}/{f.name} {label_offset + label_stride * classes.index(c)}"
                     for c in classes for f in sorted((split_dir / c).iterdir())]
            split_dir.rename(out / f"images_{split}")
            (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# Features, cached
# --------------------------------------------------------------------------------------------


def probe_transform(res: int, mean: tuple[float, ...], std: tuple[float, ...]) -> transforms.Compose:
    """The protocol's preprocessing: short side to ``res`` (bicubic), centre crop ``res``, normalise."""
    return transforms.Compose([transforms.Resize(res, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(res), transforms.ToTensor(), transforms.Normalize(mean, std)])


def feature_key(backbone: Backbone, realm: Realm, split: str, res: int) -> str:
    """SHA-256 of what the features of ``split`` depend on: the weights' content, the model, the preprocessing,
    and the file list (paths, labels, sizes, modification times)."""
    h = hashlib.sha256(f"fastmeal-probe-features {CACHE_FORMAT}\n{backbone.tag}\n{backbone.digest}\n{res}\n"
                       f"bicubic {backbone.mean} {backbone.std}\n".encode())
    for (path, label), (size, mtime) in zip(realm.splits[split].samples, realm.stats[split], strict=True):
        h.update(f"{path}\t{label}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fastmeal/probe`` (``~/.cache`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastmeal" / "probe"


def _load_cached(path: Path, key: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file is extracted again, whatever the error
        log.warning("feature cache %s is unreadable (%s: %s): extracting again", path, type(err).__name__, err)
        return None
    if not isinstance(obj, dict) or obj.get("key") != key or not isinstance(obj.get("features"), torch.Tensor):
        return None
    return obj["features"]


def _gather_rows(local: torch.Tensor, total: int, world_size: int) -> torch.Tensor:
    """Rank ``r`` holds rows ``r, r + W, ...`` (the eval shard): every rank's rows, in dataset order. Collective."""
    if world_size == 1:
        return local
    import torch.distributed as dist

    per_rank = math.ceil(total / world_size)
    padded = local.new_zeros(per_rank, local.shape[1])
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    out = local.new_empty(total, local.shape[1])
    for r, part in enumerate(parts):
        out[r::world_size] = part[:len(range(r, total, world_size))]
    return out


@torch.inference_mode()
def split_features(backbone: Backbone, realm: Realm, split: str, *, res: int, device: torch.device,
                   cache_dir: Path, batch_size: int = 128, workers: int = 2, rank: int = 0, world_size: int = 1,
                   progress: bool = True) -> tuple[torch.Tensor, bool]:
    """The features of one split, ``[N, d]`` fp16 on the CPU in the split's order, and whether they came from the cache.

    A cache file holds its key (:func:`feature_key`), so a changed file list, other weights or another
    resolution extract again. Under torchrun every rank decodes its share (the eval shard) and the rows
    are gathered on every rank; rank 0 writes the cache (atomically).

    Raises:
        ProbeError: a file that does not decode (named, with its realm and split).
    """
    from fastmeal.config import build_config
    from fastmeal.data.torchvision import TorchvisionLoader
    from fastmeal.distributed import all_gather_objects, barrier
    from fastmeal.evaluate import autocast_context, resolve_precision

    key = feature_key(backbone, realm, split, res)
    path = cache_dir / f"{realm.name}-{split}-{res}px-{key[:24]}.pt"
    cached = _load_cached(path, key)
    if all(c is not None for c in all_gather_objects(cached is not None)) and cached is not None:
        log.info("realm %s: %s features from the cache (%s)", realm.name, split, path)
        return cached, True
    data = realm.splits[split]
    cfg = build_config("r50_224", overrides={"data.workers": workers, "data.skip_corrupt": False, "precision.mode": (
        "amp" if device.type == "cuda" else "fp32"), "runtime.device": device.type})
    loader = TorchvisionLoader(cfg, data, "val", rank=rank, world_size=world_size, device=device, batch_size=batch_size,
                               transform=probe_transform(res, backbone.mean, backbone.std))
    autocast_dtype, _ = resolve_precision(cfg.precision.mode, device)
    start = time.perf_counter()
    chunks = []
    bar = tqdm(loader, desc=f"{realm.name}/{split}", unit="batch", disable=not progress_enabled(progress), leave=False,
               dynamic_ncols=True)
    try:
        for images, _ in bar:
            raise_if_stopped()
            with autocast_context(device, autocast_dtype):
                chunks.append(backbone.module(images).float())
    except CorruptImageError as err:
        raise ProbeError(f"realm {realm.name!r}, split {split}: {err}") from None
    local = torch.cat(chunks) if chunks else torch.zeros(0, backbone.num_features, device=device)
    features = _gather_rows(local, len(data), world_size).to("cpu", torch.float16)
    seconds = time.perf_counter() - start
    log.info("realm %s: %s features extracted (%d images, %.1f img/s on %s%s)", realm.name, split, len(data),
             len(data) / max(seconds, 1e-9), device, f", {world_size} ranks" if world_size > 1 else "")
    if rank == 0:
        atomic_torch_save({"key": key, "features": features}, path)
    barrier()
    return features, False


# --------------------------------------------------------------------------------------------
# The fit: batched L-BFGS, torch.optim.LBFGS's algorithm with one state per problem
# --------------------------------------------------------------------------------------------


class BatchedLBFGS:
    """``torch.optim.LBFGS`` (no line search) on ``L`` independent problems at once, one state per problem.

    Each row of ``x`` is one problem's flat parameter vector; ``closure(x)`` returns every problem's loss
    ``[L]`` and gradient ``[L, P]``. :meth:`step` is one ``LBFGS.step(closure)`` per row with torch's
    arithmetic and stopping rules applied row by row: a row that stops (its gradient, step or loss change
    under tolerance, or ``max_iter`` reached) keeps its parameters and state while the others go on.
    Its history holds the last ``history_size`` pairs (y, s, 1/yᵀs) per row in a ring (the oldest pair is
    overwritten, as torch's ``pop(0)``, without moving the others), filled only where ``yᵀs > 1e-10``
    (torch's curvature test).

    Args:
        x: ``[L, P]`` initial parameters (updated in place).
        closure: ``x → (loss [L], grad [L, P])``.
        lr, max_iter, max_eval, tolerance_grad, tolerance_change, history_size: ``torch.optim.LBFGS``'s.
    """

    def __init__(self, x: torch.Tensor, closure: Any, *, lr: float = 1.0, max_iter: int = 20,
                 max_eval: int | None = None, tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9,
                 history_size: int = 100) -> None:
        self.x, self.closure, self.lr, self.max_iter = x, closure, lr, max_iter
        self.max_eval = max_eval if max_eval is not None else max_iter * 5 // 4
        self.tolerance_grad, self.tolerance_change, self.history_size = tolerance_grad, tolerance_change, history_size
        num, size = x.shape
        self.ys_hist = x.new_zeros(num, history_size, size)  # y = g_new - g_old
        self.ss_hist = x.new_zeros(num, history_size, size)  # s = t * d
        self.rho = x.new_zeros(num, history_size)  # 1 / yᵀs
        self.oldest = torch.zeros(num, dtype=torch.long, device=x.device)  # ring slot of the oldest pair
        self.count = torch.zeros(num, dtype=torch.long, device=x.device)
        self.d = torch.zeros_like(x)
        self.t = x.new_zeros(num)
        self.h_diag = x.new_ones(num)
        self.prev_grad = torch.zeros_like(x)
        self.prev_loss = torch.zeros(num, dtype=torch.float64, device=x.device)
        self.n_iter = torch.zeros(num, dtype=torch.long, device=x.device)

    def _push(self, rows: torch.Tensor, y: torch.Tensor, s: torch.Tensor, ys: torch.Tensor) -> None:
        full = self.count[rows] == self.history_size
        slot = (self.oldest[rows] + self.count[rows]) % self.history_size  # a full row's oldest slot
        self.ys_hist[rows, slot] = y[rows]
        self.ss_hist[rows, slot] = s[rows]
        self.rho[rows, slot] = 1.0 / ys[rows]
        self.oldest[rows] = torch.where(full, (self.oldest[rows] + 1) % self.history_size, self.oldest[rows])
        self.count[rows] += (~full).long()
        self.h_diag[rows] = ys[rows] / (y[rows] * y[rows]).sum(1)

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The two-loop recursion, ``-H·grad`` per row ``[L, P]``; pairs past a row's count weigh zero."""
        num = grad.shape[0]
        # Rows that started together and stored every pair share their ring position: then a pair is a view
        # ([:, slot]), not a gather (a copy of [L, P] per read).
        shared = bool((self.oldest == self.oldest[0]).all())
        rows = slice(None) if shared else torch.arange(num, device=grad.device)
        pairs = []  # per age j (0 = oldest): (ring slot, rho [L], zero for rows with fewer pairs)
        for j in range(int(self.count.max())):
            slot = (int(self.oldest[0]) + j) % self.history_size if shared else (self.oldest + j) % self.history_size
            pairs.append((slot, torch.where(j < self.count, self.rho[rows, slot], torch.zeros_like(self.t))))
        q = grad.neg()
        al = [grad.new_zeros(0)] * len(pairs)
        for j in range(len(pairs) - 1, -1, -1):
            slot, rho = pairs[j]
            al[j] = (self.ss_hist[rows, slot] * q).sum(1) * rho
            q -= al[j][:, None] * self.ys_hist[rows, slot]
        r = q * self.h_diag[:, None]
        for j, (slot, rho) in enumerate(pairs):
            be = (self.ys_hist[rows, slot] * r).sum(1) * rho
            r += self.ss_hist[rows, slot] * (al[j] - be)[:, None]
        return r

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One ``LBFGS.step`` for every row; returns the loss ``[L]`` at the start of the step."""
        loss, grad = self.closure(self.x)
        orig_loss = loss
        loss = loss.double()
        active = grad.abs().amax(1) > self.tolerance_grad
        evals = torch.ones_like(self.n_iter)
        for n in range(1, self.max_iter + 1):
            if not bool(active.any()):
                break
            self.n_iter += active.long()
            first = active & (self.n_iter == 1)
            later = active & ~first
            if bool(later.any()):
                y = grad - self.prev_grad
                s = self.d * self.t[:, None]
                ys = (y * s).sum(1)
                rows = (later & (ys > 1e-10)).nonzero().squeeze(1)
                if len(rows):
                    self._push(rows, y, s, ys)
                self.d = torch.where(later[:, None], self._direction(grad), self.d)
            if bool(first.any()):
                self.count[first] = 0
                self.oldest[first] = 0
                self.h_diag[first] = 1.0
                self.d = torch.where(first[:, None], grad.neg(), self.d)
            self.prev_grad = torch.where(active[:, None], grad, self.prev_grad)
            self.prev_loss = torch.where(active, loss, self.prev_loss)
            first_t = (1.0 / grad.abs().sum(1)).clamp(max=1.0) * self.lr
            self.t = torch.where(first, first_t, torch.where(active, torch.full_like(self.t, self.lr), self.t))
            gtd = (grad * self.d).sum(1)
            active = active & (gtd <= -self.tolerance_change)
            self.x += torch.where(active[:, None], self.d * self.t[:, None], torch.zeros_like(self.x))
            if n == self.max_iter:
                break
            loss, grad = self.closure(self.x)
            loss = loss.double()
            evals += active.long()
            stop = ((evals >= self.max_eval) | (grad.abs().amax(1) <= self.tolerance_grad)
                    | ((self.d * self.t[:, None]).abs().amax(1) <= self.tolerance_change)
                    | ((loss - self.prev_loss).abs() < self.tolerance_change))
            active = active & ~stop
        return orig_loss


def segment_weights(num_samples: int, num_segments: int = NUM_SEGMENTS) -> torch.Tensor:
    """``[N]`` per-sample weights that turn a sum into the reference's sum of per-segment means.

    The reference cuts the train features into ``num_segments`` consecutive segments of ``N // num_segments``
    samples, the last one taking the rest, and adds up each segment's mean cross-entropy: sample ``i``
    weighs ``1 / len(its segment)``. Empty segments (N < num_segments) are left out.
    """
    step = num_samples // num_segments
    bounds = [min(k * step, num_samples) for k in range(num_segments)] + [num_samples]
    weights = torch.zeros(num_samples, dtype=torch.float64)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi > lo:
            weights[lo:hi] = 1.0 / (hi - lo)
    return weights


def probe_objective(x: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                    lambdas: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every problem's loss and gradient: ``Σ_i w_i·CE(W_l f_i + b_l, y_i) + λ_l·‖W_l‖``.

    Args:
        x: ``[L, C·d + C]`` parameters, each row ``cat(W.flatten(), b)`` (``nn.Linear``'s order).
        features: ``[N, d]``; ``labels``: ``[N]`` in ``0..C-1``; ``weights``: ``[N]`` (:func:`segment_weights`).
        lambdas: ``[L]`` penalties; ``num_classes``: C.

    Returns:
        ``(loss [L], grad [L, C·d + C])``.
    """
    num, d = x.shape[0], features.shape[1]
    chunk = max(1, _LOGIT_BUDGET // max(1, num * num_classes))
    with torch.enable_grad():
        params = x.detach().requires_grad_(True)
        weight = params[:, :num_classes * d].view(num, num_classes, d)
        bias = params[:, num_classes * d:]
        penalty = lambdas * weight.flatten(1).norm(dim=1)
        loss = penalty.detach().clone()
        grad = torch.autograd.grad(penalty.sum(), params)[0]
        for lo in range(0, features.shape[0], chunk):
            f, y, w = features[lo:lo + chunk], labels[lo:lo + chunk], weights[lo:lo + chunk]
            logits = torch.matmul(f, weight.transpose(1, 2)) + bias[:, None, :]  # [L, n, C]
            ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(num), reduction="none").view(num, -1)
            part = (ce * w).sum(1)
            grad += torch.autograd.grad(part.sum(), params)[0]
            loss += part.detach()
    return loss, grad


def _accuracies(x: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top-1 [L], mean per-class accuracy [L])`` in %, the mean over the classes present in ``labels``."""
    num, d = x.shape[0], features.shape[1]
    weight = x[:, :num_classes * d].view(num, num_classes, d)
    preds = (torch.matmul(features, weight.transpose(1, 2)) + x[:, None, num_classes * d:]).argmax(-1)  # [L, N]
    correct = (preds == labels).to(x.dtype)
    per_class = torch.zeros(num, num_classes, dtype=x.dtype, device=x.device).index_add_(1, labels, correct)
    counts = torch.bincount(labels, minlength=num_classes).to(x.dtype)
    present = counts > 0
    mean_class = (per_class[:, present] / counts[present]).mean(1)
    return 100.0 * correct.mean(1), 100.0 * mean_class


def initial_parameters(num_features: int, num_classes: int, num: int, *, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[num, C·d + C]``: ``nn.Linear(d, C)``'s default initialisation (seeded), the same for every problem."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(num_features, num_classes)
    flat = torch.cat([linear.weight.detach().flatten(), linear.bias.detach()]).to(dtype)
    return flat.expand(num, -1).clone()


def fit_probe(train: tuple[torch.Tensor, torch.Tensor], evals: dict[str, tuple[torch.Tensor, torch.Tensor]],
              num_classes: int, *, lambdas: tuple[float, ...] = LAMBDAS, num_steps: int = NUM_STEPS,
              eval_every: int = EVAL_EVERY, batched: bool | None = None, device: torch.device | None = None,
              seed: int = 0, progress: bool = False, desc: str = "L-BFGS") -> dict[str, Any]:
    """Fit one linear probe per λ and record val/test accuracy every ``eval_every`` steps.

    Args:
        train: ``(features [N, d], labels [N])``; evals: split name → ``(features, labels)``.
        num_classes: C; lambdas: the penalties; num_steps: L-BFGS ``step()`` calls.
        batched: all λ as one :class:`BatchedLBFGS` problem; False: one after the other; None: batched on a
            GPU, and on the CPU while the history of all λ fits in ``_CPU_BATCHED_HISTORY_BYTES``.
        device: where the fit runs (default: the features' device).

    Returns:
        ``steps`` (the evaluated step numbers), ``lambdas``, and per eval split ``<split>_top1`` and
        ``<split>_mean_class`` as ``[L, K]`` float64 CPU tensors (K evaluations), plus ``seconds`` and
        ``solver`` (``batched`` or ``per-lambda``).
    """
    device = device or train[0].device
    if batched is None:
        history_bytes = 2 * 100 * len(lambdas) * (train[0].shape[1] + 1) * num_classes * 4
        batched = device.type == "cuda" or history_bytes <= _CPU_BATCHED_HISTORY_BYTES
    features, labels = train[0].to(device, torch.float32), train[1].to(device)
    evals = {k: (f.to(device, torch.float32), y.to(device)) for k, (f, y) in evals.items()}
    weights = segment_weights(len(labels)).to(device, torch.float32)
    groups = [list(range(len(lambdas)))] if batched else [[i] for i in range(len(lambdas))]
    steps = list(range(eval_every, num_steps + 1, eval_every))
    out = {f"{k}_{m}": torch.zeros(len(lambdas), len(steps), dtype=torch.float64)
           for k in evals for m in ("top1", "mean_class")}
    start = time.perf_counter()
    bar = tqdm(total=num_steps * len(groups), desc=desc, unit="step", disable=not progress_enabled(progress),
               leave=False, dynamic_ncols=True)
    for group in groups:
        lam = torch.tensor([lambdas[i] for i in group], dtype=torch.float32, device=device)
        x = initial_parameters(features.shape[1], num_classes, len(group), seed=seed).to(device)
        solver = BatchedLBFGS(x, lambda p, lam=lam: probe_objective(p, features, labels, weights, lam, num_classes))
        for step in range(1, num_steps + 1):
            raise_if_stopped()
            solver.step()
            bar.update()
            if step % eval_every == 0:
                k = step // eval_every - 1
                for name, (f, y) in evals.items():
                    top1, mean_class = _accuracies(solver.x, f, y, num_classes)
                    out[f"{name}_top1"][group, k] = top1.double().cpu()
                    out[f"{name}_mean_class"][group, k] = mean_class.double().cpu()
    bar.close()
    return {"steps": steps, "lambdas": list(lambdas), **out, "seconds": time.perf_counter() - start,
            "solver": "batched" if batched else "per-lambda"}


def select(history: dict[str, Any]) -> dict[str, Any]:
    """The clean choice (λ and step by val top-1) and the protocol's best-on-test numbers.

    Clean: the highest val top-1; ties go to the larger λ, then the earlier step (the simpler classifier).
    Only then is test read, at that one point. OmniBench: the maxima over every λ and step of test top-1
    and of test mean per-class accuracy, each on its own, as the reference reports them.
    """
    val = history["val_top1"]
    lambdas, steps = history["lambdas"], history["steps"]
    best = max(((float(val[i, k]), lambdas[i], -steps[k]), (i, k)) for i in range(len(lambdas))
               for k in range(len(steps)))
    i, k = best[1]
    test_top1, test_mean_class = history["test_top1"], history["test_mean_class"]
    oi, ok = divmod(int(test_top1.argmax()), len(steps))
    return {"lambda_clean": lambdas[i], "step_clean": steps[k], "val_top1_clean": float(val[i, k]),
            "top1_clean": float(test_top1[i, k]), "mean_class_acc_clean": float(test_mean_class[i, k]),
            "top1_omnibench": float(test_top1.max()), "mean_class_acc_omnibench": float(test_mean_class.max()),
            "lambda_omnibench": lambdas[oi], "step_omnibench": steps[ok]}


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def paper_figure(tag: str, weights: str, res: int) -> float | None:
    """The paper's average top-1 beside a matching model: a ResNet-50 with a weights file (the released MEAL V2
    weights or a distilled student) at 224 px; None otherwise."""
    arch = tag.split(".")[0]
    if arch in PAPER_TOP1 and res == PAPER_RES and not weights.startswith("("):
        return PAPER_TOP1[arch]
    return None


def run_probe(backbone: Backbone, data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              realms: list[str] | None = None, res: int = 224, cache_dir: str | os.PathLike | None = None,
              batch_size: int = 128, workers: int = 2, device: torch.device | None = None, rank: int = 0,
              world_size: int = 1, lambdas: tuple[float, ...] = LAMBDAS, num_steps: int = NUM_STEPS,
              eval_every: int = EVAL_EVERY, batched: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Probe ``backbone`` on every realm of ``data_dir``; rank 0 writes ``probe.json`` and ``probe.md`` to ``out_dir``.

    Returns:
        The ``probe.json`` content: ``model``, ``weights``, ``weights_digest``, ``res``, ``realms`` (realm →
        ``num_classes``, ``sizes``, ``layout``, the clean and omnibench numbers of :func:`select`, the curves,
        ``features_from_cache``), ``mean_top1_clean``, ``mean_top1_omnibench``, ``mean_mean_class_acc_clean``,
        ``paper``, ``protocol``, ``device``, ``seconds``.
    """
    device = device or torch.device("cpu")
    if res < 1 or num_steps < eval_every or eval_every < 1:
        raise ProbeError(f"need --res >= 1 and --steps >= --eval-every >= 1, got {res}, {num_steps}, {eval_every}")
    start = time.perf_counter()
    found = find_realms(data_dir, realms)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    module = backbone.module.to(device)
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    results = {}
    for realm in found:
        feats, from_cache = {}, {}
        for split in PROBE_SPLITS:
            feats[split], from_cache[split] = split_features(
                backbone, realm, split, res=res, device=device, cache_dir=cache, batch_size=batch_size,
                workers=workers, rank=rank, world_size=world_size, progress=progress)
        if rank != 0:
            continue
        data = {s: (feats[s], torch.tensor(realm.splits[s].labels, dtype=torch.long)) for s in PROBE_SPLITS}
        history = fit_probe(data["train"], {"val": data["val"], "test": data["test"]}, len(realm.classes),
                            lambdas=lambdas, num_steps=num_steps, eval_every=eval_every, batched=batched,
                            device=device, progress=progress, desc=f"{realm.name} L-BFGS")
        chosen = select(history)
        results[realm.name] = {
            "layout": realm.layout, "num_classes": len(realm.classes),
            "sizes": {s: len(realm.splits[s]) for s in PROBE_SPLITS}, **chosen,
            "features_from_cache": from_cache, "fit_seconds": history["seconds"], "solver": history["solver"],
            "curves": {"steps": history["steps"], "lambdas": history["lambdas"],
                       **{k: history[k].tolist() for k in ("val_top1", "test_top1", "test_mean_class")}}}
        log.info("realm %s: C=%d, clean top-1 %.2f%% (λ=%g, step %d, chosen on val), omnibench %.2f%% (best on test); "
                 "fit %.1f s", realm.name, len(realm.classes), chosen["top1_clean"], chosen["lambda_clean"],
                 chosen["step_clean"], chosen["top1_omnibench"], history["seconds"])
    if rank != 0:
        return {}
    mean = {k: sum(r[k] for r in results.values()) / len(results)
            for k in ("top1_clean", "top1_omnibench", "mean_class_acc_clean")}
    result = {"model": backbone.tag, "weights": backbone.weights, "weights_digest": backbone.digest, "res": res,
              "mean": list(backbone.mean), "std": list(backbone.std), "realms": results,
              "mean_top1_clean": mean["top1_clean"], "mean_top1_omnibench": mean["top1_omnibench"],
              "mean_mean_class_acc_clean": mean["mean_class_acc_clean"],
              "paper": paper_figure(backbone.tag, backbone.weights, res),
              "protocol": {"lambdas": list(lambdas), "steps": num_steps, "eval_every": eval_every,
                           "segments": NUM_SEGMENTS,
                           "resize": "short side bicubic, centre crop"},
              "device": str(device), "world_size": world_size, "seconds": time.perf_counter() - start}
    out = Path(out_dir)
    atomic_write_bytes(out / "probe.json", (json.dumps(finite_json(result), indent=2, allow_nan=False) + "\n").encode())
    atomic_write_bytes(out / "probe.md", format_markdown(result).encode())
    return result


def format_markdown(result: dict[str, Any]) -> str:
    """``probe.md``: one row per realm, then the averages (and the paper's figure beside a matching model)."""
    lines = [f"# Linear probe: {result['model']} ({result['weights']}), {result['res']} px", "",
             "clean = λ and step chosen on val, test read once; omnibench = the best test accuracy over every λ and "
             "step (the OmniBenchmark script's number, selected on test).", "",
             "| realm | C | train / val / test | λ (clean) | top-1 clean | mean-class clean | top-1 omnibench |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name, r in result["realms"].items():
        sizes = " / ".join(str(r["sizes"][s]) for s in PROBE_SPLITS)
        lines.append(f"| {name} | {r['num_classes']} | {sizes} | {r['lambda_clean']:g} | {r['top1_clean']:.2f} | "
                     f"{r['mean_class_acc_clean']:.2f} | {r['top1_omnibench']:.2f} |")
    lines.append(f"| **average** | | | | **{result['mean_top1_clean']:.2f}** | "
                 f"{result['mean_mean_class_acc_clean']:.2f} | **{result['mean_top1_omnibench']:.2f}** |")
    if result["paper"] is not None:
        lines += ["", f"Paper (MEAL V2 ResNet-50, OmniBenchmark's 21 realms, protocol number): {result['paper']:.1f}"]
    return "\n".join(lines) + "\n"
