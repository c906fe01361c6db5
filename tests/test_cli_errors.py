"""The user's environment and input are never "a bug" (issue #23, items 8 and 10): one line, exit 2."""

from __future__ import annotations

import pytest

from fastmeal.cli import main

TINY = ["--set", "model.student=test_resnet", "--set", "model.pretrained=false", "--set", "loss.mode=ce",
        "--set", "data.image_size=32", "--set", "data.batch_size=4", "--set", "data.workers=0",
        "--set", "data.backend=torchvision", "--set", "logging.progress_bar=false", "--set", "schedule.epochs=1",
        "--set", "model.num_classes=3", "--set", "runtime.device=cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fastmeal.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("errors") / "data"
    synthesize(root, num_classes=3, train_per_class=2, val_per_class=2, seed=0, size_range=(36, 48), progress=False)
    return root


def one_line_exit_2(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "a bug" not in err, err
    assert len(err.strip().splitlines()) == 1, err
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
