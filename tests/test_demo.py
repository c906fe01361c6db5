"""A shrunken demo (tiny data, tiny models, one epoch per stage): the pipeline and its outputs, not the margin."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from fastmeal.demo import DemoSettings, run_demo

SHRUNK = DemoSettings(
    num_classes=3, train_per_class=6, val_per_class=3, size_range=(36, 48),
    teacher_epochs=1, baseline_epochs=1, distill_epochs=1,
    overrides=(("data.image_size", "32"), ("data.batch_size", "6"), ("data.workers", "0"),
               ("data.backend", "torchvision"), ("model.student", "test_resnet"),
               ("model.teachers", "test_resnet,test_efficientnet"), ("bank.top_k", "2")),
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = run_demo(out, seed=1, settings=SHRUNK, progress=False)
    return out, summary, printed.getvalue()


def test_summary_json_has_every_stage(demo):
    out, summary, _ = demo
    written = json.loads((out / "summary.json").read_text())
    for key in ("teachers", "baseline", "distilled", "control", "bank_distilled"):
        assert 0.0 <= written[key]["top1"] <= written[key]["top5"] <= 100.0
    assert [m["model"] for m in written["teachers"]["members"]] == ["test_resnet", "test_efficientnet"]
    assert written["margin_top1"] == pytest.approx(written["distilled"]["top1"] - written["baseline"]["top1"])
    assert written["margin_over_control_top1"] == pytest.approx(
        written["distilled"]["top1"] - written["control"]["top1"])
    assert written["seed"] == 1 and written["total_seconds"] > 0
    assert summary["distilled"]["top1"] == written["distilled"]["top1"]
    assert written["bank_minus_online_top1"] == pytest.approx(
        written["bank_distilled"]["top1"] - written["distilled"]["top1"])
    bank = written["bank"]
    assert bank["samples"] == 18 and bank["top_k"] == 2 and 0 < bank["captured_mass"] <= 1
    assert bank["build_seconds"] > 0 and bank["crops_per_s"] > 0


def test_the_bank_stage_replays_the_distillations_run_without_teachers(demo):
    out, _, _ = demo
    online = json.loads((out / "distilled" / "config.json").read_text())
    bank = json.loads((out / "bank_distilled" / "config.json").read_text())
    assert bank["bank"]["path"] == str(out / "bank") and online["bank"]["path"] == ""
    # Same student start, seed (hence crops), schedule and teachers as the online distillation.
    for section in ("model", "schedule", "optim", "data"):
        assert bank[section] == online[section], section
    assert bank["runtime"]["seed"] == online["runtime"]["seed"]
    manifest = json.loads((out / "bank" / "manifest.json").read_text())
    assert manifest["seed"] == online["runtime"]["seed"] and manifest["summary"]["epochs"] == [0]


def test_the_distillation_starts_from_the_files_the_earlier_stages_wrote(demo):
    out, summary, _ = demo
    cfg = json.loads((out / "distilled" / "config.json").read_text())
    assert cfg["loss"]["mode"] == "meal_v2"
    assert cfg["model"]["student_weights"] == str(out / "baseline" / "student_last.safetensors")
    assert [t["weights"] for t in cfg["model"]["teachers"]] == [
        str(out / "teacher0" / "student_last.safetensors"), str(out / "teacher1" / "student_last.safetensors")]
    for stage in ("teacher0", "teacher1", "baseline", "control"):
        assert json.loads((out / stage / "config.json").read_text())["loss"]["mode"] == "ce"
    # The control starts where the distillation starts and sees the same batches: a paired comparison.
    control = json.loads((out / "control" / "config.json").read_text())
    assert control["model"]["student_weights"] == cfg["model"]["student_weights"]
    assert control["runtime"]["seed"] == cfg["runtime"]["seed"] and control["schedule"] == cfg["schedule"]
    seeds = [json.loads((out / s / "config.json").read_text())["runtime"]["seed"] for s in ("teacher0", "teacher1",
                                                                                            "baseline", "distilled")]
    assert len(set(seeds)) == 4
    records = [json.loads(line) for line in (out / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert {"kd", "d", "kl"} <= set(next(r for r in records if r["kind"] == "train"))


def test_the_table_is_printed(demo):
    out, _, printed = demo
    written = json.loads((out / "summary.json").read_text())
    lines = printed.splitlines()
    # One row per model with its top-1/top-5 as summary.json records them, then the margins.
    teachers = written["teachers"]
    for role, stage in (("teacher 0", teachers["members"][0]), ("teacher 1", teachers["members"][1]),
                        ("teachers (ensemble)", teachers), ("baseline (hard labels)", written["baseline"]),
                        ("distilled (MEAL V2)", written["distilled"]),
                        ("control (more hard labels)", written["control"]),
                        ("distilled from the bank", written["bank_distilled"])):
        row = next((line for line in lines if line.startswith(role)), None)
        assert row is not None, f"no printed row {role!r} in:\n{printed}"
        assert f"{stage['top1']:8.2f}{stage['top5']:8.2f}" in row, row
    assert f"distilled - baseline: {written['margin_top1']:+.2f} top-1" in printed
    assert f"distilled - control: {written['margin_over_control_top1']:+.2f} top-1" in printed
    bank, online = written["bank_distilled"]["top1"], written["distilled"]["top1"]
    assert f"bank vs online: top-1 {bank:.2f} vs {online:.2f}" in printed
    assert f"summary written to {out / 'summary.json'}" in printed


def test_the_demo_writes_its_report(demo, capsys):
    out, _, _ = demo
    report = out / "report"
    for name in ("accuracy.png", "loss.png", "throughput.png", "report.html", "report.md"):
        assert (report / name).stat().st_size > 0, name
    summary = (report / "report.md").read_text()
    assert "| distilled | demo | finished (1 epoch) |" in summary and "| control |" in summary
    assert "| loss.mode | meal_v2 | ce |" in summary


def test_stage_bars_are_off_when_stderr_is_not_a_terminal(capsys):
    """A demo logged to a file or a pipe gets its result lines, not tqdm's carriage-return frames."""
    from types import SimpleNamespace

    from fastmeal.demo import _StageProgress

    hook = _StageProgress("distilled", True)
    hook.on_train_start(SimpleNamespace(cfg=SimpleNamespace(schedule=SimpleNamespace(epochs=3)), epoch=0))
    hook.bar.update(1)
    hook.bar.close()
    assert hook.bar.disable and "\r" not in capsys.readouterr().err
