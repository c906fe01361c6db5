"""Students and teachers from timm tags, with their weights: the one module (with teachers.py) that knows timm.

Weights come from, in order of preference:

* a local file named in the config (``model.student_weights=FILE``, ``model.teachers=tag@FILE``):
  ``.pth``/``.pt`` (read with ``torch.load(weights_only=True)``) or ``.safetensors``; a plain
  ``state_dict``, a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper, or one of our own full
  checkpoints (``{"student": ...}``); keys prefixed ``module.`` (saved from inside
  ``DataParallel``/DDP, as the released MEAL V2 files are) or ``_orig_mod.`` (``torch.compile``);
* timm's pretrained weights for the tag, from the local Hugging Face cache or the hub when it is
  reachable. Offline and uncached, :class:`WeightsError` says which tag needs which file and how to
  pass it, instead of timm's minute of retries.

Every load is checked key by key and shape by shape against the model, so a file of another
architecture (or of another class count) fails with the keys and shapes that differ.
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from fastmeal.config import Config
from fastmeal.data.common import images_dtype
from fastmeal.distributed import configure_device
from fastmeal.models.discriminator import Discriminator

if TYPE_CHECKING:
    from fastmeal.models.teachers import TeacherEnsemble

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# Wrapper keys of common checkpoint layouts, tried in order: timm/torchvision training scripts use
# "state_dict" or "model"; our own full checkpoints keep the student under "student".
_WRAPPER_KEYS = ("state_dict", "model", "student")
# DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") prefixes, in either nesting order.
_PREFIXES = ("module.", "_orig_mod.")
_HUB_PROBE_TIMEOUT_S = 3.0


class WeightsError(RuntimeError):
    """A weights file or pretrained download that cannot be used; the message says which and why."""


# --------------------------------------------------------------------------------------------
# Reading and checking state dicts
# --------------------------------------------------------------------------------------------


def _strip_prefixes(key: str) -> str:
    while key.startswith(_PREFIXES):
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
    return key


def clean_state_dict(obj: Any, *, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Unwrap a loaded checkpoint object into a flat ``{name: tensor}`` with wrapper prefixes removed.

    Args:
        obj: what ``torch.load``/``safetensors`` returned: a state dict, or a dict holding one under
            ``state_dict``, ``model`` or ``student``.
        source: where it came from, for error messages.

    Returns:
        The state dict with ``module.`` / ``_orig_mod.`` prefixes stripped.

    Raises:
        WeightsError: when no state dict can be found, or two keys collide once stripped.
    """
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    seen = []
    while not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
            raise WeightsError(f"{source}: not a state dict: entries {non_tensors} are not tensors, and there is no "
                               f"{' / '.join(repr(k) for k in _WRAPPER_KEYS)} entry holding one")
        seen.append(inner)
        obj = obj[inner]
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = _strip_prefixes(key)
        if name in out:
            raise WeightsError(f"{source}: keys {key!r} and another both map to {name!r} once prefixes are removed")
        out[name] = value
    if not out:
        raise WeightsError(f"{source}: the state dict{' under ' + '/'.join(seen) if seen else ''} is empty")
    return out


def read_weights_file(path: str | os.PathLike, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.bin`` (``weights_only=True``) or ``.safetensors`` file into a clean state dict.

    Args:
        path: the file.
        what: the config key or role it was given as (``model.student_weights``), for messages.

    Returns:
        ``{name: tensor}`` on the CPU, wrapper keys and prefixes removed (see :func:`clean_state_dict`).

    Raises:
        WeightsError: missing file, unreadable or truncated file, pickled objects that
            ``weights_only=True`` refuses, or no state dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what}: weights file {path} does not exist")
    kind = _sniff_weights(path)
    if kind == "empty":
        raise WeightsError(f"{what}: {path} is empty (0 bytes): an interrupted download or copy? Fetch it again")
    if kind == "unknown":
        head = path.read_bytes()[:8]
        raise WeightsError(f"{what}: {path} ({path.stat().st_size} bytes, starting {head!r}) is neither a PyTorch "
                           "file (.pth/.pt/.bin: a zip archive or a pickle) nor a .safetensors file: truncated, or "
                           "not a weights file?")
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{what}: cannot read {path} as safetensors: {err}") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # weights_only=True refuses arbitrary pickled objects; we never fall back to unsafe loading.
            first = str(err).splitlines()[0] if str(err) else ""
            if "weights_only" not in str(err) and "Unsupported global" not in str(err):
                raise WeightsError(f"{what}: cannot read {path} ({first}): damaged or truncated?") from err
            raise WeightsError(f"{what}: {path} holds pickled Python objects that torch.load(weights_only=True) "
                               f"refuses ({first}). If you trust it, re-save its state_dict "
                               "with torch.save(model.state_dict(), FILE) or as .safetensors") from err
        except Exception as err:  # a damaged zip fails in many ways (RuntimeError, EOFError, KeyError, ...)
            first = str(err).splitlines()[0] if str(err) else ""
            raise WeightsError(f"{what}: cannot read {path} ({type(err).__name__}: {first}); is it truncated or not "
                               "a PyTorch file?") from err
    return clean_state_dict(obj, source=f"{what} ({path})")


def _sniff_weights(path: Path) -> str:
    """What a weights file holds, by content (not by name): ``torch``, ``safetensors``, ``empty`` or ``unknown``."""
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip archive, or a legacy pickle
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then its JSON header
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len < path.stat().st_size:
            return "safetensors"
    return "unknown"


def _classifier_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier", "")
    return name if isinstance(name, str) else ""


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state_dict`` into ``model`` after checking every key and shape; on mismatch say which.

    BatchNorm's ``num_batches_tracked`` may be missing (older torchvision files): BN fills it.

    Args:
        model: the freshly built model.
        state_dict: a clean state dict (:func:`clean_state_dict`).
        source: what to call the file in messages (role and path).

    Raises:
        WeightsError: listing missing keys, unexpected keys and shape differences (the classifier's
            class count spelled out when that is the only difference).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        arch = type(model).__name__
        lines = [f"{source} does not fit the model ({arch}, {len(expected)} tensors; the file has {len(state_dict)})"]
        if mismatched:
            lines.append(f"  {len(mismatched)} shape(s) differ (name: file vs model): "
                         + "; ".join(f"{k}: {list(a)} vs {list(b)}" for k, a, b in mismatched[:8]))
        if missing:
            lines.append(f"  {len(missing)} key(s) missing from the file: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s) in the file: {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
        head = _classifier_name(model)
        if head and mismatched and not missing and not unexpected and all(k.startswith(head + ".")
                                                                          for k, _, _ in mismatched):
            file_classes = next(a[0] for k, a, _ in mismatched if k.endswith("weight"))
            lines.append(f"  only the classifier differs: the file predicts {file_classes} classes, the model "
                         f"{getattr(model, 'num_classes', '?')} (model.num_classes)")
        elif missing or unexpected:
            lines.append("  the file looks like another architecture: check the timm tag it goes with")
        raise WeightsError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def load_weights(model: nn.Module, path: str | os.PathLike, *, what: str = "weights") -> nn.Module:
    """Read ``path`` (:func:`read_weights_file`) and load it into ``model`` (:func:`load_state_dict_checked`)."""
    load_state_dict_checked(model, read_weights_file(path, what=what), source=f"{what} ({path})")
    return model


# --------------------------------------------------------------------------------------------
# timm models and pretrained weights
# --------------------------------------------------------------------------------------------


def create_model(tag: str, *, num_classes: int | None = None, what: str = "model") -> nn.Module:
    """A timm model with random weights (``num_classes=None``: the tag's own class count).

    Raises:
        WeightsError: for a tag timm does not know, naming the config key it came from.
    """
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(tag, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err) or "Invalid pretrained tag" in str(err):
            raise WeightsError(f"{what}={tag!r} is not a timm model tag ({err}); list them with "
                               "python -c \"import timm; print(timm.list_models(pretrained=True))\"") from err
        raise


def _pretrained_cfg(tag: str) -> dict[str, Any]:
    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None:  # a bare architecture name: timm uses its default tag
        arch = timm.models.parse_model_name(tag)[1].split(".")[0]
        cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def _cached_hub_file(hf_hub_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def _reachable(url: str) -> bool:
    """A quick TCP probe, so that an offline machine gets our error at once, not after timm's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(url).hostname
    if not host:
        return False
    try:
        with socket.create_connection((host, 443), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def create_pretrained(tag: str, *, num_classes: int | None = None, what: str = "model",
                      override_key: str = "model.student_weights=FILE") -> nn.Module:
    """A timm model with the tag's pretrained weights, from the local cache or the hub.

    Args:
        tag: timm tag, e.g. ``resnet50.ram_in1k`` (the exact 2020 weights, SPEC table).
        num_classes: None keeps the tag's head; another count gets a fresh head (timm's behaviour).
        what: the config key the tag came from, for messages.
        override_key: how a user passes a local file instead (``model.student_weights=FILE``), for
            the offline error.

    Raises:
        WeightsError: offline and not cached (which file to fetch and how to pass it), or a tag
            without pretrained weights.
    """
    if not timm.is_model(tag.split(".")[0]):
        raise WeightsError(f"{what}={tag!r} is not a timm model tag; list them with "
                           "python -c \"import timm; print(timm.list_models(pretrained=True))\"")
    cfg = _pretrained_cfg(tag)
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    cached = _cached_hub_file(hub_id) if hub_id else None
    if cached:
        return timm.create_model(tag, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    sources = ([f"https://huggingface.co/{hub_id}"] if hub_id else []) + ([url] if url else [])
    if not sources:
        raise WeightsError(f"{tag!r} has no pretrained weights in timm; pass a file with --set {override_key}")
    if not any(_reachable(s) for s in sources):
        files = " or ".join(f"{s}" + ("/tree/main (model.safetensors)" if "huggingface.co" in s else "")
                            for s in sources)
        raise WeightsError(f"{tag!r} needs its pretrained weights and the hub is not reachable (offline, or "
                           f"HF_HUB_OFFLINE=1). Download them from {files} on a machine with network access, "
                           f"copy the file here and pass it with --set {override_key}")
    try:
        return timm.create_model(tag, pretrained=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - hub/HTTP errors come in many types; all get the same advice
        raise WeightsError(f"downloading the pretrained weights of {tag!r} failed ({type(err).__name__}: {err}); "
                           f"pass a local file with --set {override_key}") from err


def model_num_classes(model: nn.Module) -> int:
    """The number of classes a classifier predicts (timm's ``num_classes``, else its head's width)."""
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        return head.out_features
    raise WeightsError(f"cannot tell how many classes {type(model).__name__} predicts")


def build_student(cfg: Config) -> nn.Module:
    """The student: ``cfg.model.student`` with a ``cfg.model.num_classes`` head, on the CPU, in train mode.

    Weights: ``model.student_weights`` when set; else timm's pretrained weights when
    ``model.pretrained`` (MEAL V2 starts from them, SPEC); else random init.

    Raises:
        WeightsError: see :func:`load_weights` and :func:`create_pretrained`.
    """
    m = cfg.model
    check_weights_available(cfg, teachers=False)
    if m.student_weights:
        model = create_model(m.student, num_classes=m.num_classes, what="model.student")
        load_weights(model, m.student_weights, what="model.student_weights")
    elif m.pretrained:
        model = create_pretrained(m.student, num_classes=m.num_classes, what="model.student",
                                  override_key="model.student_weights=FILE")
    else:
        model = create_model(m.student, num_classes=m.num_classes, what="model.student")
    return model.train()


def build_teacher_models(cfg: Config) -> list[nn.Module]:
    """The teachers' timm models with their weights (a local file, or the tag's pretrained ones), on the CPU.

    Raises:
        WeightsError: a weights problem, or a teacher whose class count differs from
            ``model.num_classes`` (teachers, student and data must agree).
    """
    check_weights_available(cfg, student=False)  # every missing teacher at once, not one per attempt
    models = []
    # Teachers are given together, so the advice spells out the whole list, e.g. a@FILE0,b@FILE1.
    all_teachers = ",".join(f"{t.tag}@{t.weights or f'FILE{j}'}" for j, t in enumerate(cfg.model.teachers))
    for i, t in enumerate(cfg.model.teachers):
        key = f"model.teachers[{i}]"
        if t.weights:
            model = create_model(t.tag, num_classes=cfg.model.num_classes, what=key)
            load_weights(model, t.weights, what=f"{key} ({t.tag})")
        else:
            # The teacher keeps the head its weights were trained with; a fresh head would be noise.
            model = create_pretrained(t.tag, what=key, override_key=f"model.teachers={all_teachers}")
        classes = model_num_classes(model)
        if classes != cfg.model.num_classes:
            raise WeightsError(f"{key}={t.tag!r} predicts {classes} classes but model.num_classes="
                               f"{cfg.model.num_classes}: teachers, student and dataset must agree")
        models.append(model)
    return models


def build_teachers(cfg: Config, device: torch.device, *, models: Sequence[nn.Module] | None = None,
                   batch_sizes: Sequence[int] = ()) -> TeacherEnsemble:
    """The frozen teacher ensemble on ``device``; calling it on ``[B, 3, S, S]`` gives ``[K, B, C]`` logits.

    Args:
        cfg: the run's config (``model.teachers``, ``teacher_engine``, ``precision``).
        device: where the teachers run.
        models: the K teacher modules, one per ``model.teachers`` entry, instead of building them with their
            weights (:func:`build_teacher_models`): the benchmarks pass random-weight models (speed does not
            depend on the weights). They are taken over and changed in place, as :class:`TeacherEnsemble` does.
        batch_sizes: per-rank batch sizes whose CUDA graphs (``[B, 3, S, S]`` at ``data.image_size``) are
            captured now, before any loader runs; no later capture happens then (see
            :meth:`TeacherEnsemble.capture_graphs`). Empty: graphs are captured on first use.

    Raises:
        ValueError: ``models`` given with another count than ``model.teachers``.
    """
    from fastmeal.models.teachers import TeacherEnsemble

    if models is None:
        models = build_teacher_models(cfg)
    elif len(models) != len(cfg.model.teachers):
        raise ValueError(f"build_teachers got {len(models)} teacher models for {len(cfg.model.teachers)} "
                         "model.teachers entries")
    channels_last = [t.channels_last and cfg.precision.channels_last for t in cfg.model.teachers]
    engine = cfg.teacher_engine
    configure_device(cfg.runtime.cudnn_benchmark, device)  # before the graphs' warm-up, where cuDNN autotunes
    # The teachers run in the dtype the loader delivers (fp32 on the CPU and in precision.mode=fp32).
    ensemble = TeacherEnsemble(models, device=device, dtype=images_dtype(cfg, device), channels_last=channels_last,
                               fold_bn=engine.fold_bn, cuda_graph=engine.cuda_graph and device.type == "cuda",
                               compile=engine.compile)
    size = cfg.data.image_size
    if batch_sizes:
        ensemble.capture_graphs([(b, 3, size, size) for b in batch_sizes])
    return ensemble


def build_discriminator(cfg: Config) -> Discriminator | None:
    """The MEAL V2 discriminator, or None in ``loss.mode=ce`` or with ``loss.discriminator=false``."""
    if cfg.loss.mode != "meal_v2" or not cfg.loss.discriminator:
        return None
    return Discriminator(cfg.model.num_classes, hidden=tuple(cfg.loss.discriminator_hidden),
                         final_relu=cfg.loss.final_relu)


# --------------------------------------------------------------------------------------------
# Which weight files a config needs, whether they are here, and fetching them for an offline machine
# --------------------------------------------------------------------------------------------

HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub loader tries, in its order


@dataclass(frozen=True)
class WeightSource:
    """One weights file a config needs.

    Attributes:
        key: the config key it comes from (``model.student`` for pretrained weights, ``model.student_weights``,
            ``model.teachers[1]``).
        tag: the timm tag.
        file: the local file the config names ("" = the tag's pretrained weights).
        hf_repo: the tag's Hugging Face repo (``timm/senet154.gluon_in1k``; "" if it has none).
        url: the tag's older release URL ("" if none).
        found: where the file is on this machine (the named file, or the Hugging Face cache); "" = missing.
    """

    key: str
    tag: str
    file: str
    hf_repo: str
    url: str
    found: str

    def origin(self) -> str:
        """Where the file comes from, in words."""
        if self.file:
            return f"the local file {self.file}"
        parts = [f"https://huggingface.co/{self.hf_repo} ({' or '.join(HF_FILENAMES)})"] if self.hf_repo else []
        return " or ".join(parts + ([self.url] if self.url else [])) or "nowhere: the tag has no pretrained weights"

    @property
    def override(self) -> str:
        """How a local file is passed instead: ``model.student_weights=FILE`` or ``tag@FILE`` in model.teachers."""
        return "model.student_weights=FILE" if self.key.startswith("model.student") else f"{self.tag}@FILE"


def weight_sources(cfg: Config, *, student: bool = True, teachers: bool = True) -> list[WeightSource]:
    """The weight files ``cfg`` loads: the student's (a named file, or pretrained ones) and each teacher's.

    Reads no weights and uses no network: ``found`` is the named file if it exists, else the tag's
    file in the local Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME``, where timm looks).
    """
    wanted = []
    m = cfg.model
    if student and (m.student_weights or m.pretrained):
        wanted.append(("model.student_weights" if m.student_weights else "model.student", m.student,
                       m.student_weights))
    if teachers:
        wanted += [(f"model.teachers[{i}]", t.tag, t.weights) for i, t in enumerate(m.teachers)]
    out = []
    for key, tag, file in wanted:
        pretrained = {} if file else _pretrained_cfg(tag) if timm.is_model(tag.split(".")[0]) else {}
        hf_repo = pretrained.get("hf_hub_id") or ""
        found = (file if Path(file).is_file() else "") if file else (_cached_hub_file(hf_repo) or "") if hf_repo else ""
        out.append(WeightSource(key=key, tag=tag, file=file, hf_repo=hf_repo, url=pretrained.get("url") or "",
                                found=found))
    return out


def check_weights_available(cfg: Config, *, student: bool = True, teachers: bool = True) -> None:
    """Raise one error listing every weights file ``cfg`` needs that this machine lacks and cannot download.

    A named file that does not exist is always listed; the tag's pretrained weights only when the hub is
    not reachable (offline) and they are not in the Hugging Face cache.

    Raises:
        WeightsError: naming each missing file, where it comes from, and how to bring them all at once.
    """
    # Tags timm does not know, or without pretrained weights, are left to the builders' own errors.
    missing = [s for s in weight_sources(cfg, student=student, teachers=teachers)
               if not s.found and (s.file or s.hf_repo or s.url)]
    hub = [s for s in missing if not s.file]
    if hub and any(_reachable(f"https://huggingface.co/{s.hf_repo}") or (s.url and _reachable(s.url)) for s in hub):
        hub = []  # online: timm downloads them
    missing = [s for s in missing if s.file or s in hub]
    if not missing:
        return
    advice = []
    if any(s.file for s in missing):
        advice.append("Check the path of each named file")
    if hub:
        advice.append(f"On a machine with network access run `fastmeal weights fetch --preset {cfg.name} --out DIR` "
                      "(with the same --set options), copy DIR here and set HF_HUB_CACHE=DIR (README, \"Weights on "
                      "an offline machine\"); or download each file and pass it with " + _file_overrides(cfg, missing))
    raise WeightsError(f"{len(missing)} weights file(s) this run needs are not on this machine: "
                       + "; ".join(f"{s.key} = {s.tag}: {s.origin()}" for s in missing) + ". " + "; ".join(advice))


def _file_overrides(cfg: Config, missing: Sequence[WeightSource]) -> str:
    """``--set model.student_weights=FILE --set model.teachers=a@FILE0,b@/w/b.pth``: every local file to pass."""
    out = []
    if any(s.key.startswith("model.student") for s in missing):
        out.append("--set model.student_weights=FILE")
    if any(s.key.startswith("model.teachers") for s in missing):
        # Teachers are given together: the whole list, each missing one as FILEi.
        out.append("--set model.teachers=" + ",".join(f"{t.tag}@{t.weights or f'FILE{j}'}"
                                                       for j, t in enumerate(cfg.model.teachers)))
    return " ".join(out)


def fetch_weights(sources: Sequence[WeightSource], out: str | os.PathLike, *,
                  download: Any = None) -> list[tuple[WeightSource, Path]]:
    """Download each source's pretrained weights into ``out`` in the Hugging Face cache layout.

    ``out`` is then what ``HF_HUB_CACHE`` names on the offline machine (timm reads the hub's files
    through that cache: ``out/models--timm--<tag>/snapshots/<revision>/model.safetensors``). Sources
    that name a local file are skipped (copy those yourself).

    Args:
        sources: from :func:`weight_sources`.
        out: the folder (created).
        download: ``huggingface_hub.hf_hub_download``-like callable (tests inject one); default the real one.

    Returns:
        ``(source, path of the downloaded file)`` for each hub source.

    Raises:
        WeightsError: a tag without a Hugging Face repo (its URL is given to fetch by hand), or a failed download.
    """
    if download is None:
        from huggingface_hub import hf_hub_download as download
    from huggingface_hub.errors import EntryNotFoundError

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fetched = []
    for source in sources:
        if source.file:
            continue
        if not source.hf_repo:
            raise WeightsError(f"{source.key} = {source.tag} has no Hugging Face repo: download {source.origin()} "
                               f"by hand and pass the file as {source.override}")
        for name in HF_FILENAMES:
            try:
                fetched.append((source, Path(download(repo_id=source.hf_repo, filename=name, cache_dir=str(out)))))
                break
            except EntryNotFoundError:
                continue
            except Exception as err:  # noqa: BLE001 - network errors come in many types; one message for all
                raise WeightsError(f"downloading {source.hf_repo}/{name} failed ({type(err).__name__}: {err})") from err
        else:
            raise WeightsError(f"{source.hf_repo} has none of {', '.join(HF_FILENAMES)}")
    return fetched
