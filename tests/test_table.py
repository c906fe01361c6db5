"""``fastmeal table``: the plan of the paper's table, bad input, the SLURM scripts, the report, and a tiny CPU
table run end to end (killed with SIGKILL past its first finished stage, then continued)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmeal.cli import main
from fastmeal.table.plan import PAPER_PRESETS, TableSpec, build_plan
from fastmeal.table.rates import FORMAT, Rates, Workload, default_rate, machine_identity

SHARED_224 = {"r50_224", "r18_224", "mnv3s075_224", "mnv3s100_224", "mnv3l100_224", "effb0_224"}


@pytest.fixture(scope="module")
def paper_plan():
    return build_plan(TableSpec(out="tbl", gpus_per_node=8), Rates())


def _imagefolder(root: Path) -> Path:
    for split in ("train", "val"):
        (root / split / "c0").mkdir(parents=True)
        (root / split / "c0" / "a.JPEG").write_bytes(b"x")
    return root


# --------------------------------------------------------------------------------------------
# The plan of the eight paper presets
# --------------------------------------------------------------------------------------------


def test_one_bank_serves_the_six_224_presets_of_senet_resnet152s(paper_plan):
    (bank,) = paper_plan.banks
    assert set(bank["rows"]) == SHARED_224
    assert bank["teachers"] == ["senet154.gluon_in1k", "resnet152s.gluon_in1k"]
    assert bank["epochs"] == 200 and bank["image_size"] == 224  # r50_224's 180 epochs read the first 180
    stage = paper_plan.stage(bank["name"])
    assert stage.argv[stage.argv.index("--epochs") + 1] == "0:200"
    for row in paper_plan.rows:
        train = paper_plan.stage(f"train-{row.name}")
        if row.name in SHARED_224:
            assert row.mode == "bank" and bank["name"] in train.deps
            assert f"bank.path={bank['path']}" in train.argv and train.argv[-2:] == ["--resume", "auto"]
        else:
            assert row.mode == "online" and not any(a.startswith("bank.path=") for a in train.argv)
    assert "first 180" in next(r for r in paper_plan.rows if r.name == "r50_224").reason


def test_cutmix_trains_online_and_r50_380_choice_follows_the_estimate(paper_plan):
    rows = {r.name: r for r in paper_plan.rows}
    assert rows["r50_224_cutmix"].mode == "online" and "CutMix" in rows["r50_224_cutmix"].reason
    # With default rates a bank for the single r50_380 student repeats the teachers' work: online.
    assert rows["r50_380"].mode == "online" and "online" in rows["r50_380"].reason
    assert "no other student" in rows["r50_380"].reason
    # Teachers measured 100x faster: the bank is now the faster way, and the plan must switch.
    spec = TableSpec(out="tbl", gpus_per_node=8, presets=("r50_380",))
    key = Workload(kind="teachers", teachers=("tf_efficientnet_b4.ns_jft_in1k", "tf_efficientnet_b4.aa_in1k"),
                   image_size=380, batch=64).key
    fast = Rates(measured={key: 100 * default_rate(Workload(kind="teachers", teachers=(
        "tf_efficientnet_b4.ns_jft_in1k", "tf_efficientnet_b4.aa_in1k"), image_size=380), "gpu")}, source="x")
    plan = build_plan(spec, fast)
    assert plan.rows[0].mode == "bank" and "faster" in plan.rows[0].reason


def test_estimates_add_up_and_the_bank_saves_against_online(paper_plan):
    est = paper_plan.estimate
    assert est["gpu_hours"] == pytest.approx(sum(s.gpu_hours for s in paper_plan.stages))
    for s in paper_plan.stages:
        assert s.gpu_hours == pytest.approx(s.seconds * s.gpus / 3600)
        assert s.rate_source == "default"
    assert est["saved_gpu_hours"] > 0 and est["online_gpu_hours"] > est["gpu_hours"]
    # One node of 8 GPUs, every stage on all 8: training stages cannot overlap, so the wall-clock is at least
    # the sum of the 8-GPU stages.
    eight = sum(s.seconds for s in paper_plan.stages if s.gpus == 8)
    assert est["wall_seconds"] >= eight
    # 6.1 GB per 200-epoch bank at K=5 (README): 1,281,167 x 24 B x 200.
    assert est["disk_bytes"]["banks"] == 1_281_167 * 24 * 200


def test_schedule_respects_dependencies_and_packs_half_node_stages(paper_plan):
    for s in paper_plan.stages:
        for d in s.deps:
            assert paper_plan.stage(d).end_s <= s.start_s + 1e-6
    halves = build_plan(TableSpec(out="tbl", gpus_per_node=8, gpus_per_stage=4), Rates())
    busy = sorted((s.start_s, s.end_s, s.gpus) for s in halves.stages)
    # At any moment at most 8 GPUs are in use, and some 4-GPU stages do run side by side.
    for t, _, _ in busy:
        assert sum(g for a, b, g in busy if a <= t < b) <= 8
    assert any(sum(1 for a, b, g in busy if g == 4 and a <= t < b) == 2 for t, _, _ in busy)
    assert halves.estimate["wall_seconds"] < sum(s.seconds for s in halves.stages if s.gpus == 4)


def test_plan_json_and_text_label_default_estimates(capsys, tmp_path):
    assert main(["table", "plan", "--gpus-per-node", "8", "--json", "--out", str(tmp_path / "t")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {s["name"] for s in doc["stages"]} >= {"train-r50_224", "eval-r50_380"}
    assert all({"deps", "command", "argv", "seconds", "gpus", "rate_source"} <= set(s) for s in doc["stages"])
    assert "default" in doc["estimates_from"] and doc["rates_file"] is None
    assert main(["table", "plan", "--gpus-per-node", "8", "--out", str(tmp_path / "t")]) == 0
    text = capsys.readouterr().out
    assert "DEFAULT rates (not measured)" in text and "torchrun --standalone --nproc-per-node 8" in text
    assert not (tmp_path / "t").exists()  # plan writes nothing


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing started
# --------------------------------------------------------------------------------------------


def test_unknown_preset_lists_the_valid_ones(capsys, tmp_path):
    assert main(["table", "plan", "--presets", "r50_224,r99", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "r99" in err and all(p in err for p in PAPER_PRESETS) and len(err.splitlines()) == 1


def test_data_root_without_train_and_val_is_refused_before_anything(capsys, tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    out = tmp_path / "out"
    assert main(["table", "run", "--gpus-per-node", "0", "--out", str(out), "--set",
                 f"data.root={tmp_path / 'data'}"]) == 2
    err = capsys.readouterr().err
    assert "no val/" in err and not out.exists()


def test_gpus_per_stage_that_do_not_divide_the_batch(capsys, tmp_path):
    assert main(["table", "plan", "--gpus-per-node", "8", "--gpus-per-stage", "6", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "r50_224" in err and "512" in err and "4 or 8" in err


def test_out_holding_another_plan_is_refused_unless_replan(capsys, tmp_path):
    from fastmeal.table.runner import open_table

    data = _imagefolder(tmp_path / "data")
    spec = TableSpec(out=str(tmp_path / "o"), overrides=(f"data.root={data}",), presets=("r18_224",), gpus_per_node=0)
    open_table(build_plan(spec, Rates(device_kind="cpu")), replan=False, say=lambda _: None)
    before = (tmp_path / "o" / "table_plan.json").read_bytes()
    assert main(["table", "run", "--gpus-per-node", "0", "--presets", "r50_224", "--set", f"data.root={data}",
                 "--out", str(tmp_path / "o")]) == 2
    assert "holds another table plan" in capsys.readouterr().err
    assert (tmp_path / "o" / "table_plan.json").read_bytes() == before


def test_not_enough_disk_is_refused(capsys, tmp_path, monkeypatch):
    import shutil

    data = _imagefolder(tmp_path / "data")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    assert main(["table", "run", "--gpus-per-node", "0", "--presets", "r18_224", "--set", f"data.root={data}",
                 "--out", str(tmp_path / "o")]) == 2
    assert "not enough disk" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rates_file_from_another_machine_warns_and_names_uncovered_stages(capsys, tmp_path):
    here = machine_identity()
    key = Workload(kind="student", model="resnet18.tv_in1k", image_size=224, batch=512).key
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"format": FORMAT, "machine": {**here, "device": "NVIDIA Z100"},
                                 "rates": {key: 1234.0}}))
    assert main(["table", "plan", "--presets", "r18_224", "--gpus-per-node", "0", "--rates", str(rates),
                 "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "another machine" in out and "NVIDIA Z100" in out
    assert "no measured rate for" in out and "online:resnet18.tv_in1k" in out
    assert "student:resnet18.tv_in1k@224" not in out.split("no measured rate for")[1].splitlines()[0]


# --------------------------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------------------------


def test_slurm_scripts_parse_chain_the_dag_and_run_the_planned_commands(tmp_path, capsys):
    out = tmp_path / "t"
    args = ["--nodes", "2", "--gpus-per-node", "8", "--gpus-per-stage", "16", "--out", str(out)]
    assert main(["table", "slurm", *args]) == 0
    assert main(["table", "plan", "--json", *args]) == 0
    plan = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    scripts = out / "slurm"
    for script in [*scripts.glob("*.sbatch"), scripts / "submit.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)
    submit = (scripts / "submit.sh").read_text()
    jobs = dict(re.findall(r"^(JOB_\d+)=\$\(sbatch --parsable .*?(\S+)\.sbatch\)$", submit, re.M))
    deps = {}
    for line in submit.splitlines():
        m = re.match(r"^(JOB_\d+)=\$\(sbatch --parsable (?:--dependency=afterok:(\S+) )?(\S+)\.sbatch\)$", line)
        if m:
            deps[m.group(3)] = sorted(jobs[v.lstrip("$")] for v in (m.group(2) or "").split(":") if v)
    stages = {s["name"]: s for s in plan["stages"]}
    assert deps == {name: sorted(s["deps"]) for name, s in stages.items()}
    for name, stage in stages.items():
        text = (scripts / f"{name}.sbatch").read_text()
        srun = next(line for line in text.splitlines() if line.startswith("srun "))
        fastmeal_args = shlex.split(srun.split(" -m fastmeal ", 1)[1].split(" > ")[0].rstrip(" &"))
        assert fastmeal_args == stage["argv"]
        assert srun.split("srun --ntasks-per-node=1 ", 1)[1].startswith(stage["command"])
        if stage["gpus"] == 16:
            assert "#SBATCH --nodes=2" in text and "--rdzv-backend c10d" in srun and "--max-restarts 3" in srun
        assert "scontrol requeue" in text and "--signal=B:USR1@120" in text


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _fake_run(run_dir: Path, preset: str, epochs: list[tuple[float, float]], total: int) -> None:
    from fastmeal.config import build_config

    run_dir.mkdir(parents=True)
    cfg = build_config(preset, overrides={"schedule.epochs": total})
    (run_dir / "config.json").write_text(cfg.to_json())
    lines = []
    for e, (top1, top5) in enumerate(epochs):
        lines.append({"kind": "train", "epoch": e, "step": 10, "global_step": 10 * (e + 1), "samples": 640,
                      "seconds": 2.0, "loss": 1.0})
        lines.append({"kind": "epoch", "epoch": e, "global_step": 10 * (e + 1), "val_top1": top1, "val_top5": top5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_report_puts_measured_beside_paper_with_transfer_row(tmp_path):
    from fastmeal.table.report import write_table_report
    from fastmeal.table.runner import open_table

    data = _imagefolder(tmp_path / "data")
    out = tmp_path / "t"
    spec = TableSpec(out=str(out), overrides=(f"data.root={data}",), presets=("r50_224", "r18_224"), gpus_per_node=0)
    plan = build_plan(spec, Rates(device_kind="cpu"))
    open_table(plan, replan=False, say=lambda _: None)
    _fake_run(out / "runs" / "r50_224", "r50_224", [(79.5, 94.5), (80.9, 95.2), (80.7, 95.1)], 3)
    _fake_run(out / "runs" / "r18_224", "r18_224", [(70.0, 89.0)], 4)  # still running
    (out / "eval").mkdir()
    (out / "eval" / "r50_224.json").write_text(json.dumps({"top1": 80.93, "top5": 95.21}))
    (out / "probe").mkdir()
    (out / "probe" / "probe.json").write_text(json.dumps({
        "model": "resnet50", "weights": "MEALV2_ResNet50_224.pth", "res": 224, "realms": {"bird": {}, "car": {}},
        "mean_top1_clean": 35.1, "mean_top1_omnibench": 36.0, "paper": 36.6}))
    report = write_table_report(out)
    md = report["markdown"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| r50_224 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:10] == ["80.67", "95.09", "80.70", "95.10", "80.93", "95.21", f"{80.7 - 80.67:+.2f}", "79.00"]
    assert cells[10] == "3/3" and cells[1].startswith("bank (")
    r18 = next(line for line in md.splitlines() if line.startswith("| r18_224 "))
    assert "1/4" in r18 and "73.19" in r18
    transfer = next(line for line in md.splitlines() if "OmniBenchmark" in line)
    assert "36.60" in transfer and "36.00" in transfer and "35.10" in transfer and "-0.60" in transfer
    page = report["html"].read_text()
    assert "data:image/png;base64," in page and "<script" not in page and "src=\"http" not in page
    assert report["figure"].read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_a_probe_file_without_the_agreed_keys(tmp_path):
    from fastmeal.table.plan import TableError
    from fastmeal.table.report import read_probe

    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "probe.json").write_text(json.dumps({"model": "resnet50"}))
    with pytest.raises(TableError, match="mean_top1_omnibench"):
        read_probe(tmp_path)


# --------------------------------------------------------------------------------------------
# A tiny CPU table, end to end, killed and continued
# --------------------------------------------------------------------------------------------

TINY = ("schedule.epochs=2", "runtime.max_steps_per_epoch=2", "data.batch_size=16", "data.workers=0",
        "runtime.checkpoint_every_steps=1")
# The table process of `fastmeal table run --demo`, with a smaller dataset than the CLI's demo (6 classes,
# 6 train and 4 val images each): most of a stage's time here is its process start-up.
_TABLE = """
import sys
from fastmeal.table.plan import DemoTable, TableSpec, build_plan
from fastmeal.table.rates import Rates
from fastmeal.table.runner import run_table

spec = TableSpec(out=sys.argv[1], demo=True, overrides=tuple(sys.argv[2:]),
                 demo_sizes=DemoTable(num_classes=6, train_per_class=6, val_per_class=4))
sys.exit(run_table(build_plan(spec, Rates(device_kind="cpu")), status_every=5))
"""


def _table(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _TABLE, str(out), *TINY, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_failing_stage_stops_the_table_naming_stage_code_and_log(tmp_path):
    proc = _table(tmp_path / "t", "runtime.device=cuda")  # the data stage runs; the first training cannot
    output = proc.communicate(timeout=600)[0]
    log = tmp_path / "t" / "logs" / "teacher0.log"
    assert proc.returncode == 2, output
    assert f"stage teacher0 failed with exit code 2; log: {log}" in output
    assert "runtime.device=cuda" in log.read_text()
    stages = json.loads((tmp_path / "t" / "table_state.json").read_text())["stages"]
    assert stages["data"]["state"] == "done" and stages["teacher0"]["state"] == "failed"
    assert all(s["attempts"] == 0 for name, s in stages.items() if name not in ("data", "teacher0"))


def test_an_unknown_model_tag_is_bad_input(capsys, tmp_path):
    assert main(["table", "plan", "--demo", "--set", "model.student=no_such_net", "--out", str(tmp_path)]) == 2
    assert "'no_such_net' is not a timm model" in capsys.readouterr().err


def _results(out: Path) -> dict[str, object]:
    got = {}
    for run in sorted((out / "runs").iterdir()):
        weights = load_file(run / "student_last.safetensors")
        got[run.name] = {k: v for k, v in weights.items()}
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        got[run.name + "/val"] = [(r["val_top1"], r["val_top5"]) for r in epochs if r.get("kind") == "epoch"]
    for result in sorted((out / "eval").glob("*.json")):
        doc = json.loads(result.read_text())
        got[result.name] = (doc["top1"], doc["top5"])
    return got


@pytest.mark.slow
def test_tiny_demo_table_killed_past_a_finished_stage_finishes_as_an_uninterrupted_one(tmp_path):
    reference = _table(tmp_path / "ref")
    assert reference.wait(timeout=600) == 0, reference.stdout.read()
    plan = json.loads((tmp_path / "ref" / "table_plan.json").read_text())
    assert {r["name"]: r["mode"] for r in plan["rows"]} == {"demo_bank_a": "bank", "demo_bank_b": "bank",
                                                            "demo_cutmix": "online"}

    killed = _table(tmp_path / "kill")
    state_file = tmp_path / "kill" / "table_state.json"
    deadline = time.time() + 600
    checkpoints = tmp_path / "kill" / "runs" / "teacher1" / "checkpoints"
    while time.time() < deadline:  # past the first finished training stage, once the next one has a checkpoint
        stages = json.loads(state_file.read_text())["stages"] if state_file.exists() else {}
        if stages.get("teacher0", {}).get("state") == "done" and (
                any(checkpoints.glob("ckpt-*.pt")) or stages["teacher1"]["state"] not in ("pending", "running")):
            break
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    resumed = _table(tmp_path / "kill")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "already done" in output
    state = json.loads(state_file.read_text())
    assert state["stages"]["teacher0"]["attempts"] == 1  # nothing finished is redone
    assert all(s["state"] == "done" for s in state["stages"].values())
    ref, got = _results(tmp_path / "ref"), _results(tmp_path / "kill")
    assert ref.keys() == got.keys()
    for key, value in ref.items():
        if isinstance(value, dict):
            assert all(torch.equal(value[k], got[key][k]) for k in value), key
        else:
            assert got[key] == value, key
    # The report of the finished demo table: the paper columns are empty and say so.
    assert main(["table", "report", "--out", str(tmp_path / "kill")]) == 0
    md = (tmp_path / "kill" / "report" / "table.md").read_text()
    assert "paper columns are empty" in md and "| demo_cutmix | online | - | - |" in md


# --------------------------------------------------------------------------------------------
# The runner's packing and signals, with stand-in stage commands (fast; no training)
# --------------------------------------------------------------------------------------------

_STAND_IN = """
import json, os, signal, sys, time
out, seconds = sys.argv[1], float(sys.argv[2])
os.makedirs(os.path.dirname(out), exist_ok=True)
record = {"devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": time.time(), "pgid": os.getpgid(0)}
def stop(signum, _frame):
    record["signal"] = signal.Signals(signum).name
    open(out + ".signal", "w").write(json.dumps(record))
    sys.exit(0 if signum == signal.SIGTERM else 130)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
time.sleep(seconds)
record["end"] = time.time()
open(out + ".done", "w").write(json.dumps(record))
print(json.dumps({"top1": 1.0, "top5": 2.0}))
"""


def _stand_in_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seconds: float):
    from fastmeal.table import runner

    data = _imagefolder(tmp_path / "data")
    spec = TableSpec(out=str(tmp_path / "t"), presets=("r18_224", "mnv3s075_224", "mnv3s100_224"),
                     overrides=(f"data.root={data}",), gpus_per_node=4, gpus_per_stage=2)
    plan = build_plan(spec, Rates())
    real_verify = runner.verify_stage
    monkeypatch.setattr(runner, "local_argv", lambda stage: [sys.executable, "-c", _STAND_IN, _marker(stage),
                                                             str(seconds)])
    # An eval stand-in prints a result that the real check reads; the others leave a marker in their output.
    monkeypatch.setattr(runner, "verify_stage", lambda stage: real_verify(stage) if stage.kind == "eval" else (
        Path(_marker(stage) + ".done").exists(), "stand-in"))
    monkeypatch.setattr(runner, "check_disk", lambda plan, done: None)
    return plan


def _marker(stage) -> str:
    """Where a stand-in stage records what it saw (inside its output; beside it for an eval's result file)."""
    return stage.output + (".stand-in" if stage.kind == "eval" else "/stand-in")


def test_runner_packs_independent_stages_on_disjoint_gpu_sets(tmp_path, monkeypatch):
    from fastmeal.table.runner import run_table

    plan = _stand_in_plan(tmp_path, monkeypatch, seconds=1.0)
    assert run_table(plan, status_every=0.5) == 0
    spans = {s.name: json.loads(Path(_marker(s) + ".done").read_text()) for s in plan.stages}
    for s in plan.stages:
        assert len(spans[s.name]["devices"].split(",")) == s.gpus
        for d in s.deps:  # dependencies finished first
            assert spans[d]["end"] <= spans[s.name]["start"]
    names = list(spans)
    overlapping = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                   if spans[a]["start"] < spans[b]["end"] and spans[b]["start"] < spans[a]["end"]]
    for a, b in overlapping:
        assert not set(spans[a]["devices"].split(",")) & set(spans[b]["devices"].split(",")), (a, b)
    assert any(a.startswith("train-") and b.startswith("train-") for a, b in overlapping)
    states = json.loads((Path(plan.spec.out) / "table_state.json").read_text())["stages"]
    assert all(s["state"] == "done" and s["attempts"] == 1 for s in states.values())


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 0), (signal.SIGUSR1, 0), (signal.SIGINT, 130)])
def test_table_signals_reach_the_running_stages(tmp_path, monkeypatch, signum, code):
    import threading

    from fastmeal.table.runner import run_table

    plan = _stand_in_plan(tmp_path, monkeypatch, seconds=60.0)
    bank = plan.stages[0] if plan.stages[0].kind == "bank" else next(s for s in plan.stages if s.kind == "bank")
    state_file = Path(plan.spec.out) / "table_state.json"

    def send() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            if state_file.exists() and json.loads(state_file.read_text())["stages"][bank.name]["state"] == "running":
                time.sleep(1.0)  # the stand-in has installed its handlers
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.05)

    threading.Thread(target=send, daemon=True).start()
    start = time.time()
    assert run_table(plan, status_every=60) == code
    assert time.time() - start < 30  # the stage stopped on the signal, not after its 60 s
    got = json.loads(Path(_marker(bank) + ".signal").read_text())
    assert got["signal"] == ("SIGINT" if signum == signal.SIGINT else "SIGTERM")
    assert got["pgid"] != os.getpgid(0)  # its own process group: a terminal's Ctrl-C reaches it only through the table
    states = json.loads(state_file.read_text())["stages"]
    assert states[bank.name]["state"] == "stopped" and all(
        s["attempts"] == 0 for n, s in states.items() if n != bank.name)


def test_replan_keeps_finished_stages_that_still_fit_and_sets_changed_ones_aside(tmp_path, monkeypatch):
    from fastmeal.table.plan import TableError
    from fastmeal.table.runner import run_table

    first = _stand_in_plan(tmp_path, monkeypatch, seconds=0.1)
    assert run_table(first, status_every=60) == 0
    # Two of the three students: the bank still serves both (same command), r18's commands are unchanged.
    smaller = build_plan(TableSpec(**{**vars(first.spec), "presets": ("r18_224", "mnv3s075_224")}), Rates())
    # r18 alone: it trains online now, so its training and eval commands changed.
    alone = build_plan(TableSpec(**{**vars(first.spec), "presets": ("r18_224",)}), Rates())
    with pytest.raises(TableError, match="holds another table plan"):
        run_table(alone)
    assert run_table(smaller, replan=True, status_every=60) == 0
    states = json.loads((Path(first.spec.out) / "table_state.json").read_text())["stages"]
    assert set(states) == {s.name for s in smaller.stages}
    assert all(s["attempts"] == 1 for s in states.values())  # nothing was redone
    assert run_table(alone, replan=True, status_every=60) == 0
    states = json.loads((Path(first.spec.out) / "table_state.json").read_text())["stages"]
    assert states["train-r18_224"]["attempts"] == 1 and states["eval-r18_224"]["attempts"] == 1
    assert any(p.name.startswith("r18_224.replaced-") for p in (Path(first.spec.out) / "runs").iterdir())
    assert Path(_marker(alone.stage("train-r18_224")) + ".done").exists()
