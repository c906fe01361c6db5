"""The crop plan: the training augmentation as a pure function of (seed, epoch, image).

The crop box and the flip of dataset image ``i`` in epoch ``e`` come from torchvision's
``RandomResizedCrop.get_params`` algorithm (area fraction uniform in 0.08–1, aspect ratio w/h
log-uniform in 3/4–4/3, up to 10 attempts, then its centre-crop fallback) and a coin flip, with the
random numbers drawn from a counter-based generator (Philox4x32-10, the Random123 algorithm) whose key
is ``runtime.seed`` and whose counter is ``(i, e, attempt, stream)``. Nothing else goes in: not the
rank, the number of workers, the batch size or how many batches were drawn before, so

* a resumed run replays exactly the crops of the uninterrupted run from any step of any epoch;
* the soft-label bank can compute, before training, the teachers' output on every (epoch, image) crop.

CutMix's λ, box and permutation come from the same generator, keyed by (seed, epoch, step):
:func:`plan_cutmix`.

``PLAN_VERSION`` names this function: a change that moves any box, flip or CutMix draw must bump it (a
bank records the version it was built with and refuses another).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastmeal.data.common import CROP_AREA, CROP_ASPECT

__all__ = ["PLAN_VERSION", "CropPlan", "philox4x32", "plan_crops", "plan_cutmix"]

PLAN_VERSION = 1

NUM_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
# The last counter word: which quantity a block of random numbers is for.
_STREAM_CROP, _STREAM_FLIP, _STREAM_CUTMIX, _STREAM_PERM = 0, 1, 2, 3

# Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; Random123).
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK = np.uint64(0xFFFFFFFF)
_U32 = 2.0**-32


def philox4x32(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of each counter under ``key``: four independent uniform 32-bit words per counter.

    Args:
        counter: ``[..., 4]`` integers < 2**32 (any integer dtype).
        key: two 32-bit words.

    Returns:
        ``[..., 4]`` uint64 arrays holding 32-bit values (Random123's ``philox4x32_R(10, ctr, key)``).
    """
    c = np.asarray(counter, dtype=np.uint64) & _MASK
    c0, c1, c2, c3 = (c[..., k] for k in range(4))
    k0, k1 = np.uint64(key[0] & 0xFFFFFFFF), np.uint64(key[1] & 0xFFFFFFFF)
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        p0, p1 = _M0 * c0, _M1 * c2  # 32 x 32 -> 64 bits: exact in uint64
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK
    return np.stack([c0, c1, c2, c3], axis=-1)


def _key(seed: int) -> tuple[int, int]:
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def _uniform(words: np.ndarray) -> np.ndarray:
    """32-bit words to float64 uniforms in [0, 1)."""
    return words.astype(np.float64) * _U32


@dataclass(frozen=True)
class CropPlan:
    """One crop per planned image, in torchvision's ``(top, left, height, width)`` convention.

    Attributes:
        top, left, height, width: int64 ``[N]``: the box is rows ``top:top+height``, columns
            ``left:left+width`` of the decoded image.
        flip: bool ``[N]``: mirror the crop horizontally (after resizing; the same thing).
    """

    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray

    def __len__(self) -> int:
        return len(self.top)

    def box(self, k: int) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of entry ``k`` as Python ints."""
        return int(self.top[k]), int(self.left[k]), int(self.height[k]), int(self.width[k])


def plan_crops(seed: int, epoch: int, indices: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> CropPlan:
    """The RandomResizedCrop box and the flip of each image, a pure function of its arguments.

    The algorithm is ``torchvision.transforms.RandomResizedCrop.get_params`` with scale (0.08, 1) and
    ratio (3/4, 4/3): for attempt ``a`` = 0..9, ``target = area·U(0.08, 1)``, ``aspect =
    exp(U(log 3/4, log 4/3))``, ``w = round(sqrt(target·aspect))``, ``h = round(sqrt(target/aspect))``
    (round half to even, as Python's ``round``); the first attempt with ``0 < w <= W`` and ``0 < h <= H``
    is placed at ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``; with none, the centre crop of the largest box
    of aspect within the range. Flip: a fair coin. Attempt ``a`` of image ``i`` in epoch ``e`` draws its
    four numbers from Philox4x32 block ``(i, e, a, 0)``, the flip from block ``(i, e, 0, 1)``, under the
    key ``seed``; all attempts are computed at once (vectorised), the first valid one is kept.

    Args:
        seed: ``runtime.seed`` (>= 0, < 2**64).
        epoch: the epoch (>= 0).
        indices: ``[N]`` dataset indices (``DatasetIndex`` order), < 2**32.
        heights, widths: ``[N]`` image sizes in pixels (from the header, orientation ignored as PIL does).
            An image of size 0 (unreadable header) gets an empty box; the loaders never decode it.

    Returns:
        A :class:`CropPlan` with one entry per index, in the order given.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    heights = np.asarray(heights, dtype=np.int64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    if not len(indices) == len(heights) == len(widths):
        raise ValueError(f"indices, heights and widths must have one length, not {len(indices)}, {len(heights)}, "
                         f"{len(widths)}")
    if epoch < 0 or (len(indices) and (indices.min() < 0 or indices.max() >= 2**32)):
        raise ValueError("epoch must be >= 0 and dataset indices in [0, 2**32)")
    key = _key(seed)
    n = len(indices)
    counter = np.zeros((n, NUM_ATTEMPTS, 4), dtype=np.uint64)
    counter[..., 0] = indices[:, None]
    counter[..., 1] = epoch
    counter[..., 2] = np.arange(NUM_ATTEMPTS)[None, :]
    counter[..., 3] = _STREAM_CROP
    u = _uniform(philox4x32(counter, key))  # [N, 10, 4]
    height, width = heights[:, None].astype(np.float64), widths[:, None].astype(np.float64)
    area = height * width
    target = area * (CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * u[..., 0])
    log_lo, log_hi = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)  # np.round: half to even, as Python's round
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    valid = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    # torch.randint(0, H - h + 1): a uniform integer; floor(u·n) with a 32-bit u is within n/2**32 of uniform.
    top = np.floor(u[..., 2] * np.maximum(heights[:, None] - h + 1, 1)).astype(np.int64)
    left = np.floor(u[..., 3] * np.maximum(widths[:, None] - w + 1, 1)).astype(np.int64)
    found = valid.any(axis=1)
    first = valid.argmax(axis=1)
    rows = np.arange(n)
    out_h, out_w = h[rows, first], w[rows, first]
    out_top, out_left = top[rows, first], left[rows, first]
    # The fallback: torchvision's centre crop (whole image, or clipped to the aspect range).
    fb_h, fb_w = heights.copy(), widths.copy()
    in_ratio = widths / np.maximum(heights, 1)
    narrow, wide = in_ratio < min(CROP_ASPECT), in_ratio > max(CROP_ASPECT)
    fb_h[narrow] = np.round(widths[narrow] / min(CROP_ASPECT)).astype(np.int64)
    fb_w[wide] = np.round(heights[wide] * max(CROP_ASPECT)).astype(np.int64)
    out_h = np.where(found, out_h, fb_h)
    out_w = np.where(found, out_w, fb_w)
    out_top = np.where(found, out_top, (heights - fb_h) // 2)
    out_left = np.where(found, out_left, (widths - fb_w) // 2)
    empty = (heights <= 0) | (widths <= 0)
    for arr in (out_top, out_left, out_h, out_w):
        arr[empty] = 0
    flip_counter = np.stack([indices, np.full(n, epoch), np.zeros(n, dtype=np.int64), np.full(n, _STREAM_FLIP)], -1)
    flip = (philox4x32(flip_counter, key)[:, 0] & np.uint64(1)).astype(bool)
    return CropPlan(top=out_top, left=out_left, height=out_h, width=out_w, flip=flip)


def plan_cutmix(seed: int, epoch: int, step: int, batch_size: int, *, height: int,
                width: int) -> tuple[float, tuple[int, int, int, int], np.ndarray]:
    """MEAL V2's CutMix draw for step ``step`` of epoch ``epoch``: λ, the box and the permutation.

    The CutMix reference's ``rand_bbox``: λ ~ Beta(1, 1) (uniform), cut ratio ``sqrt(1-λ)``, box
    ``int(H·cut) x int(W·cut)`` centred at a uniform pixel, clipped to the image. λ and the centre come
    from Philox4x32 block ``(step, epoch, 0, 2)``; the permutation sorts ``batch_size`` 32-bit words of
    blocks ``(step, epoch, k, 3)`` (a uniformly random permutation; ties, of probability < B²/2**33, break
    by position). Every rank draws the same λ and box (one box per global batch, as the reference) and
    permutes its own batch.

    Args:
        seed, epoch: as :func:`plan_crops`; ``step``: the step within the epoch (0-based).
        batch_size: this batch's size (the last batch of an epoch may be smaller).
        height, width: the image size S x S of the batch.

    Returns:
        ``(lam, (y1, y2, x1, x2), perm)``: ``lam`` is the share of each image still its own after
        clipping (``1 - box area / (H·W)``), the box is rows ``y1:y2`` and columns ``x1:x2``, ``perm``
        ``[batch_size]`` int64 says whose pixels fill the box of each row.
    """
    if step < 0 or epoch < 0 or batch_size < 1:
        raise ValueError(f"step={step}, epoch={epoch} must be >= 0 and batch_size={batch_size} >= 1")
    key = _key(seed)
    u = _uniform(philox4x32(np.array([step, epoch, 0, _STREAM_CUTMIX]), key))
    cut = math.sqrt(1.0 - float(u[0]))
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(u[1] * height), int(u[2] * width)
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    blocks = -(-batch_size // 4)
    counter = np.stack([np.full(blocks, step), np.full(blocks, epoch), np.arange(blocks),
                        np.full(blocks, _STREAM_PERM)], axis=-1)
    words = philox4x32(counter, key).reshape(-1)[:batch_size]
    perm = np.argsort(words, kind="stable").astype(np.int64)
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
    return lam, (y1, y2, x1, x2), perm
