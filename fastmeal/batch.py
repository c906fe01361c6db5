"""What one training step reads: the images, their labels and whatever the run's objective needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Batch:
    """One step's batch on the training device.

    Attributes:
        images: ``[B, 3, S, S]`` normalised crops.
        labels: ``[B]`` int64 class indices (metrics; the hard-label objective's targets).
        targets: what the objective reads besides them, by name: ``probs``/``classes`` ``[B, K]`` (a bank's
            records, added by its loader), ``teacher_logits`` ``[K, B, C]`` (added by the online objective),
            ``mix_lam`` (0-dim) / ``mix_perm`` ``[B]`` (CutMix). The trainer never looks inside.
    """

    images: Tensor
    labels: Tensor
    targets: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, item: Batch | tuple) -> Batch:
        """A loader's item as a batch: a :class:`Batch` as it is, ``(images, labels)`` wrapped."""
        return item if isinstance(item, Batch) else cls(*item)


def cutmix_(batch: Batch, *, seed: int, epoch: int, step: int) -> Batch:
    """MEAL V2's CutMix, in place: one box per batch pasted from a permutation of the batch.

    λ, the box and the permutation are :func:`fastmeal.data.plan.plan_cutmix`'s for (seed, epoch, step):
    λ ~ Beta(1, 1), a box of area ≈ (1-λ)·H·W with a uniform centre, clipped to the image (the CutMix
    reference's ``rand_bbox``). A keyed draw, not torch's RNG: a resumed run mixes exactly as the
    uninterrupted one. Teachers and student both see the mixed images; ``targets`` gains ``mix_lam`` (the
    share of each image still its own, a 0-dim fp32 tensor: a compiled step does not specialise on it)
    and ``mix_perm`` ``[B]`` (whose pixels fill each row's box), which only a hard-label loss reads.
    """
    import torch

    from fastmeal.data.common import host_to_device
    from fastmeal.data.plan import plan_cutmix

    images = batch.images
    size, _, height, width = images.shape
    lam, (y1, y2, x1, x2), perm = plan_cutmix(seed, epoch, step, size, height=height, width=width)
    perm = host_to_device(torch.from_numpy(perm), images.device)  # no wait for the GPU's queued work
    # The right side is an advanced-indexing copy, so overlapping rows read the unmixed pixels.
    images[:, :, y1:y2, x1:x2] = images[perm, :, y1:y2, x1:x2]
    batch.targets["mix_lam"] = torch.tensor(lam, dtype=torch.float32)
    batch.targets["mix_perm"] = perm
    return batch
