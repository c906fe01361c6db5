"""Model factory: weights from local files in every layout we meet, clear errors, class-count agreement.

Pretrained weights cannot be downloaded here: the files are written by the tests from timm's tiny
``test_*`` models (the real loading code runs on them).
"""

from __future__ import annotations

import pickle
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from fastmeal.config import build_config
from fastmeal.models import factory
from fastmeal.models.factory import (
    WeightsError,
    build_discriminator,
    build_student,
    build_teacher_models,
    build_teachers,
    clean_state_dict,
    load_weights,
    read_weights_file,
)

TAG = "test_resnet"
OTHER_TAG = "test_efficientnet"


@pytest.fixture(scope="module")
def source():
    """A test_resnet with 5 classes and non-default weights (so that a load is visible)."""
    torch.manual_seed(0)
    model = timm.create_model(TAG, num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k


def _save(obj, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


_FLAT = ("plain", "module_prefix", "compiled_ddp")
_WRAPPED = ("state_dict_wrapper", "wrapper_and_prefix", "fastmeal_checkpoint")
# safetensors holds a flat {name: tensor} map only, so wrapped layouts exist as torch files only.
_LAYOUTS = [(layout, suffix) for suffix in (".pth", ".pt", ".safetensors") for layout in _FLAT + _WRAPPED
            if suffix != ".safetensors" or layout in _FLAT]


@pytest.mark.parametrize(("layout", "suffix"), _LAYOUTS)
def test_weights_load_in_every_layout(tmp_path, source, layout, suffix):
    sd = source.state_dict()
    if layout == "module_prefix":  # the released MEAL V2 files (saved from DataParallel)
        sd = {f"module.{k}": v for k, v in sd.items()}
    elif layout == "state_dict_wrapper":
        sd = {"state_dict": sd, "epoch": 3}
    elif layout == "wrapper_and_prefix":
        sd = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec1": 80.6}
    elif layout == "compiled_ddp":
        sd = {f"_orig_mod.module.{k}": v for k, v in sd.items()}
    elif layout == "fastmeal_checkpoint":
        sd = {"format": "fastmeal-checkpoint", "student": sd, "optimizer": {"state": {}}, "epoch": 1}
    path = _save(sd, tmp_path / f"w{suffix}")
    target = timm.create_model(TAG, num_classes=5)
    load_weights(target, path, what="model.student_weights")
    assert_same(source, target)


def test_torchvision_style_file_without_num_batches_tracked_loads(tmp_path, source):
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = timm.create_model(TAG, num_classes=5)
    load_weights(target, _save(sd, tmp_path / "old.pth"))
    for k, v in sd.items():
        assert torch.equal(target.state_dict()[k], v)


def test_another_architecture_fails_naming_the_keys(tmp_path, source):
    path = _save(source.state_dict(), tmp_path / "resnet.pth")
    target = timm.create_model(OTHER_TAG, num_classes=5)
    with pytest.raises(WeightsError) as err:
        load_weights(target, path, what="model.student_weights")
    message = str(err.value)
    assert "model.student_weights" in message and str(path) in message
    assert "missing from the file" in message and "unexpected key(s) in the file" in message
    assert "conv_stem.weight" in message  # a test_efficientnet key the resnet file lacks
    assert "another architecture" in message


def test_another_class_count_names_the_classifier(tmp_path, source):
    path = _save(source.state_dict(), tmp_path / "five.safetensors")
    target = timm.create_model(TAG, num_classes=7)
    with pytest.raises(WeightsError) as err:
        load_weights(target, path)
    message = str(err.value)
    assert "fc.weight: [5," in message and "vs [7," in message
    assert "only the classifier differs: the file predicts 5 classes, the model 7" in message


def test_shape_mismatch_in_the_body_is_listed(tmp_path, source):
    sd = dict(source.state_dict())
    key = next(k for k in sd if k.endswith("conv1.weight"))
    sd[key] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(WeightsError, match=f"{key}: \\[1, 1, 1, 1\\] vs"):
        load_weights(timm.create_model(TAG, num_classes=5), _save(sd, tmp_path / "bad.pth"))


class NotAllowed:
    pass


def test_pickled_objects_are_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotAllowed()}, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        read_weights_file(path, what="model.student_weights")


def test_unreadable_and_missing_files(tmp_path, source):
    path = _save(source.state_dict(), tmp_path / "w.pth")
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated"):
        read_weights_file(tmp_path / "cut.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(WeightsError, match="safetensors"):
        read_weights_file(tmp_path / "cut.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        read_weights_file(tmp_path / "nope.pth", what="model.teachers[1]")
    with pytest.raises(WeightsError, match="not a state dict"):
        clean_state_dict({"epoch": 3, "lr": 0.1}, source="x.pth")
    with pytest.raises(WeightsError, match="both map to"):
        clean_state_dict({"module.a": torch.zeros(1), "a": torch.zeros(1)})


def _cfg(**overrides):
    base = {"model.num_classes": 5, "runtime.device": "cpu"}
    base.update(overrides)
    return build_config("demo", overrides=base)


def test_build_student_and_teachers_from_local_files(tmp_path, source):
    st = _save(source.state_dict(), tmp_path / "student.safetensors")
    torch.manual_seed(1)
    other = timm.create_model(OTHER_TAG, num_classes=5)
    t1 = _save({f"module.{k}": v for k, v in other.state_dict().items()}, tmp_path / "t1.pth")
    cfg = _cfg(**{"model.student": TAG, "model.student_weights": str(st),
                  "model.teachers": f"{TAG}@{st},{OTHER_TAG}@{t1}"})
    student = build_student(cfg)
    assert student.training
    assert_same(source, student)
    teachers = build_teacher_models(cfg)
    assert_same(source, teachers[0])
    assert_same(other, teachers[1])


def test_build_teachers_wraps_a_frozen_ensemble(tmp_path, source):
    st = _save(source.state_dict(), tmp_path / "t.pth")
    cfg = _cfg(**{"model.teachers": f"{TAG}@{st},{TAG}@{st}", "teacher_engine.fold_bn": "false"})
    ensemble = build_teachers(cfg, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    source.eval()
    with torch.no_grad():
        expected = source(x)
    logits = ensemble(x)
    assert logits.shape == (2, 2, 5) and logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], expected)
    assert all(not p.requires_grad for p in ensemble.parameters())


def test_teacher_with_another_class_count_is_refused(tmp_path, source):
    st = _save(source.state_dict(), tmp_path / "t5.pth")
    cfg = _cfg(**{"model.num_classes": 7, "model.teachers": f"{TAG}@{st}"})
    with pytest.raises(WeightsError, match="(?s)model.teachers\\[0\\].*the file predicts 5 classes, the model 7"):
        build_teacher_models(cfg)


def test_hub_teacher_with_another_class_count_is_refused(monkeypatch):
    # As if timm had the tag's weights cached: the teacher keeps its 1000-class head.
    def cached_pretrained(tag, *, num_classes=None, **kwargs):
        return timm.create_model(tag.split(".")[0], num_classes=num_classes or 1000)

    monkeypatch.setattr(factory, "create_pretrained", cached_pretrained)
    monkeypatch.setattr(factory, "_cached_hub_file", lambda hub_id: "/cache/model.safetensors")
    cfg = _cfg(**{"model.teachers": f"{TAG}.r160_in1k"})
    with pytest.raises(WeightsError, match="predicts 1000 classes but model.num_classes=5"):
        build_teacher_models(cfg)


def test_offline_without_a_file_says_which_file_and_how(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(factory, "_cached_hub_file", lambda hub_id: None)
    start = time.perf_counter()
    cfg = _cfg(**{"model.student": "resnet50.ram_in1k", "model.pretrained": "true", "model.num_classes": 1000})
    with pytest.raises(WeightsError) as err:
        build_student(cfg)
    message = str(err.value)
    assert "model.student = resnet50.ram_in1k" in message and "huggingface.co/timm/resnet50.ram_in1k" in message
    assert "--set model.student_weights=FILE" in message
    cfg = _cfg(**{"model.teachers": "senet154.gluon_in1k,resnet152s.gluon_in1k@/w/r152s.pth",
                  "model.num_classes": 1000})
    with pytest.raises(WeightsError) as err:
        build_teacher_models(cfg)
    message = str(err.value)
    # every missing file at once (issue #23 item 10), each with where it comes from
    assert message.startswith("2 weights file(s)") and "fastmeal weights fetch --preset" in message
    assert "model.teachers[0] = senet154.gluon_in1k: https://huggingface.co/timm/senet154.gluon_in1k" in message
    assert "model.teachers[1] = resnet152s.gluon_in1k: the local file /w/r152s.pth" in message
    assert "--set model.teachers=senet154.gluon_in1k@FILE0,resnet152s.gluon_in1k@/w/r152s.pth" in message
    assert time.perf_counter() - start < 10  # no minute of download retries


def test_unknown_tag_is_named():
    with pytest.raises(WeightsError, match="model.student='resnet_nope'"):
        build_student(_cfg(**{"model.student": "resnet_nope", "model.pretrained": "false"}))
    with pytest.raises(WeightsError, match="model.teachers\\[0\\]='nope_net.x'"):
        build_teacher_models(_cfg(**{"model.teachers": "nope_net.x"}))


def test_random_student_and_discriminator_by_mode():
    cfg = _cfg(**{"model.student": TAG, "model.pretrained": "false"})
    assert build_student(cfg).num_classes == 5
    disc = build_discriminator(cfg)
    assert disc is not None and disc.net[0].in_features == 5 and disc.final_relu
    assert build_discriminator(_cfg(**{"loss.mode": "ce"})) is None
    assert build_discriminator(_cfg(**{"loss.discriminator": "false"})) is None
    assert build_discriminator(_cfg(**{"loss.final_relu": "false"})).final_relu is False


def test_pickle_module_is_what_torch_raises():
    # read_weights_file catches pickle.UnpicklingError for weights_only refusals: make sure that is
    # still the type torch raises (it changed across versions before).
    with pytest.raises(pickle.UnpicklingError):
        import io

        buffer = io.BytesIO()
        torch.save({"x": NotAllowed()}, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
