"""The config tree: presets, validation, overrides, files, JSON round-trip, and the CLI view."""

import json

import pytest

from fastmeal import cli
from fastmeal.config import (
    PRESETS,
    Config,
    ConfigError,
    DataConfig,
    TeacherConfig,
    apply_overrides,
    build_config,
    parse_set_args,
    valid_keys,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_validates_and_round_trips(name):
    cfg = PRESETS[name]()
    assert cfg.name == name
    again = Config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert hash(again) == hash(cfg)  # frozen all the way down (tuples, not lists)


def test_r50_224_matches_the_paper():
    cfg = build_config("r50_224")
    assert cfg.model.student == "resnet50.ram_in1k"
    assert [t.tag for t in cfg.model.teachers] == ["senet154.gluon_in1k", "resnet152s.gluon_in1k"]
    assert cfg.model.pretrained
    assert cfg.optim.momentum == 0.9 and not cfg.optim.nesterov and cfg.optim.weight_decay == 0.0
    assert cfg.data.batch_size == 512 and cfg.schedule.epochs == 180
    assert cfg.data.image_size == 224 and cfg.data.resolved_eval_resize == 256
    # 0.01 for epochs 0-100, then 0.001 (SPEC)
    assert [cfg.lr_at(e) for e in (0, 100, 101, 179)] == [0.01, 0.01, 0.001, 0.001]
    assert cfg.loss.discriminator and cfg.loss.final_relu and cfg.loss.discriminator_hidden == (125, 15)
    assert not cfg.data.cutmix


def test_other_presets_match_the_table():
    r380 = build_config("r50_380")
    assert [t.tag for t in r380.model.teachers] == ["tf_efficientnet_b4.ns_jft_in1k", "tf_efficientnet_b4.aa_in1k"]
    assert (r380.data.image_size, r380.data.resolved_eval_resize, r380.schedule.epochs) == (380, 434, 200)
    assert build_config("r50_224_cutmix").data.cutmix
    students = {name: build_config(name).model.student for name in PRESETS if name != "demo"}
    assert students == {
        "r50_224": "resnet50.ram_in1k", "r50_224_cutmix": "resnet50.ram_in1k", "r50_380": "resnet50.ram_in1k",
        "r18_224": "resnet18.tv_in1k", "mnv3s075_224": "tf_mobilenetv3_small_075.in1k",
        "mnv3s100_224": "tf_mobilenetv3_small_100.in1k", "mnv3l100_224": "tf_mobilenetv3_large_100.in1k",
        "effb0_224": "tf_efficientnet_b0.aa_in1k",
    }
    for name in ("r18_224", "mnv3s075_224", "effb0_224"):
        assert build_config(name).schedule.epochs == 200


def test_demo_preset_is_cpu_sized():
    cfg = build_config("demo")
    assert cfg.runtime.device == "cpu" and cfg.precision.mode == "fp32"
    assert cfg.data.image_size <= 96 and not cfg.model.pretrained


def test_overrides_parse_by_type():
    cfg = build_config("r50_224", overrides=parse_set_args([
        "optim.lr=0.02", "data.backend=torchvision", "precision.channels_last=false",
        "schedule.lr_steps=101:0.001,150:0.0001", "model.teachers=a.x,b.y@/w/b.pth", "data.batch_size=256",
    ]))
    assert cfg.optim.lr == 0.02 and cfg.data.backend == "torchvision" and cfg.precision.channels_last is False
    assert cfg.schedule.lr_steps == ((101, 0.001), (150, 0.0001))
    assert cfg.model.teachers == (TeacherConfig(tag="a.x"), TeacherConfig(tag="b.y", weights="/w/b.pth"))
    assert cfg.data.batch_size == 256
    assert cfg.lr_at(0) == 0.02 and cfg.lr_at(149) == 0.001 and cfg.lr_at(150) == 0.0001


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        build_config("r50_224", overrides={"optim.learning_rate": "0.1"})
    assert "optim.learning_rate" in str(err.value) and "optim.lr" in str(err.value)
    with pytest.raises(ConfigError, match="valid keys"):
        Config.from_dict({"data": {"rooot": "/x"}})
    assert "data.root" in valid_keys() and "profile.nsys_steps" in valid_keys()


@pytest.mark.parametrize("key,value,needle", [
    ("optim.lr", "-0.1", "optim.lr"),
    ("optim.lr", "abc", "must be a number"),
    ("data.backend", "pil", "auto, dali, torchvision"),
    ("precision.mode", "fp8", "amp, amp-bf16, amp-fp16, fp32"),
    ("data.batch_size", "0", "data.batch_size"),
    ("data.batch_size", "2.5", "integer"),
    ("optim.momentum", "1.5", "optim.momentum"),
    ("schedule.lr_steps", "150:0.001,101:0.01", "increasing"),
    ("schedule.lr_steps", "-1:0.01", "increasing, distinct epochs >= 0"),
    ("schedule.lr_steps", "10:0", "schedule.lr_steps[10]"),
    ("schedule.epochs", "0", "schedule.epochs"),
    ("profile.nsys_steps", "10", "A:B"),
    ("loss.impl", "cuda", "auto, torch, triton"),
    ("precision.channels_last", "maybe", "true or false"),
])
def test_bad_values_name_the_field_and_the_allowed(key, value, needle):
    with pytest.raises(ConfigError) as err:
        build_config("r50_224", overrides={key: value})
    assert needle in str(err.value)


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="data.eval_resize"):
        DataConfig(image_size=224, eval_resize=200)


def test_config_files(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[optim]\nlr = 0.05\n[data]\nroot = "/imagenet"\n'
                    '[model]\nteachers = [{tag = "t1", channels_last = false}]\n')
    cfg = build_config("r50_224", config_file=toml, overrides={"optim.lr": "0.07"})
    assert cfg.optim.lr == 0.07  # the command line wins over the file
    assert cfg.data.root == "/imagenet"
    assert cfg.model.teachers == (TeacherConfig(tag="t1", channels_last=False),)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("schedule:\n  epochs: 3\n")
    pytest.importorskip("yaml")
    assert build_config("demo", config_file=yaml_file).schedule.epochs == 3
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr2 = 1\n")
    with pytest.raises(ConfigError, match="optim.lr2"):
        build_config("r50_224", config_file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("r50_224", config_file=tmp_path / "missing.toml")


def test_apply_overrides_is_pure():
    cfg = build_config("r50_224")
    new = apply_overrides(cfg, {"optim.lr": 0.5})
    assert cfg.optim.lr == 0.01 and new.optim.lr == 0.5


def test_cli_config_show(capsys):
    assert cli.main(["config", "show", "--preset", "r50_224"]) == 0
    out = capsys.readouterr().out
    for needle in ("resnet50.ram_in1k", "senet154.gluon_in1k", "resnet152s.gluon_in1k", "momentum = 0.9",
                   "weight_decay = 0.0", "batch_size = 512", "epochs = 180", "epoch 101: 0.001",
                   "resize 256 -> crop 224"):
        assert needle in out
    assert cli.main(["config", "show", "--preset", "r50_380", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert Config.from_dict(shown) == build_config("r50_380")
    assert shown["data"]["image_size"] == 380 and shown["data"]["eval_resize"] == 434


def test_cli_config_errors_exit_2(capsys):
    assert cli.main(["config", "show", "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "optim.lr" in err
    assert cli.main(["config", "show", "--set", "novalue"]) == 2


# ---- resuming with another config (issue #23, item 2) and clearer key errors (item 10) ----

def test_every_config_key_is_classified_for_resume():
    """A key added to the tree must be put in RESUME_ACCEPTED or RESUME_REFUSED (or IGNORED), exactly once."""
    from fastmeal.config import RESUME_ACCEPTED, RESUME_IGNORED, RESUME_REFUSED

    keys = set(valid_keys())
    groups = [RESUME_ACCEPTED, RESUME_REFUSED, RESUME_IGNORED]
    assert sum(len(g) for g in groups) == len(set().union(*groups)), "a key is in two groups"
    assert set().union(*groups) == keys, (f"unclassified: {sorted(keys - set().union(*groups))}; "
                                          f"not keys: {sorted(set().union(*groups) - keys)}")


def _changed_value(cfg, key):
    """Another valid value for ``key`` (an independent table, not the code under test)."""
    section, _, name = key.partition(".")
    value = getattr(getattr(cfg, section), name) if name else getattr(cfg, section)
    special = {"data.backend": "torchvision", "data.last_batch": "drop", "teacher_engine.dtype": "bf16",
               "loss.mode": "ce", "loss.impl": "torch", "optim.impl": "torch", "precision.mode": "fp32",
               "runtime.device": "cuda", "runtime.compile": "on", "runtime.if_exists": "new",
               "profile.nsys_steps": "1:2", "profile.torch_steps": "3:4", "model.teachers": "x.y,z.w",
               "schedule.lr_steps": "7:0.5", "loss.discriminator_hidden": "7,3", "data.eval_resize": "600",
               "data.dali_hw_decoder_load": "0.5", "optim.momentum": "0.5", "runtime.run_dir": "elsewhere",
               "runtime.resume": "auto", "bank.path": "/b", "bank.top_k": "7", "optim.nesterov": "true",
               "data.cutmix": "true"}
    if key in special:
        return special[key]
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, int | float):
        return str(value + 1)
    return f"{value}-other"


@pytest.mark.parametrize("key", valid_keys())
def test_resume_changes_sorts_each_key(key):
    from fastmeal.config import ALLOW_CHANGED_FLAG, RESUME_ACCEPTED, RESUME_IGNORED, check_resume_config, resume_changes

    old = build_config("r50_224", overrides={"bank.path": ""} if key != "bank.path" else {})
    extra = {"data.cutmix": {"bank.path": ""}, "loss.mode": {"bank.path": ""}}.get(key, {})
    new = old.replace({key: _changed_value(old, key), **extra})
    accepted, refused = resume_changes(old, new)
    if key in RESUME_IGNORED:
        assert accepted == refused == []
        return
    changed = accepted + refused
    assert [c.key for c in changed] == [key]
    if key in RESUME_ACCEPTED:
        assert accepted and check_resume_config(old, new) == accepted
    else:
        assert refused
        with pytest.raises(ConfigError) as err:
            check_resume_config(old, new)
        message = str(err.value)
        assert "\n" not in message and key in message and f"{ALLOW_CHANGED_FLAG} {key}" in message
        assert check_resume_config(old, new, allowed=[key])[0].key == key  # allowed by name: accepted


def test_resume_refusal_lists_old_and_new_values_of_every_refused_key():
    from fastmeal.config import check_resume_config, format_changes, parse_allowed_changes, resume_changes

    old = build_config("demo")
    new = old.replace({"data.batch_size": "32", "runtime.seed": "1", "data.root": "/elsewhere", "data.workers": "1",
                       "runtime.resume": "auto"})
    accepted, refused = resume_changes(old, new)
    assert format_changes(accepted) == "changed keys: data.workers: 2 -> 1"
    assert format_changes(refused) == ("changed keys: data.root: 'demo_out/data' -> '/elsewhere', "
                                       "data.batch_size: 64 -> 32, runtime.seed: 0 -> 1")
    with pytest.raises(ConfigError, match=r"data.batch_size: 64 -> 32.*runtime.seed: 0 -> 1"):
        check_resume_config(old, new)
    # a section name allows every key of it; an unknown name is an error with a suggestion
    ok = check_resume_config(old, new, allowed=parse_allowed_changes(["data", "runtime.seed"]))
    assert [c.key for c in ok] == ["data.root", "data.batch_size", "data.workers", "runtime.seed"]
    with pytest.raises(ConfigError, match="did you mean runtime.seed"):
        parse_allowed_changes(["runtime.sed"])


def test_more_epochs_are_accepted_fewer_refused():
    from fastmeal.config import resume_changes

    old = build_config("demo")
    assert resume_changes(old, old.replace({"schedule.epochs": "50"}))[1] == []
    assert [c.key for c in resume_changes(old, old.replace({"schedule.epochs": "30"}))[1]] == ["schedule.epochs"]


def test_key_errors_say_what_the_user_meant(tmp_path):
    with pytest.raises(ConfigError, match="did you mean data.root") as err:
        build_config("demo", overrides={"data.rooot": "/x"})
    assert "optim.lr" not in str(err.value)  # the section's keys, not all ~50
    with pytest.raises(ConfigError, match="data is a section, not a key"):
        build_config("demo", overrides=parse_set_args(["data=foo"]))
    with pytest.raises(ConfigError, match="is a folder"):
        build_config("demo", config_file=tmp_path)
    # a comma inside a teacher's path must not make a second teacher silently
    with pytest.raises(ConfigError, match="looks like a weights file"):
        build_config("demo", overrides=parse_set_args(["model.teachers=test_resnet@/w/a,b.pth"]))
    cfg = build_config("demo", overrides=parse_set_args(['model.teachers=["test_resnet@/w/a,b.pth"]']))
    assert cfg.model.teachers == (TeacherConfig(tag="test_resnet", weights="/w/a,b.pth"),)


def test_an_lr_step_at_epoch_0_replaces_optim_lr_from_the_start():
    cfg = build_config("r50_224", overrides={"optim.lr": "0.1", "schedule.lr_steps": "0:0.05,3:0.005"})
    assert [cfg.lr_at(e) for e in (0, 2, 3, 9)] == [0.05, 0.05, 0.005, 0.005]
