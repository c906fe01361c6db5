"""``fastmeal table report``: the table beside the paper's numbers, from what ``OUT`` holds (finished or not).

Per row: the paper's top-1/top-5, the measured last and best top-1/top-5 (best: the exported
``student_best`` evaluated by the table's eval stage when it has run, else the best epoch's record), the
gap to the paper, the student's accuracy before training, epochs done, wall-clock and GPU-hours of its
stages, and whether it trained from a bank or online; shared stages (data, teachers, banks) have their own
lines, and the transfer row (``fastmeal probe``) is added when ``OUT/probe/probe.json`` exists. Written to
``OUT/report/``: ``table.md``, ``table.html`` (self-contained: the figures inline), ``table.png`` (measured
vs paper per row), and ``fastmeal report``'s pages of the rows' runs in ``OUT/report/runs/``.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from fastmeal.console import format_duration
from fastmeal.table.plan import PLAN_FILE, STATE_FILE, TableError, read_json

PROBE_FILE = Path("probe") / "probe.json"
PROBE_KEYS = ("model", "weights", "res", "realms", "mean_top1_clean", "mean_top1_omnibench", "paper")
COLUMNS = ("row", "trained", "paper top-1", "paper top-5", "last top-1", "last top-5", "best top-1", "best top-5",
           "gap top-1", "start top-1", "epochs", "wall-clock", "GPU-h", "status")


def _pct(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def read_probe(out: Path) -> dict[str, Any] | None:
    """``OUT/probe/probe.json`` (written by ``fastmeal probe``), or None; a file without the agreed keys is an error."""
    doc = read_json(out / PROBE_FILE)
    if doc is None:
        return None
    missing = [k for k in PROBE_KEYS if k not in doc]
    if missing:
        raise TableError(f"{out / PROBE_FILE} lacks {', '.join(missing)} (written by another fastmeal version?)")
    return doc


def table_rows(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """``(rows, shared stages, plan)`` with every number the report shows."""
    from fastmeal.report import PAPER, ReportError, eta_seconds, find_initial_top1, load_run

    plan = read_json(out / PLAN_FILE)
    if plan is None:
        raise TableError(f"{out} holds no table ({PLAN_FILE} missing): give the --out of `fastmeal table run`")
    states = (read_json(out / STATE_FILE) or {}).get("stages", {})
    stages = {s["name"]: s for s in plan["stages"]}

    def cost(name: str) -> tuple[float, float]:
        seconds = float(states.get(name, {}).get("seconds", 0.0))
        return seconds, seconds * max(stages[name]["gpus"], 1) / 3600

    rows = []
    for row in plan["rows"]:
        train, ev = f"train-{row['name']}", f"eval-{row['name']}"
        paper = PAPER.get(row["preset"]) if not plan.get("demo") else None
        status = states.get(train, {}).get("state", "pending")
        item: dict[str, Any] = {
            "row": row["name"], "preset": row["preset"], "mode": row["mode"], "bank": row["bank"],
            "paper_top1": paper.top1 if paper else None, "paper_top5": paper.top5 if paper else None,
            "epochs_total": row["epochs"], "epochs_done": 0, "status": status, "run_dir": row["run_dir"]}
        try:
            run = load_run(row["run_dir"])
        except ReportError:
            run = None
        if run is not None:
            item["epochs_done"], item["epochs_total"] = run.epochs_done, run.total_epochs or row["epochs"]
            if run.epochs:
                last = run.epochs[-1]
                best = max(run.epochs, key=lambda r: r.get("val_top1", -1.0))
                item.update(last_top1=last.get("val_top1"), last_top5=last.get("val_top5"),
                            best_top1=best.get("val_top1"), best_top5=best.get("val_top5"), best_from="metrics")
            initial = find_initial_top1(run)
            item["start_top1"] = initial[0] if initial else None
            if status != "done":
                eta = eta_seconds(run)
                item["status"] = f"{status}, ETA {format_duration(eta)}" if eta is not None else status
        result = read_json(Path(stages[ev]["result"]))
        if result is not None:  # the exported student_best, evaluated by its own command
            item.update(best_top1=result["top1"], best_top5=result["top5"], best_from="eval of student_best")
        seconds, hours = (sum(v) for v in zip(cost(train), cost(ev), strict=True))
        item.update(seconds=seconds, gpu_hours=hours)
        if item.get("last_top1") is not None and paper:
            item["gap_top1"] = item["last_top1"] - paper.top1
        rows.append(item)
    shared = []
    for stage in plan["stages"]:
        if stage["kind"] in ("data", "teacher", "bank"):
            seconds, hours = cost(stage["name"])
            shared.append({"stage": stage["name"], "kind": stage["kind"], "seconds": seconds, "gpu_hours": hours,
                           "status": states.get(stage["name"], {}).get("state", "pending"),
                           "serves": next((b["rows"] for b in plan["banks"] if b["name"] == stage["name"]), [])})
    return rows, shared, plan


def _cells(item: dict[str, Any]) -> list[str]:
    trained = f"bank ({item['bank']})" if item["mode"] == "bank" else "online"
    return [item["row"], trained, _pct(item["paper_top1"]), _pct(item["paper_top5"]), _pct(item.get("last_top1")),
            _pct(item.get("last_top5")), _pct(item.get("best_top1")), _pct(item.get("best_top5")),
            f"{item['gap_top1']:+.2f}" if item.get("gap_top1") is not None else "-", _pct(item.get("start_top1")),
            f"{item['epochs_done']}/{item['epochs_total']}", format_duration(item["seconds"]),
            f"{item['gpu_hours']:.2f}", item["status"]]


def _probe_cells(probe: dict[str, Any]) -> list[str]:
    paper = probe.get("paper")
    paper_top1 = paper.get("mean_top1") if isinstance(paper, dict) else paper
    return [f"transfer: OmniBenchmark linear probe ({len(probe['realms'])} realms)",
            f"{probe['model']} @ {probe['res']}",
            _pct(paper_top1), "-", _pct(probe["mean_top1_omnibench"]), "-", _pct(probe["mean_top1_clean"]), "-",
            f"{probe['mean_top1_omnibench'] - paper_top1:+.2f}" if isinstance(paper_top1, int | float) else "-",
            "-", "-", "-", "-", "done"]


def plot_table(rows: list[dict[str, Any]], path: Path, *, demo: bool) -> Path:
    """Bars per row: the paper's top-1 and the measured best top-1 (the last epoch's as a marker)."""
    from fastmeal.report import require_pyplot, save_png

    plt = require_pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2))
    xs = range(len(rows))
    paper = [r["paper_top1"] if r["paper_top1"] is not None else math.nan for r in rows]
    best = [r.get("best_top1") if r.get("best_top1") is not None else math.nan for r in rows]
    last = [r.get("last_top1") if r.get("last_top1") is not None else math.nan for r in rows]
    ax.bar([x - 0.2 for x in xs], paper, width=0.4, color="#999999", label="paper top-1")
    ax.bar([x + 0.2 for x in xs], best, width=0.4, color="#1f77b4", label="measured best top-1")
    ax.plot([x + 0.2 for x in xs], last, "k_", markersize=14, label="measured last top-1")
    ax.set_xticks(list(xs), [r["row"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("val top-1 (%)")
    finite = [v for v in paper + best + last if math.isfinite(v)]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
    ax.set_title("measured vs paper" + (" (demo table: no paper numbers)" if demo else ""))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def write_table_report(out: str | Path) -> dict[str, Path]:
    """Write ``OUT/report/table.{md,html,png}`` and the runs' ``fastmeal report``; returns the paths."""
    from fastmeal.report import ReportError, write_report

    out = Path(out)
    rows, shared, plan = table_rows(out)
    probe = read_probe(out)
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    figure = plot_table(rows, report_dir / "table.png", demo=bool(plan.get("demo")))
    curves = None
    runs = [r["run_dir"] for r in rows if r["epochs_done"] or Path(r["run_dir"], "config.json").exists()]
    if runs:
        try:
            curves = write_report(runs, report_dir / "runs").figures["accuracy"]
        except ReportError as err:  # a run dir that cannot be read yet: the table itself is still written
            print(f"no learning curves: {err}")
    body = [_cells(r) for r in rows] + ([_probe_cells(probe)] if probe else [])
    notes = _notes(plan, rows, shared)
    markdown = ["# fastmeal table", "", *notes, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    markdown += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    markdown += ["", "Shared stages:", "", "| stage | kind | serves | wall-clock | GPU-h | status |",
                 "|---|---|---|---|---|---|"]
    markdown += [f"| {s['stage']} | {s['kind']} | {', '.join(s['serves']) or '-'} | {format_duration(s['seconds'])} | "
                 f"{s['gpu_hours']:.2f} | {s['status']} |" for s in shared]
    markdown += ["", f"![measured vs paper]({figure.name})"]
    if curves is not None:
        markdown += ["", f"![learning curves](runs/{curves.name})"]
    md_path = _atomic_text(report_dir / "table.md", "\n".join(markdown) + "\n")
    page = _html(body, shared, notes, [figure] + ([curves] if curves else []))
    html_path = _atomic_text(report_dir / "table.html", page)
    return {"markdown": md_path, "html": html_path, "figure": figure}


def _notes(plan: dict[str, Any], rows: list[dict[str, Any]], shared: list[dict[str, Any]]) -> list[str]:
    total_s = sum(r["seconds"] for r in rows) + sum(s["seconds"] for s in shared)
    total_h = sum(r["gpu_hours"] for r in rows) + sum(s["gpu_hours"] for s in shared)
    est = plan["estimate"]
    lines = [f"Table in `{plan['out']}` ({'demo table' if plan.get('demo') else 'paper table'}); stage time so far "
             f"{format_duration(total_s)} (summed over stages; stages side by side overlap), {total_h:.2f} GPU-hours "
             "(a CPU stage counts as one device).",
             f"Planned: {est['gpu_hours']:.2f} GPU-hours, wall-clock {format_duration(est['wall_seconds'])} "
             f"({est['source']})."]
    if plan.get("demo"):
        lines.append("The paper columns are empty: the demo table's students and data are not the paper's.")
    else:
        lines.append("Paper: MEAL V2 (Shen & Savvides, 2020). gap = measured last top-1 - paper top-1; start = the "
                     "pretrained student's top-1 before distillation.")
    lines.append("best = the exported student_best evaluated by the table's eval stage (where it has run; else the "
                 "best epoch's record).")
    return lines


def _html(body: list[list[str]], shared: list[dict[str, Any]], notes: list[str], figures: list[Path]) -> str:
    """One page that opens from disk (``fastmeal report``'s style, tables and inline figures)."""
    from fastmeal.report import HTML_STYLE, html_image, html_table

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>fastmeal table</title>',
             HTML_STYLE, "</head><body>", "<h1>fastmeal table</h1>", *[f"<p>{html.escape(n)}</p>" for n in notes],
             html_table(COLUMNS, body), "<h2>Shared stages</h2>",
             html_table(("stage", "kind", "serves", "wall-clock", "GPU-h", "status"),
                        [[s["stage"], s["kind"], ", ".join(s["serves"]) or "-", format_duration(s["seconds"]),
                          f"{s['gpu_hours']:.2f}", s["status"]] for s in shared])]
    parts += [f"<h2>{html.escape(path.stem)}</h2>{html_image(path.stem, path)}" for path in figures]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _atomic_text(path: Path, text: str) -> Path:
    from fastmeal.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, text.encode())
    return path
