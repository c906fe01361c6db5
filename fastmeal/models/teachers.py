"""The frozen teacher ensemble: BN folded, channels-last, FP16/BF16, optionally CUDA-graphed or compiled.

Teachers are 73% of a MEAL V2 step's FLOPs at 224 px (SPEC, "Compute per training image": SENet154
41.5 + ResNet-152s 25.8 of 92 GFLOP), so this module decides most of the step time. Every choice
here changes speed only, never the function: the teachers compute the same logits as the
reference's eager FP32 NCHW teachers, up to rounding.

* **Frozen, eval mode.** Teachers see ``x`` with BatchNorm on running statistics (SPEC step 1).
  Parameters have ``requires_grad=False``; :meth:`TeacherEnsemble.train` cannot switch them back to
  training mode; the ensemble is *not* an ``nn.Module``, so it cannot become a submodule of
  anything the trainer saves, wraps in DDP or hands to the optimizer (SPEC: teachers are never
  saved).
* **no_grad, not inference_mode.** The logits feed the loss as constants; tensors made under
  ``torch.inference_mode`` cannot be saved for a later backward, while ``no_grad`` tensors can. The
  parameters need no gradient either way.
* **BN folding** (:func:`fold_batchnorm`): an eval-mode BatchNorm right after a convolution is an
  affine map per output channel, so it folds into the convolution's weight and bias. Pairs are found
  on the dataflow graph that ``torch.fx`` traces (timm's own leaf modules and functions kept opaque),
  so a BatchNorm is folded only when its input is exactly a convolution's output that nothing else
  reads. Anything else is left as it is and reported with the reason.
* **Layout and precision.** The whole teacher is cast to the engine dtype (FP16 on CUDA by default,
  BF16 by option, FP32 on the CPU — the caller decides) after folding, so folded weights are
  rounded once. Channels-last is chosen per teacher (SENet154 sometimes runs faster in NCHW).
* **fp32 classifier.** In fp16/bf16 each teacher's classifier (its final Linear) runs in fp32 on the
  pooled features and the logits stay fp32: bf16 would round logits of 16–32 to multiples of 0.125.
* **CUDA graphs** (:class:`GraphCache`): one graph per input shape, captured after warm-up on a side
  stream, with a static input buffer and a static output ``[K, B, C]``. ``fastmeal train`` captures the
  per-rank batch shape when the ensemble is built, before any loader thread runs; a shape that no
  graph covers later runs eagerly rather than being captured mid-training. Copying the batch into the
  static buffer is the only copy between loader and teachers (``copy_`` also converts dtype and
  layout when the loader did not). A partial last batch is **padded**: it is copied into the first
  rows of the smallest captured graph with a larger batch and the graph replays as usual; the rows
  past the batch hold the previous batch's images, which is harmless because every teacher op in
  eval mode is per sample. Padding costs one full-batch teacher pass once per epoch, instead of a
  new capture (seconds, and more graph memory) or an eager pass on uncaptured shapes.
* ``compile=True`` wraps each teacher in ``torch.compile(dynamic=False)``; with ``cuda_graph`` the
  compiled code is what gets captured.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.fx as fx
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

# Convolutions whose forward is ``conv2d(x', W, b)`` with ``W`` and ``b`` used as stored (after an
# optional input padding, as timm's TF-"same" ``Conv2dSame``): scaling ``W`` per output channel and
# adding to ``b`` is then exactly a per-channel affine map of the output. Weight-standardising convs
# (timm's ``StdConv2d``) transform ``W`` in forward and must not be folded into.
_FOLDABLE_CONV_FORWARDS = (nn.Conv2d.forward, Conv2dSame.forward)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold_batchnorm` did to one model.

    Attributes:
        folded: ``(conv_name, bn_name)`` pairs that were folded, in forward order.
        left: ``{bn_name: reason}`` for every BatchNorm left in place.
    """

    folded: tuple[tuple[str, str], ...] = ()
    left: dict[str, str] = field(default_factory=dict)

    @property
    def num_folded(self) -> int:
        return len(self.folded)

    @property
    def num_left(self) -> int:
        return len(self.left)


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's registries of modules and functions that symbolic tracing must not enter."""
    try:  # timm >= 1.0.8 or so
        from timm.layers._fx import get_notrace_functions, get_notrace_modules

        return tuple(get_notrace_modules()), tuple(get_notrace_functions())
    except ImportError:
        pass
    try:  # older timm kept them in its feature-extraction module
        from timm.models._features_fx import _autowrap_functions, _leaf_modules

        return tuple(_leaf_modules), tuple(_autowrap_functions)
    except ImportError:  # tracing still works for the SPEC's teachers: Conv2d and BN subclasses are leaves
        return (), ()


class _Tracer(fx.Tracer):
    """An fx tracer that keeps convolutions, BatchNorms and timm's untraceable modules opaque.

    timm registers modules and functions that symbolic tracing cannot go through (``Conv2dSame``
    computes its padding from the input size, ``BatchNormAct2d`` asserts on ``x.ndim``); its feature
    extractor traces with them as leaves, and so do we.
    """

    def __init__(self) -> None:
        leaf_types, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.Conv2d | _BatchNorm) or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _folded_replacement(bn: nn.Module) -> nn.Module | None:
    """What stands in for a folded BatchNorm: nothing, or the activation a ``BatchNormAct2d`` carries."""
    forward = type(bn).forward
    if isinstance(bn, nn.BatchNorm2d) and forward is _BatchNorm.forward:
        return nn.Identity()
    if isinstance(bn, BatchNormAct2d) and forward is BatchNormAct2d.forward:
        # BatchNormAct2d.forward is batch_norm → drop → act; the affine part moves into the conv.
        return nn.Sequential(bn.drop, bn.act)
    return None


def _why_not_foldable(node: fx.Node, modules: dict[str, nn.Module], calls: collections.Counter) -> str | None:
    """Why the BatchNorm called at ``node`` cannot be folded into its input, or None if it can."""
    bn = modules[node.target]
    if _folded_replacement(bn) is None:
        return f"{type(bn).__name__} is not a BatchNorm2d/BatchNormAct2d with the stock forward"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics: it normalises with batch statistics even in eval mode"
    if calls[node.target] != 1:
        return f"called {calls[node.target]} times in forward"
    if len(node.args) != 1 or node.kwargs:
        return "called with extra arguments"
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_module":
        what = f"{src.op} {src.target}" if isinstance(src, fx.Node) else repr(src)
        return f"its input is not a module's output ({what})"
    conv = modules[src.target]
    if not isinstance(conv, nn.Conv2d):
        return f"its input comes from {src.target} ({type(conv).__name__}), not a Conv2d"
    if type(conv).forward not in _FOLDABLE_CONV_FORWARDS or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        return f"its input conv {src.target} is a {type(conv).__name__}, whose forward transforms its weight"
    if calls[src.target] != 1:
        return f"its input conv {src.target} is called {calls[src.target]} times in forward"
    if len(src.users) != 1:
        others = sorted(str(u) for u in src.users if u is not node)
        return f"the output of conv {src.target} is also read by {', '.join(others)}"
    if conv.out_channels != bn.num_features:
        return f"conv {src.target} has {conv.out_channels} output channels, BatchNorm {bn.num_features}"
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> FoldReport:
    """Fold every eval-mode BatchNorm that directly follows a Conv2d into that conv, in place.

    For ``y = BN(conv(x))`` with running mean ``μ``, variance ``σ²``, ``ε``, scale ``γ``, shift ``β``:
    ``W' = W · γ/√(σ²+ε)`` per output channel and ``b' = (b − μ) · γ/√(σ²+ε) + β``. The arithmetic is
    done in float64 and rounded once to the parameters' dtype. A plain ``BatchNorm2d`` is replaced by
    ``nn.Identity``; timm's ``BatchNormAct2d`` by its own ``drop → act`` (the affine part is folded,
    the activation kept). Covers the blocks of the SPEC's teachers: ResNet deep stems and downsample
    paths (``nn.Sequential`` conv → bn), SE bottlenecks with grouped convs, EfficientNet's
    depthwise/SE blocks with TF-"same" padding (``Conv2dSame``).

    Args:
        model: a module in eval mode (folding is only valid for inference).

    Returns:
        What was folded and, for each BatchNorm left, why.

    Raises:
        ValueError: if ``model`` is in training mode.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (BN folding uses running statistics); "
                         "call model.eval() first")
    modules = dict(model.named_modules())
    bn_names = [name for name, m in modules.items() if isinstance(m, _BatchNorm)]
    if not bn_names:
        return FoldReport()
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any trace failure means "fold nothing", reported per BN
        reason = f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err})"
        return FoldReport(left={name: reason for name in bn_names})

    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs, left = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in modules or not isinstance(modules[node.target], _BatchNorm):
            continue
        reason = _why_not_foldable(node, modules, calls)
        if reason is None:
            pairs.append((node.args[0].target, node.target))
        else:
            left[node.target] = reason
    called = set(calls)
    left.update({name: "not called in the traced forward" for name in bn_names if name not in called})

    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        f64 = torch.float64
        weight, bias = fuse_conv_bn_weights(
            conv.weight.to(f64), None if conv.bias is None else conv.bias.to(f64),
            bn.running_mean.to(f64), bn.running_var.to(f64), bn.eps,
            None if bn.weight is None else bn.weight.to(f64), None if bn.bias is None else bn.bias.to(f64))
        dtype = conv.weight.dtype
        conv.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        _set_submodule(model, bn_name, _folded_replacement(bn))
    return FoldReport(folded=tuple(pairs), left=left)


# --------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------


class _Replayable(Protocol):
    def replay(self) -> None: ...


def capture_cuda_graph(fn: Callable[[], Any], *, device: torch.device, pool: Any = None,
                       warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Warm ``fn`` up on a side stream, then capture one call of it into a CUDA graph.

    The warm-up runs outside the capture so that lazy initialisation (cuDNN autotuning, workspace
    allocation, torch.compile's first call) does not end up in the graph (PyTorch's CUDA-graph
    recipe). ``pool`` shares one memory pool between the ensemble's graphs; that is safe because
    they replay one after another on one stream and none returns memory from the pool (their inputs
    and outputs are allocated outside it).

    Args:
        fn: reads static inputs and writes static outputs; its return value is ignored.
        device: the CUDA device.
        pool: a memory-pool handle (``graph.pool()`` of an earlier capture) or None for a new one.
        warmup: calls of ``fn`` on the side stream before capture.

    Returns:
        The captured graph; ``graph.replay()`` runs ``fn`` on the current stream.
    """
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}; use cuda_graph=False")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the loader's threads (DALI, pin-memory) keep using CUDA while this thread captures;
    # in the default "global" mode their calls would abort the capture.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        fn()
    return graph


@dataclass
class _Captured:
    graph: _Replayable
    static_in: Tensor  # [Bg, 3, S, S]
    static_out: Tensor  # [K, Bg, C]

    @property
    def batch(self) -> int:
        return self.static_in.shape[0]


class GraphCache:
    """CUDA-graph replay of ``forward_into`` with one graph per input shape; partial batches padded.

    Args:
        forward_into: ``forward_into(x, out)`` computes the ``[K, B, C]`` logits of ``x`` ``[B, ...]``
            into ``out`` (allocating it when ``out`` is None) and returns it.
        device: where the static buffers live.
        input_dtype: dtype of the static input buffer (the teachers' dtype).
        input_memory_format: layout of the static input buffer.
        capture: ``capture(fn, device=, pool=) -> graph`` (:func:`capture_cuda_graph`; tests pass a
            fake that returns an object whose ``replay()`` calls ``fn``).
    """

    def __init__(self, forward_into: Callable[[Tensor, Tensor | None], Tensor], *, device: torch.device,
                 input_dtype: torch.dtype, input_memory_format: torch.memory_format,
                 capture: Callable[..., _Replayable] = capture_cuda_graph) -> None:
        self._forward_into = forward_into
        self._device = device
        self._dtype = input_dtype
        self._memory_format = input_memory_format
        self._capture_fn = capture
        self._graphs: dict[tuple[int, ...], _Captured] = {}
        self._partial_out: dict[tuple[int, ...], Tensor] = {}
        self._pool: Any = None
        self.num_padded_calls = 0
        self.num_eager_calls = 0
        self._eager_out: dict[tuple[int, ...], Tensor] = {}
        self.sealed = False  # set by capture(): no capture after that (the loaders' threads may be running)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The input shapes a graph was captured for, in capture order."""
        return list(self._graphs)

    def __call__(self, images: Tensor) -> Tensor:
        """Replay the graph for ``images`` ``[B, ...]``; returns the static ``[K, B, C]`` output.

        The returned tensor is overwritten by the next call with the same shape: read it first.
        """
        batch, tail = images.shape[0], tuple(images.shape[1:])
        entry = self._graphs.get(tuple(images.shape))
        if entry is None:
            larger = [e for key, e in self._graphs.items() if key[1:] == tail and key[0] > batch]
            if larger:
                entry = min(larger, key=lambda e: e.batch)
            elif self.sealed:
                return self._eager(images)
            else:
                entry = self._capture(images)
        # The one copy between the loader and the teachers; converts dtype/layout in the same pass.
        entry.static_in[:batch].copy_(images)
        entry.graph.replay()
        if batch == entry.batch:
            return entry.static_out
        self.num_padded_calls += 1
        key = (batch, *tail)
        out = self._partial_out.get(key)
        if out is None:
            out = self._partial_out[key] = torch.empty_like(entry.static_out[:, :batch],
                                                            memory_format=torch.contiguous_format)
        # A contiguous [K, b, C] for the loss kernel, not the strided view of the first b rows.
        out.copy_(entry.static_out[:, :batch])
        return out

    def capture(self, shapes: Sequence[tuple[int, ...]]) -> None:
        """Capture one graph per input shape now, on zero batches, and capture no other shape later.

        For the start of a run, before any loader runs: a capture while DALI's or the pin-memory threads
        use CUDA can be invalidated by their ``cudaFree`` or synchronisation even in ``thread_local`` mode.
        After this, a batch that no graph covers (larger than every captured one, or another image size)
        runs eagerly, with one warning per shape, instead of capturing in the middle of training.
        """
        for shape in shapes:
            shape = tuple(int(n) for n in shape)
            if shape not in self._graphs:
                self._capture(torch.zeros(shape, dtype=self._dtype, device=self._device))
        self.sealed = True

    def _eager(self, images: Tensor) -> Tensor:
        key = tuple(images.shape)
        if key not in self._eager_out:
            log.warning("teacher batch shape %s has no CUDA graph (captured at start: %s); it runs eagerly", key,
                        self.shapes)
        self.num_eager_calls += 1
        x = images.to(dtype=self._dtype, memory_format=self._memory_format)
        self._eager_out[key] = self._forward_into(x, self._eager_out.get(key))
        return self._eager_out[key]

    def _capture(self, images: Tensor) -> _Captured:
        static_in = torch.empty(images.shape, dtype=self._dtype, device=self._device,
                                memory_format=self._memory_format)
        static_in.copy_(images)
        # An eager pass allocates the static output outside the graph pool (and is the first warm-up).
        static_out = self._forward_into(static_in, None)
        graph = self._capture_fn(lambda: self._forward_into(static_in, static_out), device=self._device,
                                 pool=self._pool)
        if self._pool is None and hasattr(graph, "pool"):
            self._pool = graph.pool()
        entry = self._graphs[tuple(images.shape)] = _Captured(graph, static_in, static_out)
        return entry


# --------------------------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------------------------


class Float32Head(nn.Module):
    """A teacher's classifier kept in fp32 inside a half-precision teacher: fp32 input, fp32 weights, fp32 logits.

    bf16 has 8 bits of mantissa: logits of magnitude 16–32 round to multiples of 0.125, which moves the
    softmax targets by up to ~10%; fp16 rounds them to 1/64. The classifier is one matmul per image
    (2048 × 1000 for ResNets), so computing it in fp32 costs nothing measurable and the soft targets keep
    fp32 precision given the pooled features.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head.float()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x.float())


def _find_head(model: nn.Module) -> str | None:
    """The module name of a teacher's classifier (timm's ``get_classifier()``), or None when it is not a Linear."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        # Not a timm model: the last Linear that outputs the model's classes.
        classes = getattr(model, "num_classes", None)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == classes]
        head = linears[-1] if linears else None
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head and name), None)


def cast_keeping_head_fp32(model: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format) -> str | None:
    """Cast ``model`` to ``dtype`` and ``memory_format`` in place, its classifier left fp32 in a :class:`Float32Head`.

    The head is taken out before the cast, so its weights are never rounded. Returns the head's module
    name, or None when no Linear classifier was found (then everything is cast).
    """
    name = _find_head(model)
    head = model.get_submodule(name) if name is not None else None
    if head is not None:
        _set_submodule(model, name, nn.Identity())
    model.to(dtype=dtype, memory_format=memory_format)
    if head is not None:
        _set_submodule(model, name, Float32Head(head))
    return name


def _teacher_name(model: nn.Module, index: int) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if isinstance(arch, str) and arch:
        return f"{arch}.{tag}" if tag else arch
    return f"{type(model).__name__}[{index}]"


class TeacherEnsemble:
    """K frozen teachers that map a normalised batch ``[B, 3, S, S]`` to stacked logits ``[K, B, C]``.

    The modules are taken over and changed in place (folded, cast, moved, frozen): pass copies if
    the originals are still needed.

    Args:
        models: the K teachers, in the order of the output's first dimension.
        device: where they run.
        dtype: their parameter and activation dtype (fp16 on CUDA, bf16 by option, fp32 on the CPU). In
            fp16/bf16 each teacher's classifier stays fp32 and the logits are fp32 (:class:`Float32Head`).
        channels_last: one flag for all teachers or one per teacher.
        fold_bn: fold eval-mode BatchNorms into the preceding convolutions (:func:`fold_batchnorm`).
        cuda_graph: replay one CUDA graph per input shape (:class:`GraphCache`); needs CUDA.
        compile: wrap each teacher in ``torch.compile(dynamic=False)``.

    Raises:
        ValueError: no teachers, a per-teacher flag list of the wrong length, an unsupported dtype,
            CUDA graphs without a CUDA device, or teachers that disagree on ``num_classes``.
    """

    def __init__(self, models: Sequence[nn.Module], *, device: torch.device | str,
                 dtype: torch.dtype = torch.float32, channels_last: bool | Sequence[bool] = True,
                 fold_bn: bool = True, cuda_graph: bool = False, compile: bool = False) -> None:
        models = list(models)
        if not models:
            raise ValueError("TeacherEnsemble needs at least one teacher (model.teachers is empty)")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"teacher {i} is a {type(m).__name__}, not an nn.Module")
        flags = [bool(channels_last)] * len(models) if isinstance(channels_last, bool) else list(channels_last)
        if len(flags) != len(models):
            raise ValueError(f"channels_last has {len(flags)} entries for {len(models)} teachers; "
                             "give one flag or one per teacher (model.teachers[].channels_last)")
        if dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"teacher dtype {dtype} is not supported; use one of {_SUPPORTED_DTYPES}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {self.device} "
                             "(teacher_engine.cuda_graph=false on the CPU)")
        self.dtype = dtype
        self.fold_bn = fold_bn
        self.compile = compile
        self.names = tuple(_teacher_name(m, i) for i, m in enumerate(models))
        self._models = tuple(models)
        self._formats = tuple(torch.channels_last if f else torch.contiguous_format for f in flags)
        self._folds: list[FoldReport | None] = []
        self._fp32_heads: list[str | None] = []
        for model, fmt in zip(models, self._formats, strict=True):
            model.eval()
            model.requires_grad_(False)
            # Fold on the device (its float64 arithmetic is seconds on a CPU for SENet154's 115M
            # parameters) and before the cast, so that folded weights are rounded to fp16/bf16 once.
            model.to(device=self.device)
            self._folds.append(fold_batchnorm(model) if fold_bn else None)
            if dtype in _HALF_DTYPES:
                self._fp32_heads.append(cast_keeping_head_fp32(model, dtype, fmt))
            else:
                model.to(dtype=dtype, memory_format=fmt)
                self._fp32_heads.append(None)
        # The logits' dtype: fp32 when every half-precision teacher kept its head in fp32.
        self.logits_dtype = torch.float32 if dtype in _HALF_DTYPES and all(self._fp32_heads) else dtype
        self._runners: tuple[Callable[[Tensor], Tensor], ...] = tuple(
            torch.compile(m, dynamic=False) if compile else m for m in models)
        # The batch layout the loader should produce: channels-last if any teacher reads it (the
        # student is channels-last too); a teacher with the other layout converts its own copy.
        self.input_memory_format = torch.channels_last if any(flags) else torch.contiguous_format
        self._num_classes = self._declared_num_classes()
        self._outputs: dict[int, Tensor] = {}
        self._graphs = self._make_graph_cache() if cuda_graph else None

    # ---- properties ---------------------------------------------------------------------------

    @property
    def models(self) -> tuple[nn.Module, ...]:
        """The (folded, cast, frozen) teacher modules, in output order."""
        return self._models

    @property
    def num_teachers(self) -> int:
        return len(self._models)

    @property
    def num_classes(self) -> int | None:
        """C; from the teachers' ``num_classes`` attribute, or from the first call when they lack it."""
        return self._num_classes

    @property
    def cuda_graph(self) -> bool:
        return self._graphs is not None

    @property
    def channels_last(self) -> tuple[bool, ...]:
        return tuple(f == torch.channels_last for f in self._formats)

    @property
    def report(self) -> dict[str, Any]:
        """A JSON-able summary for the run log: folding per teacher, layout, dtype, graph status."""
        teachers = []
        for name, fold, fmt, head in zip(self.names, self._folds, self._formats, self._fp32_heads, strict=True):
            teachers.append({
                "name": name,
                "channels_last": fmt == torch.channels_last,
                "fp32_head": head,
                "bn_folded": fold.num_folded if fold else 0,
                "bn_left": fold.num_left if fold else None,
                "bn_left_reasons": dict(fold.left) if fold else {},
            })
        return {
            "num_teachers": self.num_teachers,
            "num_classes": self._num_classes,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "logits_dtype": str(self.logits_dtype).removeprefix("torch."),
            "input_memory_format": "channels_last" if self.input_memory_format == torch.channels_last else "nchw",
            "fold_bn": self.fold_bn,
            "compile": self.compile,
            "cuda_graph": {
                "enabled": self.cuda_graph,
                "captured_shapes": [list(s) for s in self._graphs.shapes] if self._graphs else [],
                "padded_calls": self._graphs.num_padded_calls if self._graphs else 0,
                "partial_batch": "padded into the smallest larger captured graph" if self._graphs else None,
            },
            "teachers": teachers,
        }

    # ---- frozen: no training mode, no gradients ----------------------------------------------

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """Kept for ``nn.Module``-like call sites: the teachers stay in eval mode whatever ``mode`` is."""
        self._ensure_eval()
        return self

    def eval(self) -> TeacherEnsemble:
        self._ensure_eval()
        return self

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every teacher parameter (all with ``requires_grad=False``)."""
        for m in self._models:
            yield from m.parameters()

    def _ensure_eval(self) -> None:
        # K attribute reads per step; a stray teacher.train() elsewhere is undone before it matters.
        for m in self._models:
            if m.training:
                m.eval()

    # ---- forward -------------------------------------------------------------------------------

    def __call__(self, images: Tensor) -> Tensor:
        """Logits of every teacher for one batch.

        Args:
            images: ``[B, 3, S, S]`` normalised images on the ensemble's device. In the teachers'
                dtype and :attr:`input_memory_format` nothing is converted; otherwise the batch is
                converted once per layout the teachers need (in the graph path: while being copied
                into the static buffer).

        Returns:
            ``[K, B, C]`` logits in :attr:`logits_dtype` (fp32 for fp16/bf16 teachers, whose classifiers
            run in fp32: :class:`Float32Head`), ``out[k]`` from ``models[k]``, contiguous,
            with ``requires_grad=False``. The tensor is a preallocated buffer that the next call with
            the same batch size overwrites: use it (or clone it) before calling again.
        """
        if images.dim() != 4:
            raise ValueError(f"teachers take a [B, C, H, W] batch, got shape {tuple(images.shape)}")
        if images.device != self.device:
            raise ValueError(f"the batch is on {images.device} but the teachers are on {self.device}; "
                             "the loader must deliver batches on the training device")
        self._ensure_eval()
        # The teachers run in their own dtype: an autocast region around the call (a trainer's AMP)
        # would otherwise recast their inputs and weights, possibly to another half type, every step.
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            if self._graphs is not None:
                return self._graphs(images)
            return self._forward_into(images, self._outputs.get(images.shape[0]))

    def _forward_into(self, images: Tensor, out: Tensor | None) -> Tensor:
        """Run every teacher on ``images`` and stack the logits into ``out`` ``[K, B, C]`` (allocated if None)."""
        converted: dict[torch.memory_format, Tensor] = {}
        logits = []
        for k, (runner, fmt) in enumerate(zip(self._runners, self._formats, strict=True)):
            x = converted.get(fmt)
            if x is None:
                # Returns ``images`` itself when dtype and layout already match: no conversion pass.
                x = converted[fmt] = images.to(dtype=self.dtype, memory_format=fmt)
            y = runner(x)
            if y.dim() != 2 or y.shape[0] != images.shape[0]:
                raise ValueError(f"teacher {k} ({self.names[k]}) returned shape {tuple(y.shape)}; "
                                 f"expected [B, C] logits with B={images.shape[0]}")
            logits.append(y.to(self.logits_dtype))
        num_classes = {y.shape[1] for y in logits}
        if len(num_classes) != 1 or (self._num_classes is not None and num_classes != {self._num_classes}):
            shapes = ", ".join(f"{n}: {tuple(y.shape)}" for n, y in zip(self.names, logits, strict=True))
            raise ValueError(f"teachers disagree on the number of classes ({shapes})")
        self._num_classes = logits[0].shape[1]
        if out is None:
            out = torch.empty((self.num_teachers, *logits[0].shape), dtype=self.logits_dtype, device=self.device)
            if self._graphs is None:
                self._outputs[images.shape[0]] = out
        torch.stack(logits, out=out)
        return out

    def capture_graphs(self, shapes: Sequence[tuple[int, ...]]) -> None:
        """Capture the CUDA graphs of these input shapes now and none later (:meth:`GraphCache.capture`).

        Call it before the loaders start (``build_teachers`` does, with the per-rank batch); without
        CUDA graphs it does nothing.
        """
        if self._graphs is not None:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                self._graphs.capture(shapes)

    def _declared_num_classes(self) -> int | None:
        declared = [getattr(m, "num_classes", None) for m in self._models]
        if any(not isinstance(c, int) for c in declared):
            return None
        if len(set(declared)) != 1:
            detail = ", ".join(f"{n}: {c}" for n, c in zip(self.names, declared, strict=True))
            raise ValueError(f"teachers disagree on num_classes ({detail}); they must share one label space")
        return declared[0]

    def _make_graph_cache(self, capture: Callable[..., _Replayable] = capture_cuda_graph) -> GraphCache:
        return GraphCache(self._forward_into, device=self.device, input_dtype=self.dtype,
                          input_memory_format=self.input_memory_format, capture=capture)

    def __repr__(self) -> str:
        layouts = ["CL" if f == torch.channels_last else "NCHW" for f in self._formats]
        teachers = ", ".join(f"{n} ({lay})" for n, lay in zip(self.names, layouts, strict=True))
        return (f"TeacherEnsemble([{teachers}], device={self.device}, dtype={self.dtype}, fold_bn={self.fold_bn}, "
                f"cuda_graph={self.cuda_graph}, compile={self.compile})")
