"""Write the figures the reliability tests measured in the last run (build/reliability-figures.json) into
RELIABILITY.md, between its `figures: begin` and `figures: end` markers, so the document quotes measurements and
not settings. `make reliability-figures` runs it after `make test`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from livernode.fsutil import write_between_markers

REPO = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- figures: begin (written by tests/reliability/render_figures.py) -->", "<!-- figures: end -->"


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ")


def render(figures: dict) -> str:
    rows = ["| test | figure | measured |", "| --- | --- | --- |"]
    for test in sorted(figures):
        for name, value in sorted(figures[test].items()):
            rows.append(f"| `{test}` | {name} | {_cell(value)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    source = REPO / "build" / "reliability-figures.json"
    if not source.exists():
        print(f"{source}: no figures yet; run `make test` first", file=sys.stderr)
        return 1
    doc = REPO / "RELIABILITY.md"
    if not write_between_markers(doc, BEGIN, END, render(json.loads(source.read_text()))):
        print(f"{doc}: the figures markers are missing", file=sys.stderr)
        return 1
    print(f"{doc}: figures of {len(json.loads(source.read_text()))} tests written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
