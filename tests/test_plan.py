"""The crop plan and the CutMix draw: known-answer Philox, purity, independence, torchvision's algorithm."""

import collections
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from fastmeal.data.common import CROP_AREA, CROP_ASPECT
from fastmeal.data.plan import NUM_ATTEMPTS, PLAN_VERSION, philox4x32, plan_crops, plan_cutmix


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32-10 (counter, key -> output)."""
    cases = [([0, 0, 0, 0], (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
             ([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
             ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0xA4093822, 0x299F31D0),
              [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])]
    for counter, key, expected in cases:
        assert philox4x32(np.array(counter), key).tolist() == expected
    batch = philox4x32(np.array([c for c, _, _ in cases[:1]] * 3), cases[0][1])  # vectorised = one by one
    assert (batch == np.array(cases[0][2])).all()


def _sizes(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(20, 600, n), rng.integers(20, 600, n)


def test_plan_is_a_pure_function_of_seed_epoch_image_and_size():
    heights, widths = _sizes(300)
    indices = np.arange(300) * 7 + 3
    plan = plan_crops(5, 2, indices, heights, widths)
    assert isinstance(PLAN_VERSION, int) and len(plan) == 300
    # Any subset, in any order, any batch split (what ranks, workers and batch sizes do) gives the same boxes.
    order = np.random.default_rng(1).permutation(300)
    for chunk in np.array_split(order, 7):
        part = plan_crops(5, 2, indices[chunk], heights[chunk], widths[chunk])
        for k, j in enumerate(chunk):
            assert part.box(k) == plan.box(j) and part.flip[k] == plan.flip[j]
    again = plan_crops(5, 2, indices, heights, widths)
    assert all(np.array_equal(getattr(again, f), getattr(plan, f)) for f in ("top", "left", "height", "width", "flip"))
    # Another epoch, seed or image gives other boxes.
    for other in (plan_crops(5, 3, indices, heights, widths), plan_crops(6, 2, indices, heights, widths),
                  plan_crops(5, 2, indices + 1, heights, widths)):
        assert (other.top != plan.top).mean() > 0.5 and (other.flip != plan.flip).mean() > 0.3


def test_boxes_lie_in_the_image_with_torchvisions_ranges():
    heights, widths = _sizes(5000, seed=2)
    plan = plan_crops(0, 0, np.arange(5000), heights, widths)
    assert (plan.top >= 0).all() and (plan.left >= 0).all() and (plan.height > 0).all() and (plan.width > 0).all()
    assert (plan.top + plan.height <= heights).all() and (plan.left + plan.width <= widths).all()
    area = (plan.height * plan.width / (heights * widths))[(heights >= 200) & (widths >= 200)]
    assert area.max() <= 1.0 and area.min() > CROP_AREA[0] * 0.95  # rounding moves boxes of small images more


def test_fallback_is_torchvisions_centre_crop():
    """A 1000x10 strip: no attempt fits, so the box is the centre crop clipped to aspect 3/4..4/3."""
    plan = plan_crops(0, 0, np.arange(4), np.array([10, 1000, 10, 30]), np.array([1000, 10, 13, 30]))
    assert plan.box(0) == (0, (1000 - 13) // 2, 10, 13)  # wide: h = H, w = round(H * 4/3)
    assert plan.box(1) == ((1000 - 13) // 2, 0, 13, 10)  # tall: w = W, h = round(W / (3/4))
    for k, (h, w) in enumerate([(10, 1000), (1000, 10)]):
        _, _, th, tw = RandomResizedCrop.get_params(torch.empty(3, h, w), list(CROP_AREA), list(CROP_ASPECT))
        assert (th, tw) == plan.box(k)[2:]


def test_attempts_follow_get_params(monkeypatch):
    """Given the same uniforms, the vectorised attempts pick torchvision's box (its loop, replayed)."""
    heights, widths = _sizes(400, seed=3)
    indices = np.arange(400)
    plan = plan_crops(9, 1, indices, heights, widths)
    counter = np.zeros((400, NUM_ATTEMPTS, 4), dtype=np.int64)
    counter[..., 0], counter[..., 1], counter[..., 2] = indices[:, None], 1, np.arange(NUM_ATTEMPTS)
    u = philox4x32(counter, (9, 0)).astype(np.float64) * 2.0**-32
    found = 0
    for n in range(400):
        h_img, w_img = int(heights[n]), int(widths[n])
        expected = None
        for a in range(NUM_ATTEMPTS):  # torchvision's loop with these draws (float64 instead of float32)
            target = h_img * w_img * (CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * u[n, a, 0])
            lo, hi = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
            aspect = math.exp(lo + (hi - lo) * u[n, a, 1])
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= w_img and 0 < h <= h_img:
                expected = (int(u[n, a, 2] * (h_img - h + 1)), int(u[n, a, 3] * (w_img - w + 1)), h, w)
                break
        if expected is not None:  # else the fallback (test_fallback_is_torchvisions_centre_crop)
            assert plan.box(n) == expected
            found += 1
    assert found > 300


def test_flip_rate_and_attempt_statistics_match_torchvision():
    n = 20000
    heights, widths = np.full(n, 120), np.full(n, 150)
    plan = plan_crops(0, 0, np.arange(n), heights, widths)
    torch.manual_seed(0)
    ref = [RandomResizedCrop.get_params(torch.empty(3, 120, 150), list(CROP_AREA), list(CROP_ASPECT))
           for _ in range(4000)]
    ref_area = np.array([h * w / (120 * 150) for _, _, h, w in ref])
    area = plan.height * plan.width / (120 * 150)
    grid = np.sort(np.concatenate([area, ref_area]))
    ks = np.abs(np.searchsorted(np.sort(area), grid, side="right") / n
                - np.searchsorted(np.sort(ref_area), grid, side="right") / len(ref_area)).max()
    assert ks < 1.95 * math.sqrt((n + len(ref_area)) / (n * len(ref_area)))
    assert abs(plan.flip.mean() - 0.5) < 3.3 * 0.5 / math.sqrt(n)


def test_unreadable_images_get_an_empty_box_and_bad_arguments_fail():
    plan = plan_crops(0, 0, np.arange(2), np.array([0, 50]), np.array([0, 40]))
    assert plan.box(0) == (0, 0, 0, 0) and plan.height[1] > 0
    with pytest.raises(ValueError, match="one length"):
        plan_crops(0, 0, np.arange(2), np.array([5]), np.array([5, 5]))
    with pytest.raises(ValueError, match="seed"):
        plan_crops(-1, 0, np.arange(1), np.array([5]), np.array([5]))


def test_cutmix_draw_is_keyed_and_well_formed():
    lam, (y1, y2, x1, x2), perm = plan_cutmix(3, 1, 7, 10, height=32, width=24)
    assert plan_cutmix(3, 1, 7, 10, height=32, width=24)[2].tolist() == perm.tolist()
    assert sorted(perm.tolist()) == list(range(10))
    assert 0 <= y1 <= y2 <= 32 and 0 <= x1 <= x2 <= 24
    assert lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / (32 * 24))
    draws = [plan_cutmix(3, 1, step, 10, height=32, width=24) for step in range(400)]
    lams = np.array([d[0] for d in draws])
    assert len({tuple(d[2].tolist()) for d in draws}) > 390  # permutations differ step to step
    assert 0.4 < np.mean([d[1] != (0, 0, 0, 0) for d in draws]) <= 1 and 0.3 < lams.mean() < 0.8
    assert plan_cutmix(3, 2, 7, 10, height=32, width=24)[2].tolist() != perm.tolist()


@pytest.mark.parametrize("seed,epoch,height,width", [(3, 1, 32, 24), (2**33 + 5, 4, 17, 40)])
def test_cutmix_box_and_permutation_are_the_reference_rules_on_the_keyed_words(seed, epoch, height, width):
    """The CutMix reference's rand_bbox written out here, fed the uniforms of Philox block (step, epoch, 0, 2)
    (key: the seed's low and high 32 bits; a uniform is word / 2**32), and the permutation that sorts the words
    of blocks (step, epoch, k, 3). Checked against the known-answer Philox above."""
    key = (seed & 0xFFFFFFFF, seed >> 32)
    for step in range(60):
        u = philox4x32(np.array([step, epoch, 0, 2]), key).astype(np.float64) / 2**32
        cut = np.sqrt(1.0 - u[0])
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(u[1] * height), int(u[2] * width)
        box = (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height),
               max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width))
        words = np.concatenate([philox4x32(np.array([step, epoch, k, 3]), key) for k in range(3)])[:10]
        lam, got_box, perm = plan_cutmix(seed, epoch, step, 10, height=height, width=width)
        assert got_box == box, step
        assert lam == 1 - (box[1] - box[0]) * (box[3] - box[2]) / (height * width)
        assert perm.dtype == np.int64
        assert perm.tolist() == sorted(range(10), key=lambda i, words=words: (int(words[i]), i))


def test_cutmix_refuses_a_negative_position_or_an_empty_batch():
    plan_cutmix(0, 0, 0, 1, height=4, width=4)  # the first step of the first epoch, a batch of one
    for step, epoch, batch in ((-1, 0, 4), (0, -1, 4), (0, 0, 0)):
        with pytest.raises(ValueError, match="must be >= 0 and batch_size"):
            plan_cutmix(0, epoch, step, batch, height=4, width=4)


def test_crop_plan_refuses_a_negative_epoch_and_indices_outside_32_bits():
    one = np.array([5])
    plan_crops(0, 0, np.array([0]), one, one)
    plan_crops(0, 0, np.array([2**32 - 1]), one, one)  # the largest index the counter holds
    for epoch, index in ((-1, 0), (0, -1), (0, 2**32)):
        with pytest.raises(ValueError, match=r"epoch must be >= 0 and dataset indices in \[0, 2\*\*32\)"):
            plan_crops(0, epoch, np.array([index]), one, one)


def _get_params(u, height, width):
    """torchvision's RandomResizedCrop.get_params written out, fed the four uniforms of each attempt ``u[a]``;
    its centre-crop fallback when no attempt fits; an image of size 0 gets the empty box. Returns the box
    and the attempt that gave it (None: the fallback)."""
    if height <= 0 or width <= 0:
        return (0, 0, 0, 0), None
    lo, hi = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    for a in range(NUM_ATTEMPTS):
        target = height * width * (CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * u[a, 0])
        aspect = math.exp(lo + (hi - lo) * u[a, 1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return (int(u[a, 2] * (height - h + 1)), int(u[a, 3] * (width - w + 1)), h, w), a
    in_ratio = width / height
    if in_ratio < min(CROP_ASPECT):
        w, h = width, int(round(width / min(CROP_ASPECT)))
    elif in_ratio > max(CROP_ASPECT):
        h, w = height, int(round(height * max(CROP_ASPECT)))
    else:
        h, w = height, width
    return ((height - h) // 2, (width - w) // 2, h, w), None


def test_boxes_of_small_strip_and_empty_images_are_get_params_with_its_fallback():
    """Images of 0-9 pixels a side and strips, where attempts give boxes of width or height 0 or of the whole
    side and many images fall back to the centre crop: every box is get_params' (written out above) on the
    uniforms of Philox blocks (index, epoch, attempt, 0); boxes and flips are int64 and bool arrays."""
    sizes = [(h, w) for h in range(10) for w in range(10)] + [(1, 40), (40, 1), (3, 25), (25, 3), (0, 40), (40, 0)]
    sizes = sizes * 4 + [(h, w) for h in range(1, 4) for w in range(1, 4)] * 20  # most 0-wide attempts: 1-3 px
    heights, widths = np.array([h for h, _ in sizes]), np.array([w for _, w in sizes])
    indices = np.arange(len(heights)) * 3 + 1
    seed, epoch = 2**32 + 11, 5
    plan = plan_crops(seed, epoch, indices, heights, widths)
    for field in ("top", "left", "height", "width"):
        assert getattr(plan, field).dtype == np.int64, field
    assert plan.flip.dtype == np.bool_
    key = (seed & 0xFFFFFFFF, seed >> 32)
    fallbacks = collections.Counter()
    for n, i in enumerate(indices):
        counter = np.array([[i, epoch, a, 0] for a in range(NUM_ATTEMPTS)])
        u = philox4x32(counter, key).astype(np.float64) / 2**32
        expected, attempt = _get_params(u, int(heights[n]), int(widths[n]))
        assert plan.box(n) == expected, (n, heights[n], widths[n])
        if attempt is None and heights[n] and widths[n]:
            ratio = widths[n] / heights[n]
            fallbacks["wide" if ratio > max(CROP_ASPECT) else "narrow" if ratio < min(CROP_ASPECT) else "whole"] += 1
    assert fallbacks["wide"] >= 3 and fallbacks["narrow"] >= 3  # the strips: both clipped fallbacks are checked


def test_the_flip_is_the_low_bit_of_the_first_word_of_block_index_epoch_0_1():
    indices = np.arange(200) * 5 + 2
    seed, epoch = 7, 3
    plan = plan_crops(seed, epoch, indices, np.full(200, 64), np.full(200, 48))
    words = philox4x32(np.array([[i, epoch, 0, 1] for i in indices]), (seed, 0))
    assert plan.flip.tolist() == [bool(w & 1) for w in words[:, 0]]
