"""Tables from benchmark result JSONs: printed, and written into benchmarks/README.md.

Usage:
    python benchmarks/summarize.py benchmarks/results            # print every result's table
    python benchmarks/summarize.py benchmarks/results --readme benchmarks/README.md
The README's generated part sits between two marker lines and is replaced whole, so the tables
there always come from the committed JSON files and never from hand-typed numbers.
"""

from __future__ import annotations

import argparse
import json
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


def render(docs: list[tuple[Path, dict]], root: Path) -> str:
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
        parts.append("")
    return "\n".join(parts)


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
    args = parser.parse_args()
    docs = load_results(args.folder)
    text = render(docs, args.folder)
    print(text if docs else f"no benchmark results under {args.folder}")
    if args.readme:
        update_readme(args.readme, text)


if __name__ == "__main__":
    main()
