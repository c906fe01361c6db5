"""Tables from benchmark result JSONs: printed, and written into benchmarks/README.md.

Usage:
    python benchmarks/summarize.py benchmarks/results            # print every result's table
    python benchmarks/summarize.py benchmarks/results --readme benchmarks/README.md --plot benchmarks/figures
The README's generated part sits between two marker lines and is replaced whole, so the tables
there always come from the committed JSON files and never from hand-typed numbers.

``--plot DIR`` draws one PNG per result that has a figure (``<result name>.png``; needs matplotlib:
``pip install 'fastmeal[report]'``): for ``train_step`` the images/s per mode and batch with each
mode's ratio to the reference written on its bar, the per-phase time of a step as stacked bars and
the MFU; for the others their headline number per variant. With ``--readme`` the figures are
embedded under their tables. Each PNG records the SHA-256 of the JSON it was drawn from (PNG text
field ``Source-SHA256``), so a stale figure can be told from a fresh one without comparing pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

BEGIN = "<!-- BEGIN GENERATED RESULTS (benchmarks/summarize.py) -->"
END = "<!-- END GENERATED RESULTS -->"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def load_results(folder: Path) -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(folder.rglob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and "benchmark" in doc and "rows" in doc:
            docs.append((path, doc))
    return docs


def markdown_table(doc: dict) -> str:
    rows = doc["rows"]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def render(docs: list[tuple[Path, dict]], root: Path, figures: Path | None = None,
           link_base: Path | None = None) -> str:
    """The Markdown of every result; with ``figures``, each plottable result's PNG linked under its table
    (the link is relative to ``link_base``, the README's folder)."""
    parts = []
    for path, doc in docs:
        versions = doc.get("versions", {})
        parts.append(f"### {doc['benchmark']} — {doc.get('device', '?')}\n\n"
                     f"`{path.relative_to(root) if path.is_relative_to(root) else path}` · commit "
                     f"`{str(doc.get('commit', '?'))[:12]}` · {doc.get('time_utc', '?')} · torch "
                     f"{versions.get('torch', '?')} · triton {versions.get('triton', '?')} · DALI "
                     f"{versions.get('nvidia.dali', '?')}\n")
        parts.append(markdown_table(doc) if doc["rows"] else "(no rows)")
        parts += [f"\n> {note}" for note in doc.get("notes", [])]
        if figures is not None and plottable(doc):
            link = os.path.relpath(figures / figure_name(path), link_base or Path.cwd())
            parts.append(f"\n![{doc['benchmark']} on {doc.get('device', '?')}]({Path(link).as_posix()})")
        parts.append("")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Figures (--plot)
# --------------------------------------------------------------------------------------------

PHASES = ("data", "teachers", "student_fwd", "loss", "backward", "optimizer", "other")
# Results without a dedicated figure: value column, its axis label, bar label columns, group column, title,
# ratio column written on the bars, and the series whose bars get no ratio (the one it is relative to).
BARS = {
    "kd_loss": ("median_ms", "ms (median)", ("mode",), "batch",
                "MEAL V2 loss forward + backward (ms, lower is better)", "speedup_vs_ref", None),
    "teachers": ("img_per_s", "images/s", ("variant",), "target", "Teacher images/s by engine variant",
                 "speedup_vs_ref", None),
    "loader": ("images_per_s", "images/s", ("backend",), "split", "Loader images/s by backend (ratio: DALI ÷ "
               "torchvision)", "dali_over_torchvision", "torchvision"),
}


def figure_name(path: Path) -> str:
    return path.with_suffix(".png").name


def plottable(doc: dict) -> bool:
    return bool(doc.get("rows")) and (doc["benchmark"] == "train_step" or doc["benchmark"] in BARS)


def source_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _title(fig, doc: dict) -> None:
    smoke = "\nCPU SMOKE RUN: says nothing about GPU speed" if any(
        str(n).startswith("CPU SMOKE RUN") for n in doc.get("notes", [])) else ""
    fig.suptitle(f"{doc['benchmark']} on {doc.get('device', '?')} · commit {str(doc.get('commit', '?'))[:12]}{smoke}",
                 fontsize=10)


def _modes(rows: list[dict]) -> list[str]:
    """Modes in the order the benchmark ran them (reference first), whatever they are (bank, ...)."""
    return list(dict.fromkeys(r["mode"] for r in rows))


def _ratio(row: dict, rows: list[dict]) -> float | None:
    if isinstance(row.get("speedup_vs_ref"), int | float):
        return row["speedup_vs_ref"]
    ref = next((r for r in rows if r["mode"] == "reference" and r["batch"] == row["batch"]), None)
    if ref and ref.get("images_per_s") and row.get("images_per_s"):
        return row["images_per_s"] / ref["images_per_s"]
    return None


def _num(value) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def plot_train_step(plt, doc: dict):
    """Images/s per mode and batch (ratio on the bars), stacked phase times, MFU."""
    rows = doc["rows"]
    modes, batches = _modes(rows), sorted({r["batch"] for r in rows})
    by_key = {(r["mode"], r["batch"]): r for r in rows}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (rate_ax, phase_ax, mfu_ax) = plt.subplots(1, 3, figsize=(17, 5))
    width = 0.8 / len(modes)

    rate_ax.set_title("End-to-end images/s by mode and batch")
    for i, mode in enumerate(modes):
        for j, batch in enumerate(batches):
            row = by_key.get((mode, batch))
            if row is None:
                continue
            x, rate = j + (i - (len(modes) - 1) / 2) * width, _num(row.get("images_per_s"))
            low, high = _num(row.get("images_per_s_min")), _num(row.get("images_per_s_max"))
            err = [[rate - low], [high - rate]] if math.isfinite(low) and math.isfinite(high) else None
            rate_ax.bar(x, rate, width, color=colours[i % len(colours)], yerr=err, capsize=3,
                        label=mode if j == 0 else None)
            step = _num(row.get("step_images_per_s"))
            if math.isfinite(step):
                rate_ax.plot([x - width / 2, x + width / 2], [step, step], color="k", lw=1.5,
                             label="same step, no loader" if i == 0 and j == 0 else None)
            ratio = _ratio(row, rows)
            if ratio is not None:
                rate_ax.text(x, rate / 2, f"{ratio:.2f}×", ha="center", va="center", fontsize=9, color="white",
                             fontweight="bold")
    rate_ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    rate_ax.set_ylabel("images/s (bars: JPEG files → optimiser step)")
    rate_ax.legend(fontsize=8)

    phase_ax.set_title("Step time by phase (ms, synchronised pass)")
    labels = [f"{m}\nb{b}" for b in batches for m in modes if (m, b) in by_key]
    bottoms = [0.0] * len(labels)
    keys = [(m, b) for b in batches for m in modes if (m, b) in by_key]
    phase_names = [p for p in PHASES if any(f"ms_{p}" in r for r in rows)]
    phase_colours = plt.get_cmap("tab10").colors
    for k, name in enumerate(phase_names):
        heights = [max(_num(by_key[key].get(f"ms_{name}")), 0.0) if math.isfinite(_num(by_key[key].get(f"ms_{name}")))
                   else 0.0 for key in keys]
        phase_ax.bar(range(len(keys)), heights, 0.6, bottom=bottoms, label=name, color=phase_colours[k % 10])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for x, key in enumerate(keys):
        row = by_key[key]
        rate = _num(row.get("images_per_s"))
        if math.isfinite(rate) and rate > 0:
            phase_ax.plot([x - 0.35, x + 0.35], [1000 * key[1] / rate] * 2, color="k", lw=2,
                          label="timed step (end to end)" if x == 0 else None)
    phase_ax.set_xticks(range(len(keys)), labels, fontsize=8)
    phase_ax.set_ylabel("ms per step")
    phase_ax.legend(fontsize=7, ncol=2)

    mfu_ax.set_title("MFU (% of the measured matmul peak)")
    for i, (column, label) in enumerate((("mfu_pct", "end to end"), ("step_mfu_pct", "step without loader"))):
        values = [_num(by_key[key].get(column)) for key in keys]
        if any(math.isfinite(v) for v in values):
            mfu_ax.bar([x + (i - 0.5) * 0.38 for x in range(len(keys))], values, 0.38, label=label,
                       color=colours[(i + 2) % len(colours)])
    mfu_ax.set_xticks(range(len(keys)), labels, fontsize=8)
    mfu_ax.set_ylabel("%")
    mfu_ax.legend(fontsize=8)
    for ax in (rate_ax, phase_ax, mfu_ax):
        ax.grid(axis="y", alpha=0.3)
    _title(fig, doc)
    fig.tight_layout()
    return fig


def plot_bars(plt, doc: dict):
    """One bar per row, grouped by the group column, the ratio column written on the bars."""
    value, unit, label_columns, group, title, ratio, baseline = BARS[doc["benchmark"]]
    rows = [r for r in doc["rows"] if math.isfinite(_num(r.get(value)))]
    groups = list(dict.fromkeys(str(r.get(group, "")) for r in rows))
    series = list(dict.fromkeys(" ".join(str(r.get(c, "")) for c in label_columns) for r in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(max(9, 0.8 * len(groups) * max(len(series), 1) + 3), 4.8))
    width = 0.8 / max(len(series), 1)
    for row in rows:
        name = " ".join(str(row.get(c, "")) for c in label_columns)
        i, j = series.index(name), groups.index(str(row.get(group, "")))
        x, height = j + (i - (len(series) - 1) / 2) * width, _num(row[value])
        ax.bar(x, height, width, color=colours[i % len(colours)], label=name if name not in
               ax.get_legend_handles_labels()[1] else None)
        r = _num(row.get(ratio))
        if math.isfinite(r) and name != baseline:
            ax.text(x, height, f"{r:.2f}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), [f"{group} {g}" for g in groups], fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(f"{unit} ({value})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _title(fig, doc)
    fig.tight_layout()
    return fig


def plot_results(docs: list[tuple[Path, dict]], out: Path) -> list[Path]:
    """Draw every plottable result into ``out`` (``<result name>.png``); returns the files written."""
    from fastmeal.report import require_pyplot, save_png

    plt = require_pyplot()
    written = []
    for path, doc in docs:
        if not plottable(doc):
            continue
        fig = plot_train_step(plt, doc) if doc["benchmark"] == "train_step" else plot_bars(plt, doc)
        written.append(save_png(fig, out / figure_name(path), metadata={"Source-SHA256": source_sha256(path)}))
    return written


def update_readme(readme: Path, text: str) -> None:
    current = readme.read_text() if readme.exists() else ""
    block = f"{BEGIN}\n\n{text}\n{END}"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        current = head + block + tail
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    readme.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--readme", type=Path, help="write the tables into this markdown file")
    parser.add_argument("--plot", type=Path, metavar="DIR",
                        help="draw the results as PNGs into DIR (and embed them with --readme); needs matplotlib")
    args = parser.parse_args()
    docs = load_results(args.folder)
    if args.plot:
        from fastmeal.report import ReportError

        try:
            for png in plot_results(docs, args.plot):
                print(f"figure written to {png}")
        except ReportError as err:
            raise SystemExit(f"summarize.py --plot: {err}") from err
    text = render(docs, args.folder, args.plot, args.readme.parent if args.readme else None)
    print(text if docs else f"no benchmark results under {args.folder}")
    if args.readme:
        update_readme(args.readme, text)


if __name__ == "__main__":
    main()
