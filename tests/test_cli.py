"""The train/eval/demo commands on a tiny generated dataset, through ``fastmeal.cli.main``."""

from __future__ import annotations

import json

import pytest
import torch

from fastmeal import cli
from fastmeal.cli import build_parser, main
from fastmeal.metrics import read_jsonl

TINY = ["--set", "model.student=test_resnet", "--set", "model.pretrained=false", "--set", "loss.mode=ce",
        "--set", "data.image_size=32", "--set", "data.batch_size=4", "--set", "data.workers=0",
        "--set", "data.backend=torchvision", "--set", "logging.progress_bar=false", "--set", "schedule.epochs=1",
        "--set", "model.num_classes=3", "--set", "runtime.device=cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fastmeal.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("cli") / "data"
    synthesize(root, num_classes=3, train_per_class=4, val_per_class=3, seed=0, size_range=(36, 48), progress=False)
    return root


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    argv = ["train", "--preset", "demo", *TINY, "--set", f"data.root={dataset}", "--set", f"runtime.run_dir={run}"]
    assert main(argv) == 0
    return run


def test_parser_has_the_commands():
    parser = build_parser()
    for argv, func in ((["train", "--preset", "demo"], cli.cmd_train), (["eval", "--model", "x", "--data", "d"],
                       cli.cmd_eval), (["demo", "--out", "o"], cli.cmd_demo), (["bank", "build", "--out", "b"],
                       cli.cmd_bank_build), (["config", "show"], cli.cmd_config_show)):
        assert parser.parse_args(argv).func is func, argv


def test_train_writes_a_run(trained, capsys):
    assert (trained / "student_last.pth").is_file() and (trained / "student_last.safetensors").is_file()
    assert json.loads((trained / "config.json").read_text())["loss"]["mode"] == "ce"
    assert read_jsonl(trained / "metrics.jsonl", "epoch")[0]["val_count"] == 9


def test_eval_of_the_trained_weights_repeats_the_trainers_last_evaluation(trained, dataset, capsys):
    last = read_jsonl(trained / "metrics.jsonl", "epoch")[-1]
    for weights in ("student_last.pth", "student_last.safetensors"):
        code = main(["eval", "--model", "test_resnet", "--weights", str(trained / weights), "--data", str(dataset),
                     "--res", "32", "--workers", "0", "--backend", "torchvision", "--device", "cpu", "--json",
                     "--no-progress"])
        assert code == 0
        result = json.loads(capsys.readouterr().out)
        assert result["count"] == 9 and result["eval_resize"] == 36
        assert result["top1"] == pytest.approx(last["val_top1"]) and result["top5"] == pytest.approx(last["val_top5"])
        assert result["loss"] == pytest.approx(last["val_loss"], rel=1e-5)


def test_eval_loads_a_released_style_file_with_module_prefixes(trained, dataset, tmp_path, capsys):
    state = torch.load(trained / "student_last.pth", weights_only=True)
    released = tmp_path / "MEALV2_style.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, released)
    argv = ["eval", "--model", "test_resnet", "--data", str(dataset), "--res", "32", "--workers", "0",
            "--backend", "torchvision", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--weights", str(released)]) == 0
    line = capsys.readouterr().out
    assert "top-1" in line and "9 images" in line
    # A file for another class count fails with the classifier's shapes, no traceback.
    torch.save({**state, "fc.weight": torch.zeros(10, state["fc.weight"].shape[1]), "fc.bias": torch.zeros(10)},
               tmp_path / "ten.pth")
    assert main([*argv, "--weights", str(tmp_path / "ten.pth")]) == 2
    err = capsys.readouterr().err
    assert "fastmeal: error:" in err and "the file predicts 10 classes, the model 3" in err


def test_train_resume_auto_continues_the_run(trained, dataset, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    capsys.readouterr()
    code = main(["train", "--preset", "demo", *TINY, "--set", f"data.root={dataset}", "--set", f"runtime.run_dir={run}",
                 "--set", "schedule.epochs=2", "--resume", "auto"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed_from"].endswith("ckpt-000000003.pt") and summary["epochs"] == 2
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl", "epoch")] == [0, 1]


def test_train_reports_setup_errors_without_a_traceback(dataset, tmp_path, capsys):
    code = main(["train", "--preset", "demo", *TINY, "--set", f"data.root={dataset}", "--set", "model.num_classes=4",
                 "--set", f"runtime.run_dir={tmp_path / 'r'}"])
    assert code == 2
    assert "has 3 classes but model.num_classes=4" in capsys.readouterr().err
    code = main(["train", "--preset", "demo", *TINY, "--set", f"data.root={dataset}", "--set", "loss.mode=meal_v2",
                 "--set", "model.teachers=test_resnet@/nonexistent/t.pth", "--set", f"runtime.run_dir={tmp_path}"])
    assert code == 2
    assert "model.teachers[0]" in capsys.readouterr().err
