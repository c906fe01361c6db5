"""The user's environment and input are never "a bug" (issue #23, items 8 and 10): one line, exit 2."""

from __future__ import annotations

import pytest
from test_cli import TINY

from fastmeal.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fastmeal.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("errors") / "data"
    synthesize(root, num_classes=3, train_per_class=2, val_per_class=2, seed=0, size_range=(36, 48), progress=False)
    return root


def one_line_exit_2(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "a bug" not in err, err
    assert sum(line.startswith("fastmeal") for line in err.splitlines()) == 1, err  # log lines aside
    for needle in needles:
        assert needle in err, err


def test_run_dir_name_past_the_file_name_limit(dataset, tmp_path, capsys):
    run_dir = tmp_path / ("r" * 300)  # Errno 36 (ENAMETOOLONG) on every common file system
    code = main(["train", "--preset", "demo", *TINY, "--set", f"data.root={dataset}",
                 "--set", f"runtime.run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "a bug" not in err and "shorter name" in last and "rrrr" in last


def test_outputs_at_a_path_under_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code = main(["data", "synth", str(afile / "sub"), "--classes", "2", "--train-per-class", "1", "--no-progress"])
    one_line_exit_2(code, capsys.readouterr().err, str(afile), "not a folder")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # a report of it must not crash either
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    code = main(["report", str(run), "--out", str(afile)])  # --out naming a file
    one_line_exit_2(code, capsys.readouterr().err, str(afile))


@pytest.mark.parametrize("args,needle", [
    (["--classes", "0"], "--classes 0"), (["--train-per-class", "-1"], "--train-per-class -1"),
    (["--size-range", "500", "10"], "--size-range 500 10"),
])
def test_bad_synth_options(tmp_path, capsys, args, needle):
    code = main(["data", "synth", str(tmp_path / "d"), "--no-progress", *args])
    one_line_exit_2(code, capsys.readouterr().err, needle)


def test_synth_into_a_real_dataset_folder(dataset, capsys):
    before = sorted(p for p in dataset.rglob("*"))
    code = main(["data", "synth", str(dataset), "--classes", "2", "--train-per-class", "1", "--no-progress"])
    one_line_exit_2(code, capsys.readouterr().err, "not empty", "--force")
    assert sorted(p for p in dataset.rglob("*")) == before


def test_eval_errors_name_the_flags_typed(dataset, tmp_path, capsys):
    base = ["eval", "--model", "test_resnet", "--device", "cpu", "--no-progress"]
    code = main([*base, "--data", str(tmp_path / "nowhere")])
    one_line_exit_2(code, capsys.readouterr().err, "--data ", "nowhere")
    code = main([*base, "--data", str(dataset), "--weights", str(tmp_path / "w.pth"), "--res", "32"])
    err = capsys.readouterr().err
    one_line_exit_2(code, err, "--weights", "w.pth")
    assert "model.student_weights" not in err
    code = main([*base, "--data", str(dataset), "--res", "32", "--resize", "16"])
    one_line_exit_2(code, capsys.readouterr().err, "--resize 16 must be >= --res 32")
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one error line
        main([*base, "--data", str(dataset), "--batch-size", "0"])
    assert exit_info.value.code == 2 and "--batch-size: 0 must be >= 1" in capsys.readouterr().err


def test_a_config_error_is_printed_by_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert main(["config", "show", "--preset", "demo", "--set", "optim.lr=-1"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["config", "show", "--preset", "demo", "--set", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_ctrl_c_advice_fits_the_command(capsys):
    from fastmeal.cli import _interrupted, build_parser

    args = build_parser().parse_args(["bank", "build", "--out", "b"])
    assert _interrupted(args) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "run the same `fastmeal bank build` again" in err


def test_report_says_1_epoch():
    from types import SimpleNamespace

    from fastmeal.report import run_status

    assert run_status(SimpleNamespace(total_epochs=1, finished=True, epochs_done=1)) == "finished (1 epoch)"
