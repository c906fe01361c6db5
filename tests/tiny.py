"""Test helpers for the scale-out tests (DDP, preemption, profiling): tiny models, data and configs.

Two kinds of runs:

* in memory: :class:`ShardedTensorLoader` hands rank ``r`` of ``W`` the ``r``-th contiguous share of
  each *global* batch, so a ``W``-rank run sees exactly the samples of a 1-process run with the same
  global batch at every step (what the DDP equivalence test needs);
* on disk: :func:`jpeg_dataset` writes a synthetic ImageFolder JPEG dataset and :func:`teacher_files`
  saves timm teachers' weights, so ``fastmeal train`` runs end to end on them (no network).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmeal.config import build_config
from fastmeal.distributed import DistInfo
from fastmeal.models.discriminator import Discriminator
from fastmeal.objectives import build_objective
from fastmeal.trainer import Trainer

# The devices a Triton kernel test runs on. Triton runs on CPU tensors only in the interpreter, which is
# switched on for the whole process (tests/conftest.py does it when there is no GPU); on the GPU machine
# the same tests run on CUDA.
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                 reason="Triton runs CPU tensors only under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]

NUM_CLASSES = 5
SIZE = 16


def assert_loss_paths_agree(out: dict, ref: dict, students: tuple, discriminators: tuple, tol: dict) -> None:
    """Two implementations of one loss (triton ``out`` vs torch ``ref``): every part, then the gradients
    of the student rows and of each discriminator after the same ``backward``."""
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], **tol)
    (1.5 * out["loss"]).backward()
    (1.5 * ref["loss"]).backward()
    torch.testing.assert_close(students[0].grad, students[1].grad, rtol=1e-4, atol=1e-7)
    for p_out, p_ref in zip(discriminators[0].parameters(), discriminators[1].parameters(), strict=True):
        torch.testing.assert_close(p_out.grad, p_ref.grad, **tol)


@pytest.fixture()
def one_intraop_thread():
    """One intra-op thread for the test: tiny convolutions gain nothing from more, and on a loaded 2-core
    machine two OpenMP threads waiting for each other made a 6-step run 10x slower (5 s instead of 0.4 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SmallNet(nn.Module):
    """conv → [BN] → ReLU → conv → ReLU → mean pool → linear, with ``num_classes`` like a timm model."""

    def __init__(self, *, batchnorm: bool = False, width: int = 8, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=not batchnorm)
        self.bn = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


class ShardedTensorLoader:
    """The Loader protocol over in-memory tensors, sharded by rank *within* each global batch.

    Epoch ``e`` visits ``randperm(N, seed=1000·seed + e)`` in global batches of ``global_batch``; rank
    ``r`` of ``W`` takes the ``r``-th contiguous ``global_batch / W`` of each (``shuffle=False``: in
    order). For val (``shard_eval=True``) rank ``r`` reads samples ``r, r + W, ...`` one batch at a
    time, like the real loaders' exact eval shard (no padding).
    """

    backend = "memory"
    num_skipped = 0

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, global_batch: int, *, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, seed: int = 0, shard_eval: bool = False) -> None:
        self.images, self.labels = images, labels
        self.batch, self.rank, self.world_size = global_batch // world_size, rank, world_size
        self.global_batch, self.shuffle, self.seed, self.shard_eval = global_batch, shuffle, seed, shard_eval
        self.num_classes = NUM_CLASSES
        self.classes = tuple(f"c{i}" for i in range(NUM_CLASSES))
        self.dataset_size = len(labels)
        self.epoch, self.start_step = 0, 0
        self.num_samples = len(self._indices())

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _indices(self) -> list[int]:
        n = len(self.labels)
        if self.shard_eval:
            return list(range(self.rank, n, self.world_size))
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
                 if self.shuffle else torch.arange(n)).tolist()
        mine = []
        for start in range(0, n, self.global_batch):
            chunk = order[start:start + self.global_batch]
            share = len(chunk) // self.world_size
            mine += chunk[self.rank * share:(self.rank + 1) * share]
        return mine

    def __len__(self) -> int:
        return -(-len(self._indices()) // self.batch)

    def __iter__(self):
        indices = self._indices()
        start, self.start_step = self.start_step, 0
        for i in range(start * self.batch, len(indices), self.batch):
            idx = torch.tensor(indices[i:i + self.batch])
            yield self.images[idx], self.labels[idx]


def make_data(num_train: int = 24, num_val: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent colour plus noise: learnable, so the loss moves; ``[N, 3, SIZE, SIZE]``, ``[N]``."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(NUM_CLASSES, (num_train + num_val,), generator=g)
    images = torch.randn(num_train + num_val, 3, SIZE, SIZE, generator=g) * 0.5
    images += (labels.float() / NUM_CLASSES).view(-1, 1, 1, 1)
    return images, labels


def make_teachers(seed: int = 7):
    """Two frozen eval-mode nets as one ensemble callable ``[B, 3, S, S] → [2, B, C]``."""
    torch.manual_seed(seed)
    teachers = [SmallNet(width=6).eval().requires_grad_(False), SmallNet(width=4).eval().requires_grad_(False)]

    def ensemble(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([t(x) for t in teachers])

    ensemble.models = teachers
    return ensemble


def tiny_config(run_dir: str | Path, **overrides):
    """The demo preset shrunk to the in-memory runs: fp32, NCHW, PyTorch loss, no progress bars."""
    base = {
        "runtime.run_dir": str(run_dir), "runtime.device": "cpu", "runtime.keep_last": 10,
        "model.num_classes": NUM_CLASSES, "model.pretrained": False,
        "precision.mode": "fp32", "precision.channels_last": "false", "loss.impl": "torch",
        "optim.lr": 0.1, "schedule.epochs": 2, "schedule.lr_steps": "", "data.batch_size": 8,
        "logging.interval": 1, "logging.progress_bar": "false",
    }
    base.update({k: str(v) for k, v in overrides.items()})
    return build_config("demo", overrides=base)


def make_trainer(cfg, *, rank: int = 0, world_size: int = 1, batchnorm: bool = False, hooks=(), seed: int = 0,
                 run_dir=None, val_loader_wrapper=None) -> Trainer:
    """A Trainer on :func:`make_data` with this rank's shards; the student is initialised from ``seed``."""
    torch.manual_seed(seed)
    student = SmallNet(batchnorm=batchnorm)
    images, labels = make_data()
    num_train = 24
    train = ShardedTensorLoader(images[:num_train], labels[:num_train], cfg.data.batch_size, rank=rank,
                                world_size=world_size)
    val = ShardedTensorLoader(images[num_train:], labels[num_train:], 4, rank=rank, world_size=world_size,
                              shuffle=False, shard_eval=True)
    if val_loader_wrapper is not None:
        val = val_loader_wrapper(val)
    objective = build_objective(cfg, teachers=make_teachers(), discriminator=Discriminator(NUM_CLASSES))
    return Trainer(cfg, student=student, objective=objective, train_loader=train, val_loader=val, hooks=hooks,
                   run_dir=run_dir,
                   dist=DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu")))


# The os functions through which a write changes the file system (and builtins/io.open).
MUTATING_OS_CALLS = ("open", "replace", "rename", "link", "unlink", "fsync", "mkdir", "rmdir", "ftruncate", "write",
                     "pwrite")


def kill_before_fs_call(n: int, counter: list[int]) -> None:
    """From now on, SIGKILL this process just before its ``n``-th file-system call (n < 0: only count them).

    For a forked child: the parent then checks what the kill left on disk. ``counter[0]`` counts the calls.
    """

    def wrap(fn):
        def wrapper(*args, **kwargs):
            if counter[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            counter[0] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in MUTATING_OS_CALLS:
        setattr(os, name, wrap(getattr(os, name)))
    builtins.open = io.open = wrap(io.open)


# --------------------------------------------------------------------------------------------
# On disk: `fastmeal train` end to end
# --------------------------------------------------------------------------------------------

DISK_CLASSES = 3


def jpeg_dataset(root: Path, *, train_per_class: int, val_per_class: int) -> Path:
    """A synthetic ImageFolder JPEG dataset with small images (36–48 px) under ``root``."""
    from fastmeal.data.synthetic import synthesize

    synthesize(root, num_classes=DISK_CLASSES, train_per_class=train_per_class, val_per_class=val_per_class, seed=0,
               size_range=(36, 48), progress=False)
    return root


def teacher_files(directory: Path, tag: str = "test_resnet", count: int = 2) -> list[Path]:
    """Weights files of ``count`` randomly initialised timm ``tag`` teachers with DISK_CLASSES outputs."""
    import timm

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        model = timm.create_model(tag, pretrained=False, num_classes=DISK_CLASSES)
        paths.append(directory / f"teacher{i}.pth")
        torch.save(model.state_dict(), paths[-1])
    return paths


def cli_train_args(data: Path, teachers: list[Path], run_dir: Path, *extra: str, tag: str = "test_resnet") -> list[str]:
    """``fastmeal train`` arguments for a tiny CPU run on :func:`jpeg_dataset` data (each ``extra`` is KEY=VALUE)."""
    settings = {
        "data.root": data, "data.image_size": 32, "data.batch_size": 4, "data.workers": 0,
        "data.backend": "torchvision", "model.student": tag, "model.pretrained": "false",
        "model.num_classes": DISK_CLASSES, "model.teachers": ",".join(f"{tag}@{p}" for p in teachers),
        "teacher_engine.fold_bn": "false", "precision.mode": "fp32", "precision.channels_last": "false",
        "loss.impl": "torch", "runtime.device": "cpu", "runtime.run_dir": run_dir, "logging.interval": 1,
        "logging.progress_bar": "false", "schedule.lr_steps": "",
    }
    args = ["train", "--preset", "demo"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    for item in extra:
        args += ["--set", item]
    return args


def cli_worker(rank: int, world_size: int, args: list[str]) -> tuple[int, str]:  # noqa: ARG001 - World's signature
    """Run ``fastmeal ARGS`` in this process (a rank of a ``gloo_world.World``); ``(exit code, stdout)``."""
    from fastmeal.cli import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(args)
    return rc, stdout.getvalue()
