"""The benchmarks run and write honest documents: never a speed assertion (STYLE: a benchmark is a script).

``bench_train_step.py --quick`` runs as a subprocess (the CI smoke run of the whole step, both modes);
its pieces (FLOP counting, phase timing, the JPEG set) are checked against known properties; the
README's results table must be the one ``summarize.py`` generates from the committed JSON files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmeal.config import build_config
from fastmeal.data.common import scan_split
from fastmeal.models.discriminator import Discriminator
from fastmeal.models.factory import build_teachers, create_model

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_train_step  # noqa: E402
import summarize  # noqa: E402

PHASES = ("data", "teachers", "student_fwd", "loss", "backward", "optimizer")


def test_quick_run_writes_both_modes_and_the_ratio(tmp_path):
    out = tmp_path / "train_step.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_train_step.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    assert doc["benchmark"] == "train_step"
    for key in ("commit", "device", "versions", "settings", "rows", "notes"):
        assert key in doc, key
    settings = doc["settings"]
    assert settings["quick"] is True
    assert settings["modes"] == ["reference", "fastmeal", "bank"]
    flops = settings["flops_per_image"]
    parts = sum(v for k, v in flops.items() if k.startswith("teacher:")) + flops["student_fwd_bwd"]
    assert flops["total"] == pytest.approx(parts)
    # Backward costs about twice the forward (the first layer's input gradient is not computed).
    assert 2.0 < flops["student_fwd_bwd"] / flops["student_fwd"] <= 3.0
    assert settings["matmul_peak"]["peak_tflops"] > 0

    rows = doc["rows"]
    assert {(r["mode"], r["batch"]) for r in rows} == {(m, b) for m in ("reference", "fastmeal", "bank")
                                                       for b in settings["batches"]}
    for row in rows:
        phases = [p for p in PHASES if p != "teachers" or row["mode"] != "bank"]  # the bank step has no teachers
        for key in ("images_per_s", "step_images_per_s", "mfu_pct", *(f"ms_{p}" for p in phases)):
            assert math.isfinite(row[key]) and row[key] > 0, (row["mode"], key, row[key])
        assert 0 <= row["data_wait_pct"] < 100
        assert row["images_per_s_min"] <= row["images_per_s_median"] <= row["images_per_s_max"]
        # The MFU is the row's own rate times the counted FLOPs over the measured peak (4 significant digits).
        counted = flops["student_fwd_bwd"] if row["mode"] == "bank" else flops["total"]
        mfu = 100 * counted * row["images_per_s"] / (settings["matmul_peak"]["peak_tflops"] * 1e12)
        assert row["mfu_pct"] == pytest.approx(mfu, rel=2e-3)
    by_mode = {r["mode"]: r for r in rows}
    ref, fm = by_mode["reference"], by_mode["fastmeal"]
    assert ref["loader"] == "torchvision-reference"
    assert fm["loader"] in ("dali", "torchvision")
    assert ref["speedup_vs_ref"] == 1.0
    assert fm["speedup_vs_ref"] == pytest.approx(fm["images_per_s"] / ref["images_per_s"], rel=2e-3)
    assert fm["step_speedup_vs_ref"] == pytest.approx(fm["step_images_per_s"] / ref["step_images_per_s"], rel=2e-3)
    if fm["loader"] != "dali":
        assert any("not DALI" in note for note in doc["notes"])
    if not torch.cuda.is_available():
        assert any(note.startswith("CPU SMOKE RUN") for note in doc["notes"])
        assert all(r["peak_mib"] is None for r in rows)
    # The teacher engine's report is recorded with the numbers (BN folding, graphs).
    assert settings["teacher_engine"]["num_teachers"] == len(settings["teachers"])
    assert f"batch {settings['batches'][0]}: fastmeal" in proc.stdout
    assert by_mode["bank"].get("ms_teachers") is None and by_mode["bank"]["loader"] == fm["loader"]
    assert f"batch {settings['batches'][0]}: bank" in proc.stdout

    # The short table the device suite prints last reads the same file.
    summary = subprocess.run([sys.executable, str(BENCHMARKS / "bench_train_step.py"), "--summary", str(out)],
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert "speedup_vs_ref" in summary.stdout and "fastmeal" in summary.stdout


def test_flop_count_matches_the_spec_at_224():
    # SPEC, "Compute per training image": ResNet-152s forward 25.8 GFLOP, ResNet-50 forward+backward 24.7.
    cfg = build_config("r50_224", overrides={"model.teachers": [{"tag": "resnet152s"}], "model.pretrained": False})
    flops = bench_train_step.count_flops(cfg)
    assert flops["teacher:resnet152s"] / 1e9 == pytest.approx(25.8, rel=0.02)
    assert flops["student_fwd_bwd"] / 1e9 == pytest.approx(24.7, rel=0.03)
    assert flops["total"] == pytest.approx(flops["teacher:resnet152s"] + flops["student_fwd_bwd"])


def test_timed_phases_times_the_products_step_and_restores_phase():
    import fastmeal.objectives
    import fastmeal.profiling
    import fastmeal.trainer
    from fastmeal.batch import Batch
    from fastmeal.objectives import MealV2, TrainedModel

    torch.manual_seed(0)

    def teachers(images):
        time.sleep(0.02)
        return torch.randn(2, 3, 5)

    objective = MealV2(teachers=teachers, discriminator=Discriminator(5), impl="torch")
    model = TrainedModel(torch.nn.Linear(12, 5), objective)
    batch = Batch(torch.randn(3, 12), torch.zeros(3, dtype=torch.int64))
    with bench_train_step.timed_phases(torch.device("cpu")) as seconds:
        objective.prepare(batch)  # the teachers' phase
        out = model(batch.images, batch.labels, batch.targets)
        with bench_train_step.phase("data"):
            pass
    assert seconds["teachers"] >= 0.02
    assert {"student_fwd", "loss", "data"} <= seconds.keys()
    assert torch.isfinite(out["loss"])
    assert fastmeal.trainer.phase is fastmeal.objectives.phase is fastmeal.profiling.phase
    assert bench_train_step.phase is fastmeal.profiling.phase


def test_prepare_jpegs_links_copies(tmp_path):
    count = bench_train_step.prepare_jpegs(tmp_path, num_classes=2, files_per_class=1, copies=3, size_range=(16, 24),
                                           workers=1)
    split = scan_split(tmp_path, "train")
    assert count == len(split) == 6
    for class_dir in (tmp_path / "train").iterdir():
        files = sorted(class_dir.iterdir())
        assert len(files) == 3
        assert all(f.read_bytes() == files[0].read_bytes() for f in files)


def test_build_teachers_checks_the_count_of_given_models():
    cfg = build_config("demo")  # two teachers
    with pytest.raises(ValueError, match="1 teacher models for 2 model.teachers"):
        build_teachers(cfg, torch.device("cpu"), models=[create_model("test_resnet", num_classes=10)])


def test_readme_table_is_generated_from_the_committed_results():
    results = BENCHMARKS / "results"
    readme = (BENCHMARKS / "README.md").read_text()
    assert summarize.BEGIN in readme and summarize.END in readme
    generated = readme.split(summarize.BEGIN, 1)[1].split(summarize.END, 1)[0].strip()
    expected = summarize.render(summarize.load_results(results), results, BENCHMARKS / "figures", BENCHMARKS).strip()
    assert generated == expected, REGENERATE


REGENERATE = ("run: python benchmarks/summarize.py benchmarks/results --readme benchmarks/README.md "
              "--plot benchmarks/figures")


def test_readme_figures_were_drawn_from_the_committed_results():
    # Pixels depend on the matplotlib and FreeType versions; the JSON a figure was drawn from does not.
    from PIL import Image

    docs = [(path, doc) for path, doc in summarize.load_results(BENCHMARKS / "results") if summarize.plottable(doc)]
    assert docs
    figures = BENCHMARKS / "figures"
    for path, _ in docs:
        png = figures / summarize.figure_name(path)
        assert png.exists(), f"{png} is missing; {REGENERATE}"
        drawn_from = Image.open(png).text.get("Source-SHA256")
        assert drawn_from == summarize.source_sha256(path), f"{png} is stale; {REGENERATE}"
    expected = {summarize.figure_name(path) for path, _ in docs}
    assert {p.name for p in figures.glob("*.png")} == expected, f"figures without a result; {REGENERATE}"


def test_plot_draws_any_modes_and_batches(tmp_path):
    # A device result as it will look once the bank mode exists: three modes, two batches.
    pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    rows = []
    for batch in (64, 128):
        for mode, rate in (("reference", 300.0), ("fastmeal", 1200.0), ("bank", 3500.0)):
            rows.append({"mode": mode, "batch": batch, "images_per_s": rate, "images_per_s_min": 0.9 * rate,
                         "images_per_s_max": 1.1 * rate, "step_images_per_s": 1.2 * rate, "mfu_pct": rate / 100,
                         "step_mfu_pct": rate / 90, "speedup_vs_ref": rate / 300.0,
                         **{f"ms_{p}": 1000 * batch / rate / 7 for p in summarize.PHASES}})
    result = tmp_path / "results" / "train_step_h100.json"
    result.parent.mkdir()
    result.write_text(json.dumps({"benchmark": "train_step", "device": "NVIDIA H100", "commit": "0" * 40,
                                  "rows": rows, "notes": []}))
    docs = summarize.load_results(result.parent)
    (png,) = summarize.plot_results(docs, tmp_path / "figures")
    image = Image.open(png)
    assert image.text["Axes"].splitlines() == ["End-to-end images/s by mode and batch",
                                               "Step time by phase (ms, synchronised pass)",
                                               "MFU (% of the measured matmul peak)"]
    assert image.text["Source-SHA256"] == summarize.source_sha256(result)
    assert np.asarray(image.convert("L"), dtype=float).std() > 10
    # Drawn again from the same JSON: the same bytes (no date or version stamp).
    first = png.read_bytes()
    summarize.plot_results(docs, tmp_path / "figures")
    assert png.read_bytes() == first
    text = summarize.render(docs, result.parent, tmp_path / "figures", tmp_path)
    assert "![train_step on NVIDIA H100](figures/train_step_h100.png)" in text


def test_device_suite_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(BENCHMARKS / "device_suite.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_loss_share_of_the_step_is_amdahls_law_on_measured_times(tmp_path):
    import bench_kd_loss

    times = (("reference", 3.0), ("torch", 2.0), ("kernel", 0.5))
    rows = [{"mode": m, "batch": 64, "median_ms": ms} for m, ms in times]
    rows.append({"mode": "kernel", "batch": 128, "median_ms": 1.0})  # no step time at this batch: left alone
    # The step (10 ms at batch 64) ran the kernel: with the reference chain instead it takes 12.5 ms.
    bench_kd_loss.add_step_share(rows, {64: 10.0}, "kernel")
    share = {r["mode"]: r.get("loss_share_of_step_pct") for r in rows if r["batch"] == 64}
    speedup = {r["mode"]: r.get("step_speedup_from_loss") for r in rows if r["batch"] == 64}
    assert share == pytest.approx({"reference": 24.0, "torch": 2.0 / 11.5 * 100, "kernel": 5.0})
    assert speedup == pytest.approx({"reference": 1.0, "torch": 12.5 / 11.5, "kernel": 1.25})  # a 6x loss, 1.25x step
    assert "loss_share_of_step_pct" not in rows[-1]

    doc = {"device": "NVIDIA H200", "rows": [{"mode": "fastmeal", "batch": 64, "step_images_per_s": 3200.0},
                                             {"mode": "reference", "batch": 64, "step_images_per_s": 500.0},
                                             {"mode": "fastmeal", "batch": 256, "step_images_per_s": None}]}
    (tmp_path / "ts.json").write_text(json.dumps(doc))
    assert bench_kd_loss.step_times_ms(str(tmp_path / "ts.json")) == ({64: pytest.approx(20.0)}, "kernel")
    assert bench_kd_loss.step_times_ms(str(tmp_path / "absent.json")) == ({}, "kernel")


def _fake_suite(tmp_path, budget_s: int, slow: str) -> dict:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SUITE_FAKE": "1", "SUITE_SLOW": slow,
           "SUITE_BUDGET_S": str(budget_s), "FASTMEAL_COMMIT": "test"}
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(BENCHMARKS / "device_suite.sh")], capture_output=True, text=True, env=env,
                          timeout=budget_s + 30)
    elapsed = time.perf_counter() - start
    status = json.loads((tmp_path / "out" / "suite_status.json").read_text())
    return {"proc": proc, "elapsed": elapsed, "status": status}


@pytest.mark.parametrize("slow", ["pytest-gpu", "bench_train_step"])
def test_device_suite_every_step_reports_within_budget_when_one_hangs(tmp_path, slow):
    """The scheduler alone (SUITE_FAKE: every step sleeps 0.1 s) at 1/20 of the default budget: the hanging step
    is killed at its limit and every later step still gets its minimum and reports."""
    run = _fake_suite(tmp_path, 23, slow)
    steps = run["status"]["steps"]
    suite = (BENCHMARKS / "device_suite.sh").read_text()
    table = suite.split("STEPS=(", 1)[1].split(")", 1)[0]
    names = [line.split()[0] for line in table.strip().splitlines() if line.strip().startswith('"')]
    assert [s["step"] for s in steps] == [n.strip('"') for n in names]
    for step in steps:
        if step["step"] == slow:
            assert step["verdict"].startswith("TIMED OUT")
        else:
            assert step["verdict"] == "ok", step
    assert run["elapsed"] < 23 and run["status"]["seconds"] <= 23
    assert run["proc"].returncode == 1  # a step timed out
    assert f"{slow}: TIMED OUT" in run["proc"].stdout
