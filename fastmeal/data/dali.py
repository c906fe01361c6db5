"""The fast loader: one NVIDIA DALI pipeline definition, built on the GPU (``mixed``) or CPU-only.

The graph (:func:`define_graph`) reproduces the reference's augmentation (SPEC, "Data"):

* train: the crop plan (:func:`fastmeal.data.plan.plan_crops`: RandomResizedCrop's box and the flip, a
  function of (seed, epoch, image)) enters with the paths through ``external_source``; the decoder decodes
  only that window (``fn.decoders.image_slice``, libjpeg-turbo's / nvJPEG's ROI decode) → bilinear resize
  to S×S (antialiased, as PIL) → the planned horizontal flip → normalise with the ImageNet mean/std;
* val: decode → resize the short side to R = int(256/224·S), the long side to ``floor(R·long/short)``
  (torchvision's rule) → centre crop S at torchvision's offset ``round((H-S)/2)`` (round half to even)
  → normalise.

On CUDA the decoder is ``mixed`` (nvJPEG, with ``data.dali_hw_decoder_load`` of the JPEGs sent to the
A100/H100 hardware decoder) and every later op runs on the GPU; without CUDA the **same graph** is built
with ``device_id=None`` and CPU operators, so CPU CI exercises the real DALI graph. The output is HWC
(fp16 or fp32, see :func:`fastmeal.data.common.images_dtype`), which *is* a channels-last NCHW batch.
DALI's dynamic executor hands each batch over through DLPack: on the CPU the loader gives out
``permute(0, 3, 1, 2)`` of DALI's own buffer (no copy); on the GPU one contiguous copy on torch's stream
moves it into torch-owned memory (see ``DaliLoader._to_torch``: DALI may reuse its buffer before kernels
queued on torch's stream have read it). ``mixed`` decoding uses the hardware-decoder share
``data.dali_hw_decoder_load`` and the preallocation hints of NVIDIA's ResNet-50 pipeline. Decoding follows
PIL (the reference): EXIF orientation is ignored (``adjust_orientation=False``), grayscale and CMYK JPEGs
and PNGs come out as RGB.

Which files, in which order: the same sampler as the torchvision backend
(:func:`fastmeal.data.common.build_sampler`: the reference's DistributedSampler for train, an exact
``rank::world_size`` shard for val). Its batches of paths enter the graph through ``external_source``
and are read by ``fn.io.file.read`` on DALI's threads. So the shard of rank ``shard_id`` out of
``num_shards`` is the reference's, the order of an epoch is a function of (``runtime.seed``, epoch)
(the trainer's mid-epoch resume relies on it), the partial last batch is kept (``data.last_batch=keep``,
the reference) or dropped, and val yields every image exactly once over all ranks, without padding.
DALI's own reader (``fn.readers.file`` with ``shard_id``/``num_shards``) was the first design and was
replaced: its ``shuffle_after_epoch`` order depends on how many epochs the pipeline object has run, so
a resumed run would not see the uninterrupted run's order, and its ``pad_last_batch`` pads val shards.

The pipeline lives across epochs and prefetches across epoch boundaries: the batches planned next are
those of the following epoch. ``set_epoch`` to another epoch, or a pass abandoned mid-epoch
(``runtime.max_steps_per_epoch``), discards the (at most ``data.prefetch``) batches already in flight.
No operator draws a random number: a train batch is a function of (seed, epoch, step), and a pass can start
at any step (``set_epoch(epoch, start_step)``) without reading the files of the steps before it.

Corrupt files: the error names the file (DALI's message when it does, else the in-flight batch's file
at the failing sample index, confirmed with PIL) as :class:`~fastmeal.data.common.CorruptImageError`.
With ``data.skip_corrupt=true`` the file's slot goes to the next decodable file in dataset order (the
torchvision backend's rule), now and in later epochs (in evaluation that slot is then dropped, so the file
is not counted and no image is counted twice); the pipeline, which DALI invalidates on an error,
is rebuilt and the in-flight batches are fed again. The epoch keeps its sample count and every rank its
batch count (no DDP hang).
"""

from __future__ import annotations

import logging
import re
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastmeal.config import Config
from fastmeal.data.base import LoaderBase
from fastmeal.data.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    DataError,
    Split,
    host_to_device,
    load_rgb,
    next_decodable,
)
from fastmeal.data.index import DatasetIndex
from fastmeal.data.plan import plan_crops

log = logging.getLogger(__name__)

# Scratch memory for nvJPEG and the hardware decoder, from NVIDIA's DALI ResNet-50 example: big enough for
# ImageNet's largest JPEGs, so the decoder does not reallocate during the first epoch.
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512
_PREALLOCATE_WIDTH_HINT = 5_980
_PREALLOCATE_HEIGHT_HINT = 6_430
# Every DALI pipeline this process built that still exists (its native threads with it). A child
# forked while they run can deadlock, so the torchvision backend checks this before forking workers.
# Pipelines, not loaders: a traceback that holds a failed pipeline keeps its threads alive too.
LIVE_PIPELINES: weakref.WeakSet = weakref.WeakSet()


def decoder_args(decoder_device: str, hw_decoder_load: float) -> dict[str, Any]:
    """Keyword arguments of every decoder of the graph: RGB as PIL gives it, EXIF ignored (PIL ignores it)."""
    from nvidia.dali import types

    args: dict[str, Any] = dict(device=decoder_device, output_type=types.RGB, adjust_orientation=False)
    if decoder_device == "mixed":
        args.update(hw_decoder_load=hw_decoder_load, device_memory_padding=_DEVICE_MEMORY_PADDING,
                    host_memory_padding=_HOST_MEMORY_PADDING, preallocate_width_hint=_PREALLOCATE_WIDTH_HINT,
                    preallocate_height_hint=_PREALLOCATE_HEIGHT_HINT)
    return args


def resize_flip_normalize(images: Any, mirror: Any, *, image_size: int, dali_dtype: Any) -> Any:
    """Crops of any size → ``[S, S, 3]``: bilinear antialiased resize (as PIL), flip, ImageNet normalisation."""
    from nvidia.dali import fn, types

    images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR,
                       antialias=True)
    return fn.crop_mirror_normalize(images, mirror=mirror, mean=[255.0 * m for m in IMAGENET_MEAN],
                                    std=[255.0 * s for s in IMAGENET_STD], dtype=dali_dtype, output_layout="HWC")


def define_graph(inputs: list[Any], *, train: bool, image_size: int, eval_resize: int, decoder_device: str,
                 dali_dtype: Any, hw_decoder_load: float) -> Any:
    """The DALI graph of one split, from file paths (and the crop plan) to normalised crops; call inside a ``Pipeline``.

    Args:
        inputs: DataNodes from the external source: ``[paths]`` for val, ``[paths, anchor, shape, flip]``
            for train. ``paths``: one uint8 array of the path's bytes per sample; ``anchor``: int32
            ``[left, top]``, ``shape``: int32 ``[width, height]`` (the planned box, absolute pixels);
            ``flip``: int32 0/1.
        train: the training augmentation, else the eval preprocessing (module docstring).
        image_size: S, the output side; ``eval_resize``: R, the eval short side.
        decoder_device: ``"mixed"`` (nvJPEG; every later op on the GPU) or ``"cpu"``.
        dali_dtype: output type (``types.FLOAT16`` or ``types.FLOAT``).
        hw_decoder_load: share of JPEGs for the hardware decoder (``mixed`` on A100/H100 only).

    Returns:
        DataNode of images, HWC ``[S, S, 3]`` per sample, normalised, ``dali_dtype``.
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    encoded = fn.io.file.read(inputs[0])
    args = decoder_args(decoder_device, hw_decoder_load)
    if train:
        _, anchor, shape, flip = inputs
        # Integer anchor/shape are absolute pixels in "WH" order: only the planned window is decoded.
        images = fn.decoders.image_slice(encoded, anchor, shape, axis_names="WH", **args)
        return resize_flip_normalize(images, flip, image_size=image_size, dali_dtype=dali_dtype)
    mean = [255.0 * m for m in IMAGENET_MEAN]
    std = [255.0 * s for s in IMAGENET_STD]
    # The GPU decoder's chroma upsampling differs slightly from libjpeg's; eval numbers should be the
    # reference's, so ask for libjpeg's ("fancy") upsampling there.
    images = fn.decoders.image(encoded, jpeg_fancy_upsampling=decoder_device == "mixed", **args)
    # torchvision Resize(R): short side R, long side int(R·long/short) (floor). Integer arithmetic is
    # exact where float32 could land just below an integer and lose a pixel.
    shape = fn.peek_image_shape(encoded, adjust_orientation=False, dtype=types.INT64)  # [H, W, C]
    height, width = shape[0], shape[1]
    short = dmath.min(height, width)
    new_h, new_w = (eval_resize * height) // short, (eval_resize * width) // short
    images = fn.resize(images, resize_x=fn.cast(new_w, dtype=types.FLOAT), resize_y=fn.cast(new_h, dtype=types.FLOAT),
                       interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop_mirror_normalize(images, crop=(image_size, image_size),
                                    crop_pos_x=_centre_crop_pos(new_w, image_size, dmath, fn, types),
                                    crop_pos_y=_centre_crop_pos(new_h, image_size, dmath, fn, types),
                                    mean=mean, std=std, dtype=dali_dtype, output_layout="HWC")


def _centre_crop_pos(length: Any, crop: int, dmath: Any, fn: Any, types: Any) -> Any:
    """Normalised crop position that DALI turns into torchvision's CenterCrop offset.

    torchvision: ``int(round((length - crop) / 2))`` with Python's round half to even; DALI places the
    window at ``roundf(pos · (length - crop))``, so pass ``pos = offset / (length - crop)``.
    """
    room = length - crop
    half = room // 2
    odd_room = room - 2 * half
    odd_half = half - 2 * (half // 2)
    offset = half + odd_room * odd_half  # room/2 = half + 0.5 rounds to the even one of half, half + 1
    return fn.cast(offset, dtype=types.FLOAT) / fn.cast(dmath.max(room, 1), dtype=types.FLOAT)


@dataclass
class _Batch:
    """One planned batch: its epoch, its index in the epoch and the dataset indices it reads."""

    epoch: int
    index: int
    samples: list[int]


class DaliLoader(LoaderBase):
    """Batches ``(images [B,3,S,S] channels-last view, labels [B] int64)`` on ``device`` (the Loader protocol)."""

    backend = "dali"
    install_hint = "pip install nvidia-dali-cuda120  (CUDA 13: nvidia-dali-cuda130)"

    @staticmethod
    def available() -> bool:
        from fastmeal.data import dali_available

        return dali_available()

    def __init__(self, cfg: Config, split: Split, split_name: str, *, rank: int, world_size: int,
                 device: torch.device, batch_size: int, index: DatasetIndex | None = None,
                 drop_single_last: bool = False):
        super().__init__(cfg, split, split_name, rank=rank, world_size=world_size, device=device,
                         batch_size=batch_size, index=index, drop_single_last=drop_single_last)
        self.cfg = cfg
        self.paths = split.paths
        self.labels = split.labels
        self._bad: set[str] = set(self._skipped)
        self._pipe = None
        self._queue: deque[_Batch] = deque()  # planned, not yet fed to DALI
        self._inflight: deque[_Batch] = deque()  # fed to DALI, not yet delivered
        self._next_plan = (0, 0)  # (epoch, batch index) of the next batch to plan
        # DALI batches kept alive until the copy out of them, queued on torch's stream, has run (CUDA).
        self._held: deque[tuple[torch.cuda.Event, Any]] = deque()
        self.files_fed = 0  # files handed to DALI's reader so far (tests count them)

    # -- the Loader protocol -----------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._begin_pass()  # a later set_epoch overrides; an abandoned pass still advances
        if self._pipe is None:
            self._build()
        self._start_epoch(epoch, start)
        for index in range(start, self.num_batches):
            batch, images = self._run()
            assert (batch.epoch, batch.index) == (epoch, index), "DALI delivered batches out of plan"
            labels = torch.tensor([self.labels[self.substitutes.get(i, i)] for i in batch.samples], dtype=torch.int64)
            if not self.train and any(i in self.substitutes for i in batch.samples):
                # evaluation: a corrupt file's slot (holding a stand-in) is dropped, not counted
                keep = [k for k, i in enumerate(batch.samples) if i not in self.substitutes]
                if not keep:
                    continue
                images, labels = images[keep], labels[keep]
            yield images, host_to_device(labels, self.device)

    # -- planning: which paths (and crop windows) the external source feeds --------------------

    def _plan_more(self) -> None:
        """Append the batches of the next planned epoch (prefetching runs across epoch boundaries)."""
        epoch, start = self._next_plan
        for index, samples in enumerate(self._step_batches(epoch, start), start):
            self._queue.append(_Batch(epoch, index, samples.tolist()))
        self._next_plan = (epoch + 1, 0)

    def _start_epoch(self, epoch: int, start: int) -> None:
        """Make (epoch, start) the next batch out of DALI, discarding prefetched batches of other plans."""
        upcoming = self._inflight[0] if self._inflight else (self._queue[0] if self._queue else None)
        if upcoming is not None and (upcoming.epoch, upcoming.index) == (epoch, start):
            return
        self._queue.clear()
        self._next_plan = (epoch, start)
        stale = len(self._inflight)
        for _ in range(stale):  # decoded already or being decoded: run them out of the pipeline
            self._run()

    def _feed_next(self) -> np.ndarray:
        """Move the next planned batch in flight; the dataset indices of the files it reads."""
        if not self._queue:
            self._plan_more()
        batch = self._queue.popleft()
        self._inflight.append(batch)
        reads = np.array([self.substitutes.get(i, i) for i in batch.samples], dtype=np.int64)
        self.files_fed += len(reads)
        return reads

    def _encoded_paths(self, reads: np.ndarray) -> list[np.ndarray]:
        return [np.frombuffer(self.paths[i].encode(), dtype=np.uint8) for i in reads.tolist()]

    def _source(self) -> tuple[Any, ...]:
        """DALI's external source: the next planned batch.

        val: ``(paths,)``; train: ``(paths, anchor [B,2], shape [B,2], flip [B])`` with the planned boxes
        of the files actually read (a corrupt file's substitute is cropped with its own plan).
        """
        reads = self._feed_next()
        paths = self._encoded_paths(reads)
        if not self.train:
            return (paths,)
        plan = plan_crops(self.seed, self._inflight[-1].epoch, reads, self.index.heights[reads],
                          self.index.widths[reads])
        anchor = np.stack([plan.left, plan.top], axis=1).astype(np.int32)
        shape = np.stack([plan.width, plan.height], axis=1).astype(np.int32)
        return paths, anchor, shape, plan.flip.astype(np.int32)

    def _input_types(self) -> list[Any]:
        """DALI types of what :meth:`_source` returns."""
        from nvidia.dali import types

        return [types.UINT8, types.INT32, types.INT32, types.INT32] if self.train else [types.UINT8]

    # -- running DALI --------------------------------------------------------------------------

    def _build(self) -> None:
        from nvidia.dali import Pipeline, fn, types

        on_gpu = self.device.type == "cuda"
        data = self.cfg.data
        # DALI has no bfloat16: bf16 batches leave DALI as fp32 and are rounded once on the device.
        dali_dtype = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        seed = int(np.random.SeedSequence([self.cfg.runtime.seed, self.rank]).generate_state(1)[0] & 0x7FFFFFFF)
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, data.workers),
                        device_id=_cuda_index(self.device) if on_gpu else None, seed=seed,
                        prefetch_queue_depth=data.prefetch)
        # The callback holds the loader weakly: no pipeline <-> loader cycle, so dropping the loader frees
        # the pipeline and its threads at once.
        ref = weakref.ref(self)
        with pipe:
            types_in = self._input_types()
            inputs = fn.external_source(source=lambda: ref()._source(), num_outputs=len(types_in), batch=True,
                                        dtype=types_in)
            images = self._define(list(inputs), decoder_device="mixed" if on_gpu else "cpu", dali_dtype=dali_dtype)
            pipe.set_outputs(images)
        pipe.build()
        self._pipe = pipe
        LIVE_PIPELINES.add(pipe)

    def _define(self, inputs: list[Any], *, decoder_device: str, dali_dtype: Any) -> Any:
        data = self.cfg.data
        return define_graph(inputs, train=self.train, image_size=data.image_size,
                            eval_resize=data.resolved_eval_resize, decoder_device=decoder_device,
                            dali_dtype=dali_dtype, hw_decoder_load=data.dali_hw_decoder_load)

    def _drop_pipeline(self) -> None:
        """Forget the pipeline; what it had been fed but not delivered goes back to the front of the plan."""
        self._pipe = None
        self._queue.extendleft(reversed(self._inflight))
        self._inflight.clear()

    def _run(self) -> tuple[_Batch, torch.Tensor]:
        """The next batch out of DALI, as ``(plan, images [B,3,S,S])``; decode errors are handled here."""
        while True:
            try:
                (images,) = self._pipe.run()
                break
            except RuntimeError as err:
                self._recover(err)
        return self._inflight.popleft(), self._to_torch(images)

    def _recover(self, err: RuntimeError) -> None:
        """Name the file DALI failed on; with skip_corrupt, reassign its slot and rebuild the pipeline."""
        message = str(err)
        culprit = self._culprit(message)
        self._drop_pipeline()  # DALI invalidates a pipeline after an error
        # DALI's traceback holds the dead pipeline (and its threads) for as long as the error lives; the
        # message is all that is needed from it.
        err = err.with_traceback(None)
        if culprit is None:
            raise DataError(f"the DALI pipeline failed on no identifiable file: {message}") from err
        path = self.paths[culprit]
        if not self.cfg.data.skip_corrupt:
            raise CorruptImageError(f"cannot decode image file {path} (DALI: {_failure_line(message)}); set "
                                    "data.skip_corrupt=true to skip such files") from err
        self._bad.add(path)
        self.substitutes[culprit] = next_decodable(self.paths, culprit + 1, self._bad)
        self._skipped.add(path)
        log.warning("skipped corrupt image %s (data.skip_corrupt=true; %d skipped so far); %s", path,
                    len(self._skipped), f"its slot holds {self.paths[self.substitutes[culprit]]}" if self.train
                    else "not evaluated: the val total is smaller by the skipped files")
        self._build()  # fed the in-flight batches again, with the substitute in the bad file's slot

    def _culprit(self, message: str) -> int | None:
        """The dataset index of the file DALI could not read or decode, or None."""
        files = {self.substitutes.get(i, i) for batch in self._inflight for i in batch.samples}
        named = [i for i in files if self.paths[i] in message]
        if named:
            return max(named, key=lambda i: len(self.paths[i]))  # "x/a.JPEG" is also in "x/ba.JPEG"'s message
        # io.file.read leaves no source info, so the decoder says "sample #k" without a name: the k-th
        # file of an in-flight batch (the oldest first), confirmed by PIL failing on it too.
        match = re.search(r"#(\d+)", message)
        if match is not None:
            k = int(match.group(1))
            for batch in self._inflight:
                if k < len(batch.samples):
                    index = self.substitutes.get(batch.samples[k], batch.samples[k])
                    try:
                        load_rgb(self.paths[index])
                    except CorruptImageError:
                        return index
        # No name and no usable sample number (e.g. a text file named .JPEG: "no identifiable file"): the
        # first in-flight file that PIL cannot decode either.
        for batch in self._inflight:
            for i in batch.samples:
                index = self.substitutes.get(i, i)
                try:
                    load_rgb(self.paths[index])
                except CorruptImageError:
                    return index
        return None

    def _to_torch(self, images: Any) -> torch.Tensor:
        """DALI's batch as ``[B, 3, S, S]`` channels-last, in memory that torch owns on the GPU.

        DALI's default (dynamic) executor hands its output over through DLPack. On the CPU that buffer is
        shared as is: work on it runs at once, and the tensor keeps it alive. On the GPU, kernels queued on
        torch's stream (the copy into the teachers' static input, CutMix, a cast) run later than Python
        drops the tensor, and DALI may by then have given the memory to a later batch on its own stream.
        So the batch is copied, on torch's current stream (which DLPack made wait for DALI's work), into a
        torch-owned buffer that torch's allocator keeps safe; the DALI batch is held until that copy has
        run (an event). The copy is a plain contiguous pass (HWC per sample is channels-last NCHW) and
        also does the bf16 cast. The older executor recycles its buffers: its batch is copied out by
        ``feed_ndarray``, which waits for the copy.
        """
        batch, images = images, images.as_tensor()
        if getattr(self._pipe, "exec_dynamic", False):  # DALI >= 1.44
            if self.device.type == "cuda":
                return self._copy_on_torch_stream(images, keep=batch)
            out = torch.from_dlpack(images)
        else:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            staged = torch.float16 if self.dtype == torch.float16 else torch.float32  # what _build asked DALI for
            out = torch.empty(images.shape(), dtype=staged, device=self.device)
            feed_ndarray(images, out, cuda_stream=torch.cuda.current_stream(self.device) if self.device.type == "cuda"
                         else None)
        # out is [B, S, S, 3]: HWC per sample is NHWC for the batch, and its NCHW view is channels-last.
        return out.permute(0, 3, 1, 2).to(self.dtype)  # .to: bf16 only (DALI has no bf16), a no-op otherwise


    def _copy_on_torch_stream(self, images: Any, *, keep: Any) -> torch.Tensor:
        """``images`` (DALI's dense GPU tensor) copied into a new channels-last torch tensor on torch's stream;
        ``images`` and ``keep`` (the tensor list it came from) are held until the copy has run."""
        while self._held and self._held[0][0].query():  # copies that have run: their DALI batches can go
            self._held.popleft()
        with torch.cuda.device(self.device):  # DLPack orders DALI's stream before torch's current one
            shared = torch.from_dlpack(images)  # [B, S, S, 3]
            batch, height, width, channels = shared.shape
            out = torch.empty((batch, channels, height, width), dtype=self.dtype, device=self.device,
                              memory_format=torch.channels_last)
            out.copy_(shared.permute(0, 3, 1, 2))
            done = torch.cuda.Event()
            done.record()
        self._held.append((done, (keep, images, shared)))
        return out


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _failure_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if "ailed" in line]
    return lines[0] if lines else message.strip().splitlines()[-1]
