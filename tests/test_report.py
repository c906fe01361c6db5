"""``fastmeal report`` on real short CPU runs: every figure drawn and readable, one self-contained HTML page.

The runs are the real :class:`fastmeal.trainer.Trainer` on the in-memory data of ``tiny.py`` (a
second each); the report reads only what they wrote to disk.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from tiny import make_trainer, tiny_config  # noqa: E402

from fastmeal import cli  # noqa: E402
from fastmeal.report import FIGURES, ReportError, eta_seconds, load_run, require_pyplot, write_report  # noqa: E402

ACCURACY_AXES = ["Validation top-1 (%)", "Validation top-5 (%)"]
THROUGHPUT_AXES = ["Training throughput (img/s)", "Data wait (% of wall time)"]
LOSS_AXES = ["kd: soft cross-entropy", "d: discriminator BCE", "kl: KL(teachers || student)", "total loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 3-epoch MEAL V2 runs that differ in their LR (the regime drops at epoch 2 in both)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    try:
        for name, lr in (("lr0.1", 0.1), ("lr0.3", 0.3)):
            cfg = tiny_config(root / name, **{"schedule.epochs": 3, "schedule.lr_steps": "2:0.01", "optim.lr": lr})
            make_trainer(cfg).fit()
    finally:
        torch.set_num_threads(threads)
    return root / "lr0.1", root / "lr0.3"


def axes_titles(png: Path) -> list[str]:
    return Image.open(png).text["Axes"].splitlines()


def assert_not_blank(png: Path) -> None:
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels.std() > 10, f"{png} looks blank (pixel std {pixels.std():.1f})"


class _Resources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href", "data", "srcset", "poster") and v]


def assert_self_contained(page: Path) -> list[str]:
    text = page.read_text()
    parser = _Resources()
    parser.feed(text)
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    assert parser.urls and all(u.startswith("data:image/png;base64,") for u in parser.urls), parser.urls
    assert "url(" not in text and "@import" not in text
    return parser.urls


def test_one_run_writes_every_figure_the_html_and_the_summary(runs, tmp_path):
    report = write_report([runs[0]], tmp_path / "out")
    assert set(report.figures) == set(FIGURES)
    for name in FIGURES:
        assert_not_blank(tmp_path / "out" / f"{name}.png")
    assert axes_titles(report.figures["accuracy"]) == ACCURACY_AXES
    assert axes_titles(report.figures["throughput"]) == THROUGHPUT_AXES  # CPU: no memory panel
    loss_titles = axes_titles(report.figures["loss"])
    assert len(loss_titles) == 4 and all(t.startswith(w) for t, w in zip(loss_titles, LOSS_AXES, strict=True))

    # The page embeds exactly the PNGs written next to it.
    urls = assert_self_contained(report.html)
    embedded = [base64.b64decode(u.split(",", 1)[1]) for u in urls]
    assert embedded == [report.figures[name].read_bytes() for name in FIGURES]

    summary = report.markdown.read_text()
    last = json.loads([line for line in (runs[0] / "metrics.jsonl").read_text().splitlines()
                       if '"kind": "epoch"' in line][-1])
    assert f"| lr0.1 | demo | finished (3 epochs) | {last['val_top1']:.2f} | {last['val_top5']:.2f} |" in summary
    assert all(f"![{name}]({name}.png)" in summary for name in FIGURES)
    assert report.warnings == []


def test_two_runs_share_the_axes_labelled_by_what_differs(runs, tmp_path):
    report = write_report(list(runs), tmp_path / "both")
    assert [r.label for r in report.runs] == ["lr0.1 (optim.lr=0.1)", "lr0.3 (optim.lr=0.3)"]
    for png in report.figures.values():
        assert_not_blank(png)
    summary = report.markdown.read_text()
    assert "| optim.lr | 0.1 | 0.3 |" in summary  # the only config difference (run dirs are not one)
    assert summary.count("finished (3 epochs)") == 2
    assert_self_contained(report.html)
    # Both runs drop the LR at epoch 2: one shared shading, labelled with both LRs of the first span.
    from fastmeal.report import _shared_regime

    assert _shared_regime(report.runs) == [(0, 2, "0.1/0.3"), (2, 3, "0.01")]


def test_a_killed_run_with_a_partial_last_line_still_reports_with_its_eta(runs, tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(runs[0], killed)
    lines = (killed / "metrics.jsonl").read_text().splitlines(keepends=True)
    # Killed while writing the last epoch's record: keep its first half, no newline.
    (killed / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])

    report = write_report([killed], tmp_path / "out")
    assert len(report.warnings) == 1 and "partial last line" in report.warnings[0]
    (run,) = report.runs
    assert run.epochs_done == 2 and not run.finished
    status = report.rows[0]["status"]
    assert status.startswith("in progress or stopped: 2/3 epochs done") and "ETA" in status
    assert eta_seconds(run) > 0
    for png in report.figures.values():
        assert_not_blank(png)
    assert "partial last line" in report.html.read_text()


def test_eta_is_the_recent_pace_times_the_steps_left_plus_the_evaluations(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"name": "demo", "schedule": {"epochs": 3, "lr_steps": []},
                                                     "optim": {"lr": 0.1}}))
    records = []
    for epoch in range(2):  # two epochs of 4 steps, logged every 2 steps: 100 images in 2 s each time
        for step in (2, 4):
            records.append({"kind": "train", "epoch": epoch, "step": step, "global_step": 4 * epoch + step,
                            "samples": 100, "images_per_s": 50.0, "data_wait": 0.1})
        records.append({"kind": "epoch", "epoch": epoch, "val_top1": 50.0, "val_top5": 90.0, "val_seconds": 5.0})
    records.append({"kind": "train", "epoch": 2, "step": 2, "global_step": 10, "samples": 100,
                    "images_per_s": 50.0, "data_wait": 0.1})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = load_run(run_dir)
    assert run.steps_per_epoch == 4
    assert eta_seconds(run) == pytest.approx(2 * 1.0 + 5.0)  # 2 steps at 1 s each, one evaluation of 5 s


def test_accuracies_are_reported_in_percent_whatever_the_unit_written(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"kind": "epoch", "epoch": 0, "train_top1": 41.0, "val_top1": 0.5, "val_top5": 0.8, "best_top1": 0.5},
            {"kind": "train", "epoch": 0, "step": 1, "global_step": 1, "train_top1": 0.25}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(run_dir)
    assert run.epochs[0]["val_top1"] == pytest.approx(50.0) and run.epochs[0]["val_top5"] == pytest.approx(80.0)
    assert run.epochs[0]["best_top1"] == pytest.approx(50.0)
    assert run.epochs[0]["train_top1"] == pytest.approx(41.0)  # already percent: left alone
    assert run.train[0]["train_top1"] == pytest.approx(25.0)
    assert run.config is None
    assert run.warnings == [f"{run_dir / 'config.json'} is missing: the report has no LR regime, no ETA and no "
                            "paper numbers"]


def test_a_paper_preset_run_is_drawn_against_the_paper_and_its_start(runs, tmp_path):
    paper_run = tmp_path / "r50"
    shutil.copytree(runs[0], paper_run)
    cfg = json.loads((paper_run / "config.json").read_text())
    cfg["name"] = "r50_224"  # as if run from the preset (its numbers, not its models)
    cfg["model"]["pretrained"] = True
    (paper_run / "config.json").write_text(json.dumps(cfg))
    report = write_report([paper_run], tmp_path / "out")
    row = report.rows[0]
    assert row["paper top-1"] == "80.67" and row["start top-1"] == "79.00"
    assert math.isclose(float(row["vs paper"]), float(row["val top-1"]) - 80.67, abs_tol=0.011)
    assert "76.20 after epoch 0, 79.60 after epoch 99, 80.30 after epoch 101, 80.67 after epoch 179" in \
        report.markdown.read_text()
    assert_not_blank(report.figures["accuracy"])


def test_the_start_accuracy_comes_from_the_run_that_wrote_the_student_weights(runs, tmp_path):
    child = tmp_path / "child"
    shutil.copytree(runs[1], child)
    cfg = json.loads((child / "config.json").read_text())
    cfg["model"]["student_weights"] = str(runs[0] / "student_last.safetensors")
    (child / "config.json").write_text(json.dumps(cfg))
    (run,) = write_report([child], tmp_path / "out").runs
    parent_last = load_run(runs[0]).epochs[-1]["val_top1"]
    assert run.initial_top1 == (pytest.approx(parent_last), "lr0.1's student_last")


def test_a_run_that_has_not_logged_yet_still_reports(tmp_path):
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(tiny_config(run_dir).to_json())
    report = write_report([run_dir], tmp_path / "out")
    assert "metrics.jsonl does not exist yet" in report.warnings[0]
    assert "ETA unknown" in report.rows[0]["status"]
    for png in report.figures.values():
        assert_not_blank(png)  # axes, titles and a "no records yet" note


def test_cli_report_and_its_errors(runs, tmp_path, capsys, monkeypatch):
    assert cli.main(["report", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert f"report written to {tmp_path / 'cli' / 'report.html'}" in out
    assert "lr0.1: finished (3 epochs)" in out

    assert cli.main(["report", str(tmp_path)]) == 2
    assert "neither metrics.jsonl nor config.json" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ReportError, match=r"pip install 'fastmeal\[report\]'"):
        require_pyplot()
    assert cli.main(["report", str(runs[0]), "--out", str(tmp_path / "none")]) == 2
    assert "pip install 'fastmeal[report]'" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
