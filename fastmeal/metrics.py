"""Metrics without host syncs: device-side sums read at log intervals, top-k counts, JSONL/TensorBoard output.

STYLE: "Accumulate metrics on the device and ``.item()`` only when logging: a host sync per step
costs throughput." :class:`DeviceMeans` keeps one device tensor of sums; :meth:`DeviceMeans.read`
is the only place it meets the host.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastmeal.config import ConfigError
from fastmeal.distributed import all_reduce_sum


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> Tensor:
    """How many rows have their label among the top-k logits, for each k.

    A k larger than the class count counts every row (top-5 of a 3-class problem is 100%).

    Args:
        logits: ``[B, C]``.
        labels: ``[B]`` int64 class indices.
        ks: the k values.

    Returns:
        ``[len(ks)]`` fp32 counts on the logits' device (no host sync).
    """
    max_k = min(max(ks), logits.shape[-1])
    top = logits.topk(max_k, dim=-1).indices  # [B, max_k], best first
    hits = top.eq(labels.view(-1, 1))  # [B, max_k]; at most one True per row
    cumulative = hits.cumsum(-1).clamp_(max=1).sum(0).float()  # [max_k]: rows correct within the top-(j+1)
    return torch.stack([cumulative[min(k, max_k) - 1] for k in ks])


class DeviceMeans:
    """Sample-weighted running means of named scalars, summed on the device.

    Args:
        names: the scalar names, fixed for the accumulator's life (``loss``, ``kd``, ...).
        device: where the sums live.
    """

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = tuple(names)
        self.device = device
        self._sums = torch.zeros(len(self.names) + 1, device=device, dtype=torch.float64)  # last slot: samples

    def update(self, values: Mapping[str, Tensor], num_samples: int | Tensor) -> None:
        """Add ``values`` (batch means, scalar tensors) weighted by ``num_samples``; no host sync.

        Names not in ``values`` add 0 (with their weight), so give every name at every update.
        """
        stacked = torch.stack([values[n].detach().to(self._sums.dtype).reshape(()) for n in self.names])
        # A Python number is a kernel argument; torch.as_tensor(int, device=cuda) would be a host copy.
        self._sums[:-1].add_(stacked * num_samples)
        self._sums[-1].add_(num_samples)

    def add_counts(self, values: Tensor, num_samples: int | Tensor) -> None:
        """Add already-summed counts ``values`` (``[len(names)]``) over ``num_samples`` samples; no host sync."""
        self._sums[:-1].add_(values.detach().to(self._sums.dtype))
        self._sums[-1].add_(num_samples)

    def all_finite(self, *, all_ranks: bool = False) -> bool:
        """Whether every sum since the last reset is finite (a NaN/inf loss poisons its sum): one host sync.

        Args:
            all_ranks: agree over all ranks (collective): False on every rank when any rank saw a non-finite value.
        """
        flag = (~torch.isfinite(self._sums)).any().to(torch.float64).reshape(1)
        if all_ranks:
            all_reduce_sum(flag)
        return not bool(flag.item())

    def read(self, *, reset: bool = True, all_ranks: bool = False) -> tuple[dict[str, float], int]:
        """Means since the last reset and the sample count: the one host sync.

        Args:
            reset: zero the sums afterwards.
            all_ranks: sum over all ranks first (collective: every rank must call it).

        Returns:
            ``({name: mean}, num_samples)``; means are NaN when no sample was added.
        """
        sums = self._sums.clone()
        if all_ranks:
            all_reduce_sum(sums)
        values = sums.tolist()
        if reset:
            self._sums.zero_()
        count = values[-1]
        means = {n: (v / count if count else math.nan) for n, v in zip(self.names, values[:-1], strict=True)}
        return means, int(round(count))


class MetricsWriter:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl`` and, optionally, to TensorBoard.

    Only rank 0 writes (``enabled=False`` elsewhere). Every record has a ``kind`` (``train`` per log
    interval, ``epoch`` per epoch, ``eval``, ...) and a ``global_step``.

    Args:
        run_dir: the run directory.
        enabled: False makes every method a no-op (ranks other than 0).
        tensorboard: also write scalars to ``run_dir/tensorboard`` (needs the ``tensorboard`` package).
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # an explicit request that cannot be met fails loudly (STYLE)
                raise ConfigError("logging.tensorboard=true needs TensorBoard: pip install tensorboard "
                                   "(or pip install 'fastmeal[tensorboard]')") from err
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, kind: str, record: Mapping[str, Any]) -> None:
        """Append ``{"kind": kind, **record}``; numbers also go to TensorBoard as ``kind/name``."""
        if not self.enabled:
            return
        row = {"kind": kind, **record}
        with self.path.open("a") as f:
            f.write(json.dumps(finite_json(row), default=jsonable, allow_nan=False) + "\n")
        if self._tb is not None:
            step = int(record.get("global_step", 0))
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key != "global_step":
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str | os.PathLike, kind: str | None = None, *,
               on_bad_line: Callable[[int, str], None] | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, optionally only those of one ``kind``.

    Args:
        path: the file.
        kind: keep only records of this ``kind``.
        on_bad_line: called with ``(line_number, line)`` (1-based) for each line that is not a JSON
            object, which is then skipped (a killed run leaves a partial last line); None raises.
    """
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if on_bad_line is None:
                raise
            row = None
        if not isinstance(row, dict):
            if on_bad_line is None:
                raise ValueError(f"{path}: line {number} is not a JSON object")
            on_bad_line(number, line)
            continue
        rows.append(row)
    return [r for r in rows if kind is None or r.get("kind") == kind]


def jsonable(value: Any) -> Any:
    """``json.dumps(default=...)``: tensors as lists, paths as strings."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def finite_json(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None, so that the JSON written is valid (no ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value

