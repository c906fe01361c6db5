"""One configuration tree: frozen, keyword-only dataclasses, validated on construction.

Presets are plain functions returning a :class:`Config` (``r50_224()``, ``demo()``, ...). Overrides
are dotted keys (``optim.lr=0.02``) from the command line or a TOML/YAML file; an unknown key is an
error that lists the valid ones, and a bad value names the field and what is allowed. A resolved
config round-trips through JSON (``Config.from_dict(json.loads(json.dumps(cfg.to_dict())))``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmeal.registry import BACKENDS, OBJECTIVES


class ConfigError(ValueError):
    """A configuration value or key that cannot be accepted; the message says why."""


def _check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _parse_steps(name: str, value: str | None) -> tuple[int, int] | None:
    """``"A:B"`` (steps A..B-1, counted from the start of the run) → ``(A, B)``."""
    if value is None or value == "":
        return None
    try:
        start, stop = (int(v) for v in value.split(":"))
    except ValueError as err:
        raise ConfigError(f"{name}={value!r} must look like 'A:B' with integers A < B") from err
    if not 0 <= start < stop:
        raise ConfigError(f"{name}={value!r} must look like 'A:B' with integers 0 <= A < B")
    return start, stop


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images come from and how they are fed.

    ``batch_size`` is the **global** batch (the reference: 512 = 64 per GPU on 8 GPUs); each rank
    loads ``batch_size // world_size``. ``eval_resize`` is the short side before the centre crop
    (SPEC: int(256/224·S)); 0 derives it from ``image_size``.
    """

    root: str = ""
    backend: str = "auto"  # auto | a name of fastmeal.registry.BACKENDS (dali, torchvision)
    image_size: int = 224
    eval_resize: int = 0
    batch_size: int = 512
    eval_batch_size: int = 0  # global; 0 = same as batch_size
    workers: int = 8  # DataLoader workers (torchvision) or DALI CPU threads, per rank
    prefetch: int = 2  # batches queued ahead per rank
    # The reference keeps the partial last training batch (DataLoader drop_last=False). "drop" gives
    # fixed shapes (CUDA graphs, no tiny BN batches). Eval always counts every sample exactly once.
    last_batch: str = "keep"  # keep | drop
    skip_corrupt: bool = False
    # Share of the JPEGs sent to the A100/H100/H200 hardware decoder (DALI's own default 0.65 sends a third to
    # the CUDA decoder, whose kernels take SMs from the training step); bench_loader measures 0.65/0.9/1.0.
    dali_hw_decoder_load: float = 0.9
    cutmix: bool = False  # MEAL V2 CutMix variant: one box per batch, lambda ~ Beta(1, 1)

    def __post_init__(self) -> None:
        _check_choice("data.backend", self.backend, ("auto", *BACKENDS))
        _check_choice("data.last_batch", self.last_batch, ("keep", "drop"))
        _check_positive("data.image_size", self.image_size)
        _check_positive("data.eval_resize", self.eval_resize, allow_zero=True)
        if self.eval_resize and self.eval_resize < self.image_size:
            raise ConfigError(f"data.eval_resize={self.eval_resize} must be >= data.image_size={self.image_size}")
        _check_positive("data.batch_size", self.batch_size)
        _check_positive("data.eval_batch_size", self.eval_batch_size, allow_zero=True)
        _check_positive("data.workers", self.workers, allow_zero=True)
        _check_positive("data.prefetch", self.prefetch)
        if not 0.0 <= self.dali_hw_decoder_load <= 1.0:
            raise ConfigError(f"data.dali_hw_decoder_load={self.dali_hw_decoder_load} must be in [0, 1]")

    @property
    def resolved_eval_resize(self) -> int:
        """Short side before the centre crop: int(256/224·S) unless set (SPEC, "Data")."""
        return self.eval_resize or int(256 / 224 * self.image_size)

    @property
    def resolved_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """One frozen teacher: a timm tag, an optional local weights file, its memory layout."""

    tag: str
    weights: str = ""  # local .pth/.pt/.safetensors; "" = the hub (or timm's cache) for `tag`
    channels_last: bool = True  # SENet154 is sometimes faster in NCHW: measure per teacher

    def __post_init__(self) -> None:
        if not self.tag:
            raise ConfigError("model.teachers[].tag must be a timm model tag, e.g. 'senet154.gluon_in1k'")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Student and teachers by timm tag (SPEC table: the exact 2020 weights)."""

    student: str = "resnet50.ram_in1k"
    student_weights: str = ""  # local file; "" = the hub for `student` (when pretrained)
    pretrained: bool = True  # MEAL V2 starts from pretrained students (SPEC)
    teachers: tuple[TeacherConfig, ...] = (
        TeacherConfig(tag="senet154.gluon_in1k"),
        TeacherConfig(tag="resnet152s.gluon_in1k"),
    )
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if not self.student:
            raise ConfigError("model.student must be a timm model tag, e.g. 'resnet50.ram_in1k'")
        if not self.teachers:
            raise ConfigError("model.teachers must name at least one teacher")
        if len(self.teachers) > 8:
            raise ConfigError(f"model.teachers has {len(self.teachers)} entries; at most 8 are supported")
        _check_positive("model.num_classes", self.num_classes)


@dataclass(frozen=True, kw_only=True)
class TeacherEngineConfig:
    """How the frozen ensemble runs (speed only: the function is the same)."""

    fold_bn: bool = True
    cuda_graph: bool = True
    compile: bool = False
    dtype: str = "fp16"  # fp16 | bf16 | fp32 on CUDA; always fp32 on the CPU

    def __post_init__(self) -> None:
        _check_choice("teacher_engine.dtype", self.dtype, ("fp16", "bf16", "fp32"))


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """The MEAL V2 loss: soft CE to the ensemble's mean softmax + the discriminator's BCE.

    ``mode="ce"`` trains with hard-label cross-entropy instead (no teachers, no discriminator): the
    demo's teachers and baseline, or any non-distilled baseline, go through the same trainer.
    """

    mode: str = "meal_v2"  # a name of fastmeal.registry.OBJECTIVES: meal_v2 | ce
    impl: str = "auto"  # auto (Triton on CUDA, PyTorch elsewhere) | torch | triton
    discriminator: bool = True
    final_relu: bool = True  # the reference's ReLU before BCEWithLogits (a loss floor of ~0.347)
    discriminator_hidden: tuple[int, ...] = (125, 15)

    def __post_init__(self) -> None:
        _check_choice("loss.mode", self.mode, OBJECTIVES)
        _check_choice("loss.impl", self.impl, ("auto", "torch", "triton"))
        if not self.discriminator_hidden or any(h <= 0 for h in self.discriminator_hidden):
            raise ConfigError(f"loss.discriminator_hidden={self.discriminator_hidden} must be positive widths")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """SGD over student and discriminator together (SPEC: momentum 0.9, no Nesterov, no decay)."""

    lr: float = 0.01  # the LR from epoch 0 until the first step of schedule.lr_steps
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    impl: str = "auto"  # auto (torch fused on CUDA, foreach elsewhere) | torch | apex (FusedSGD)

    def __post_init__(self) -> None:
        _check_positive("optim.lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum={self.momentum} must be in [0, 1)")
        _check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
        _check_choice("optim.impl", self.impl, ("auto", "torch", "apex"))


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Epochs and the LR regime: ``lr_steps`` are ``(epoch, lr)`` pairs, each LR holding from its epoch.

    The LR is set once per epoch for every parameter group (the discriminator's too), as the
    reference does; there is no warm-up.
    """

    epochs: int = 180
    lr_steps: tuple[tuple[int, float], ...] = ((101, 0.001),)

    def __post_init__(self) -> None:
        _check_positive("schedule.epochs", self.epochs)
        epochs = [e for e, _ in self.lr_steps]
        if epochs != sorted(set(epochs)) or any(e < 0 for e in epochs):
            raise ConfigError(f"schedule.lr_steps={self.lr_steps} must have increasing, distinct epochs >= 0")
        for e, lr in self.lr_steps:
            _check_positive(f"schedule.lr_steps[{e}]", lr)


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    """``amp`` picks bf16 where the device supports it, else fp16 with a grad scaler; ``fp32`` is the
    reference's numerics."""

    mode: str = "amp"  # amp | amp-bf16 | amp-fp16 | fp32
    channels_last: bool = True

    def __post_init__(self) -> None:
        _check_choice("precision.mode", self.mode, ("amp", "amp-bf16", "amp-fp16", "fp32"))


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    run_dir: str = "runs/{name}"  # {name} is replaced by the config's name
    checkpoint_every_steps: int = 0  # 0 = at the end of every epoch only
    keep_last: int = 3
    resume: str = ""  # "" | auto | path to a checkpoint
    # A run dir that holds another run's checkpoints or metrics (without resume): error | overwrite | new
    if_exists: str = "error"
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; >0 truncates (smoke runs, benchmarks)
    # torch.compile of the student's step (student, loss and discriminator; forward and backward): auto = on
    # CUDA, off on the CPU (Inductor's CPU build costs minutes there). A compile failure falls back to eager.
    compile: str = "auto"  # auto | on | off
    # cuDNN autotuning: the batch shapes are fixed (the teachers' graphs pad the last batch), so it pays once.
    cudnn_benchmark: bool = True
    # Seconds a collective (and the process-group set-up) waits for the other ranks before this rank stops
    # with "a peer is gone" (exit 3) instead of hanging. Waits are the ranks' skew, not a phase's length: all
    # ranks compile, evaluate and load together; rank 0 alone writes a checkpoint while the others wait.
    dist_timeout_s: int = 300

    def __post_init__(self) -> None:
        _check_choice("runtime.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("runtime.compile", self.compile, ("auto", "on", "off"))
        _check_choice("runtime.if_exists", self.if_exists, ("error", "overwrite", "new"))
        _check_positive("runtime.checkpoint_every_steps", self.checkpoint_every_steps, allow_zero=True)
        _check_positive("runtime.keep_last", self.keep_last)
        _check_positive("runtime.dist_timeout_s", self.dist_timeout_s)
        _check_positive("runtime.max_steps_per_epoch", self.max_steps_per_epoch, allow_zero=True)
        if not self.run_dir:
            raise ConfigError("runtime.run_dir must not be empty")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    interval: int = 50  # steps between progress lines (and the only host syncs for metrics)
    tensorboard: bool = False
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _check_positive("logging.interval", self.interval)


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """Step windows ``A:B`` (global steps A..B-1) for Nsight Systems and torch.profiler."""

    nsys_steps: str = ""
    torch_steps: str = ""

    def __post_init__(self) -> None:
        _parse_steps("profile.nsys_steps", self.nsys_steps)
        _parse_steps("profile.torch_steps", self.torch_steps)

    @property
    def nsys_window(self) -> tuple[int, int] | None:
        return _parse_steps("profile.nsys_steps", self.nsys_steps)

    @property
    def torch_window(self) -> tuple[int, int] | None:
        return _parse_steps("profile.torch_steps", self.torch_steps)


@dataclass(frozen=True, kw_only=True)
class BankConfig:
    """The soft-label bank: ``path`` set = train from its stored top-K records instead of live teachers.

    ``top_k`` and ``chunk_records`` are what ``fastmeal bank build`` writes (``--top-k`` overrides).
    """

    path: str = ""
    top_k: int = 5
    chunk_records: int = 65536

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= 64:
            raise ConfigError(f"bank.top_k={self.top_k} must be in [1, 64]")
        _check_positive("bank.chunk_records", self.chunk_records)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole run. ``name`` is the preset it came from (used in the default run dir)."""

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher_engine: TeacherEngineConfig = field(default_factory=TeacherEngineConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    bank: BankConfig = field(default_factory=BankConfig)

    def __post_init__(self) -> None:
        if self.bank.path and self.loss.mode != "meal_v2":
            raise ConfigError(f"bank.path={self.bank.path!r} holds teacher soft labels; it needs loss.mode=meal_v2")
        if self.bank.path and self.data.cutmix:
            raise ConfigError("bank.path with data.cutmix=true: CutMix mixes a batch before the teachers see it, so "
                              "a per-image bank cannot hold their output; train the CutMix preset online")

    def lr_at(self, epoch: int) -> float:
        """The LR of every parameter group during ``epoch`` (0-based)."""
        lr = self.optim.lr
        for start, step_lr in self.schedule.lr_steps:
            if epoch >= start:
                lr = step_lr
        return lr

    @property
    def resolved_run_dir(self) -> str:
        return self.runtime.run_dir.replace("{name}", self.name)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        return _from_plain(cls, data, "")

    def replace(self, overrides: Mapping[str, Any]) -> Config:
        """A new config with dotted-key overrides applied (values may be strings, parsed by type)."""
        return apply_overrides(self, overrides)


# --------------------------------------------------------------------------------------------
# Plain-data conversion, dotted keys, value parsing
# --------------------------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Turn plain data (JSON/TOML values or command-line strings) into a value of type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "none":
            return None
        return _convert(args[0], value, key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is TeacherConfig:  # a teacher written as "tag" or "tag@weights"
            value = _teacher_from_text(value, key)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table of {tp.__name__} fields, got {value!r}")
        return _from_plain(tp, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = _split_list(value)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must have {len(args)} parts")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        try:
            number = float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}={value!r} must be {'an integer' if tp is int else 'a number'}") from err
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        if tp is int:
            if number != int(number):
                raise ConfigError(f"{key}={value!r} must be an integer")
            return int(number)
        return number
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


_WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt", ".tar")


def _teacher_from_text(text: str, key: str) -> dict[str, str]:
    """``"tag"`` or ``"tag@weights"`` → a teacher table; a bare file name is refused.

    In ``model.teachers=a@/w/x,y.pth`` the comma separates teachers, so a path holding a comma would
    otherwise become a second "teacher" tagged ``y.pth`` without a word.
    """
    tag, _, weights = text.partition("@")
    if not weights and ("/" in tag or tag.lower().endswith(_WEIGHT_SUFFIXES)):
        raise ConfigError(f"{key}={text!r} looks like a weights file, not a timm tag: teachers are written tag or "
                          "tag@FILE, separated by commas; for a path that holds a comma use the list form, e.g. "
                          "--set 'model.teachers=[\"resnet50@/w/a,b.pth\"]'")
    return {"tag": tag, "weights": weights}


def _split_list(text: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]``; ``"101:0.001,150:0.0001"`` → ``[["101","0.001"], ...]`` for pairs."""
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [t.split(":") if ":" in t and "@" not in t else t for t in items]


def _from_plain(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!r}{_did_you_mean(unknown[0], names, where)}; "
                          "valid keys here: " + ", ".join(f"{where}{n}" for n in names))
    kwargs = {k: _convert(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the tree (leaves only), e.g. ``optim.lr``."""
    keys = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{name}.")
        else:
            keys.append(name)
    return keys


def _did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """``" (did you mean optim.lr?)"`` for the closest candidates, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


def unknown_key_error(key: str) -> ConfigError:
    """The error for a dotted key that is not in the tree: the closest keys, and the keys of its section."""
    keys = valid_keys()
    section = key.split(".")[0]
    near = [k for k in keys if k.startswith(f"{section}.")]
    listed = f"keys of {section}: {', '.join(near)}" if near else f"sections: {', '.join(sorted(_SECTIONS))}"
    return ConfigError(f"unknown config key {key!r}{_did_you_mean(key, keys)}; {listed} "
                       "(`fastmeal config show` lists every key)")


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """Apply ``{"optim.lr": "0.02", ...}`` (or nested tables) to ``cfg``; validate the result."""
    plain = cfg.to_dict()
    for key, value in _flatten(overrides):
        parts = key.split(".")
        node = plain
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise unknown_key_error(key)
            if i == len(parts) - 1:
                if isinstance(node[part], dict) and not isinstance(value, Mapping):
                    # `--set data=foo`: a section is a table of keys, not one value
                    raise ConfigError(f"{key} is a section, not a key: set one of its keys, e.g. "
                                      f"{next(k for k in valid_keys() if k.startswith(key + '.'))}=...")
                node[part] = value
            else:
                node = node[part]
    return Config.from_dict(plain)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        # Only the top-level sections are tables; below that a mapping is a value (a teacher table).
        if isinstance(v, Mapping) and "." not in key and key in _SECTIONS:
            out += _flatten(v, f"{key}.")
        else:
            out.append((key, v))
    return out


_SECTIONS = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(_field_types(Config)[f.name])}


def parse_set_args(items: Iterable[str]) -> dict[str, str]:
    """``["optim.lr=0.02", "data.root=/x"]`` → a dict; each item must contain ``=``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=0.02)")
        out[key.strip()] = value.strip()
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON config file as overrides."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; it takes a .toml/.yaml/.json file (a run dir's config is "
                          f"{path / 'config.json'})")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err} (e.g. [optim] then lr = 0.02; strings in "
                              "quotes)") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError as err:
            raise ConfigError(f"{path}: YAML configs need PyYAML (pip install pyyaml); TOML works as is") from err
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
    else:
        raise ConfigError(f"{path}: unknown config format {path.suffix!r}; use .toml, .yaml/.yml or .json")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a table of sections (e.g. optim: {{lr: 0.02}}), not {type(data).__name__}")
    return dict(data)


def to_toml(cfg: Config) -> str:
    """The whole config as TOML that ``--config FILE`` reads back to the same config."""
    lines = []
    plain = cfg.to_dict()
    for key, value in plain.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for section, values in plain.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} as TOML")


# --------------------------------------------------------------------------------------------
# Presets (SPEC, "Paper configurations"): exact timm tags, epochs, resolutions
# --------------------------------------------------------------------------------------------

_SENET_RESNET152S = (TeacherConfig(tag="senet154.gluon_in1k"), TeacherConfig(tag="resnet152s.gluon_in1k"))
_LR_224 = ((101, 0.001),)  # 0.01 for epochs 0–100, then 0.001 (SPEC)


def _paper(name: str, student: str, *, epochs: int, image_size: int = 224, eval_resize: int = 0,
           teachers: tuple[TeacherConfig, ...] = _SENET_RESNET152S, cutmix: bool = False) -> Config:
    return Config(
        name=name,
        data=DataConfig(image_size=image_size, eval_resize=eval_resize, batch_size=512, cutmix=cutmix),
        model=ModelConfig(student=student, teachers=teachers),
        schedule=ScheduleConfig(epochs=epochs, lr_steps=_LR_224),
    )


def r50_224() -> Config:
    """ResNet-50 ← SENet154 + ResNet-152s, 224 px, 180 epochs: 80.67 / 95.09 (paper)."""
    return _paper("r50_224", "resnet50.ram_in1k", epochs=180)


def r50_224_cutmix() -> Config:
    """As r50_224 with CutMix: 80.98 / 95.35 (paper)."""
    return _paper("r50_224_cutmix", "resnet50.ram_in1k", epochs=180, cutmix=True)


def r50_380() -> Config:
    """ResNet-50 at 380 px ← two EfficientNet-B4 teachers, 200 epochs: 81.72 / 95.81 (paper)."""
    teachers = (TeacherConfig(tag="tf_efficientnet_b4.ns_jft_in1k"), TeacherConfig(tag="tf_efficientnet_b4.aa_in1k"))
    return _paper("r50_380", "resnet50.ram_in1k", epochs=200, image_size=380, eval_resize=434, teachers=teachers)


def r18_224() -> Config:
    """ResNet-18, 200 epochs: 73.19 / 90.82 (paper; teachers not stated by the authors — our assumption)."""
    return _paper("r18_224", "resnet18.tv_in1k", epochs=200)


def mnv3s075_224() -> Config:
    """MobileNet-V3-Small 0.75, 200 epochs: 67.60 / 87.23 (paper)."""
    return _paper("mnv3s075_224", "tf_mobilenetv3_small_075.in1k", epochs=200)


def mnv3s100_224() -> Config:
    """MobileNet-V3-Small 1.0, 200 epochs: 69.65 / 88.71 (paper)."""
    return _paper("mnv3s100_224", "tf_mobilenetv3_small_100.in1k", epochs=200)


def mnv3l100_224() -> Config:
    """MobileNet-V3-Large 1.0, 200 epochs: 76.92 / 93.32 (paper)."""
    return _paper("mnv3l100_224", "tf_mobilenetv3_large_100.in1k", epochs=200)


def effb0_224() -> Config:
    """EfficientNet-B0, 200 epochs: 78.29 / 93.95 (paper)."""
    return _paper("effb0_224", "tf_efficientnet_b0.aa_in1k", epochs=200)


def demo() -> Config:
    """The embedded default: a generated JPEG dataset, small models, the CPU, a few minutes.

    Models and data are set by ``fastmeal demo`` (it trains its own teachers and baseline first);
    this preset holds the distillation stage's settings. Tuned on a 2-core CPU (fastmeal.demo's
    docstring has the numbers): timm's tiny ``test_*`` models at 32 px, because ResNet-10t/18 at
    64 px train at ~25 img/s there; 40 epochs at LR 0.05 because the hard-label baseline of a
    few-minute run is far from converged (the pretrained students of the paper are, hence its 0.01).
    """
    return Config(
        name="demo",
        data=DataConfig(root="demo_out/data", backend="auto", image_size=32, batch_size=64, workers=2,
                        prefetch=2),
        model=ModelConfig(student="test_efficientnet", pretrained=False, num_classes=10,
                          teachers=(TeacherConfig(tag="test_resnet"), TeacherConfig(tag="test_byobnet"))),
        teacher_engine=TeacherEngineConfig(fold_bn=True, cuda_graph=False, dtype="fp32"),
        optim=OptimConfig(lr=0.05),
        schedule=ScheduleConfig(epochs=40, lr_steps=((30, 0.005),)),
        precision=PrecisionConfig(mode="fp32", channels_last=True),
        runtime=RuntimeConfig(device="cpu", run_dir="demo_out/{name}"),
        logging=LoggingConfig(interval=10),
    )


PRESETS: dict[str, Callable[[], Config]] = {
    fn.__name__: fn
    for fn in (r50_224, r50_224_cutmix, r50_380, r18_224, mnv3s075_224, mnv3s100_224, mnv3l100_224, effb0_224, demo)
}


def build_config(preset: str = "r50_224", *, config_file: str | Path | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Config:
    """Preset → file overrides → command-line overrides, validated at each step."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    if config_file:
        cfg = apply_overrides(cfg, load_file(config_file))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


# --------------------------------------------------------------------------------------------
# Resuming with another config: which changed keys a run may take on, and which change what it computes
# --------------------------------------------------------------------------------------------

#: The command-line flag of ``fastmeal train`` that accepts refused changes on resume (README, "Resuming").
ALLOW_CHANGED_FLAG = "--allow-changed"

#: Keys a resumed run takes on without being asked: where and how fast it runs, what it logs, how often it
#: checkpoints or evaluates, and more epochs. None of them changes a trained weight. ``schedule.epochs`` is
#: accepted when it grows (a shorter schedule ends a run that was planned longer: refused).
RESUME_ACCEPTED = frozenset({
    "name", "data.backend", "data.eval_batch_size", "data.workers", "data.prefetch", "data.dali_hw_decoder_load",
    "teacher_engine.fold_bn", "teacher_engine.cuda_graph", "teacher_engine.compile", "loss.impl", "optim.impl",
    "schedule.epochs", "precision.channels_last", "runtime.device", "runtime.run_dir",
    "runtime.checkpoint_every_steps", "runtime.keep_last", "runtime.if_exists", "runtime.compile",
    "runtime.cudnn_benchmark", "runtime.dist_timeout_s", "logging.interval", "logging.tensorboard",
    "logging.progress_bar",
    "profile.nsys_steps", "profile.torch_steps", "bank.chunk_records",
})

#: Keys that change what the run computes (its data, order, crops, models, loss, optimiser, numerics or
#: evaluation): a resume refuses a change unless the user names the key with :data:`ALLOW_CHANGED_FLAG`.
#: ``data.root`` and ``bank.path`` are here because a new path may hold other data; after staging the
#: same data elsewhere, allow them by name.
RESUME_REFUSED = frozenset({
    "data.root", "data.image_size", "data.eval_resize", "data.batch_size", "data.last_batch", "data.skip_corrupt",
    "data.cutmix", "model.student", "model.student_weights", "model.pretrained", "model.teachers",
    "model.num_classes", "teacher_engine.dtype", "loss.mode", "loss.discriminator", "loss.final_relu",
    "loss.discriminator_hidden", "optim.lr", "optim.momentum", "optim.nesterov", "optim.weight_decay",
    "schedule.lr_steps", "precision.mode", "runtime.seed", "runtime.max_steps_per_epoch", "bank.path", "bank.top_k",
})

#: How this invocation starts (``--resume``), not what the run is: never reported as a change.
RESUME_IGNORED = frozenset({"runtime.resume"})


@dataclass(frozen=True)
class ConfigChange:
    """One key whose value differs between a checkpoint's config and the resuming one (plain JSON values)."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    """A value as the user would write it: ``64``, ``'/data'``, ``[test_resnet, b@/w/b.pth]``."""
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict) and "tag" in value:  # a teacher
        return value["tag"] + (f"@{value['weights']}" if value.get("weights") else "")
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value)


def parse_allowed_changes(values: Iterable[str]) -> frozenset[str]:
    """``--allow-changed KEY[,KEY...]`` (repeatable) → the keys; a section name (``data``) allows all its keys.

    Raises:
        ConfigError: a name that is neither a key nor a section (with the closest keys).
    """
    keys = set(valid_keys())
    out: set[str] = set()
    for item in (k.strip() for v in values for k in v.split(",")):
        if not item:
            continue
        if item in _SECTIONS:
            out.update(k for k in keys if k.startswith(f"{item}."))
        elif item in keys:
            out.add(item)
        else:
            raise ConfigError(f"{ALLOW_CHANGED_FLAG} {item!r} is not a config key{_did_you_mean(item, keys)}")
    return frozenset(out)


def resume_changes(old: Config, new: Config, *,
                   allowed: Iterable[str] = ()) -> tuple[list[ConfigChange], list[ConfigChange]]:
    """The keys that differ between ``old`` (the checkpoint's config) and ``new``, as ``(accepted, refused)``.

    A key of :data:`RESUME_REFUSED` (or a shrinking ``schedule.epochs``) is refused unless it is in
    ``allowed`` (:func:`parse_allowed_changes`); :data:`RESUME_ACCEPTED` keys are accepted;
    :data:`RESUME_IGNORED` keys are not listed. A key in none of them is refused (a new key must be
    classified: tests/test_config.py checks that every key is). Both lists follow :func:`valid_keys`' order.
    """
    allowed = frozenset(allowed)
    old_plain, new_plain = _flat_plain(old.to_dict()), _flat_plain(new.to_dict())
    accepted, refused = [], []
    for key in valid_keys():
        if key in RESUME_IGNORED or old_plain[key] == new_plain[key]:
            continue
        change = ConfigChange(key, old_plain[key], new_plain[key])
        ok = key in RESUME_ACCEPTED and not (key == "schedule.epochs" and change.new < change.old)
        (accepted if ok or key in allowed else refused).append(change)
    return accepted, refused


def format_changes(changes: Iterable[ConfigChange]) -> str:
    """One line: ``"changed keys: data.batch_size: 64 -> 32, runtime.seed: 0 -> 1"``."""
    return "changed keys: " + ", ".join(str(c) for c in changes)


def check_resume_config(old: Config, new: Config, *, allowed: Iterable[str] = ()) -> list[ConfigChange]:
    """The accepted changes of a resume from ``old`` to ``new``; raises if any change is refused.

    Raises:
        ConfigError: one line listing every refused key with its old and new value, and the flag that
            accepts them.
    """
    accepted, refused = resume_changes(old, new, allowed=allowed)
    if refused:
        keys = ",".join(c.key for c in refused)
        raise ConfigError(f"resume refused: the checkpoint was trained with another config, and these keys change "
                          f"what the run computes: {format_changes(refused)[len('changed keys: '):]}. Resume with "
                          f"the checkpoint's values (its run dir's config.json), or accept them with "
                          f"{ALLOW_CHANGED_FLAG} {keys}")
    return accepted


def _flat_plain(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"root": x}}`` → ``{"data.root": x}`` (sections only; teacher tables stay values)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and not prefix and k in _SECTIONS:
            out.update(_flat_plain(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
