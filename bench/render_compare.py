"""Write the figures of a `livernode compare` run (its comparison.json) into README.md, between the
`compare table` markers, so the README quotes a measured comparison and says where it was measured.

    python bench/render_compare.py [comparison.json ...] [README.md]

Defaults: bench/compare/comparison.json (`make compare`), then bench/compare-long/comparison.json when it exists
(`make compare-long`: the longer recipe, shown as a second table), and the repository's README.md. Exits
non-zero, saying which, when a file or the markers are missing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from livernode.fsutil import write_between_markers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- compare table: begin (bench/render_compare.py) -->", "<!-- compare table: end -->"
HEADER = ("| configuration | parameters | training | inference s/study | liver Dice | tumour Dice | liver Dice raw | "
          "tumour Dice raw | VOE liver / tumour | RVD liver / tumour | ASSD mm liver / tumour | "
          "HD95 mm liver / tumour | lesion recall / precision |")


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _get(entry: dict, output: str, structure: str, key: str):
    return entry.get("summary", {}).get(output, {}).get(structure, {}).get(key)


def _pair(entry: dict, key: str, digits: int = 3) -> str:
    return " / ".join(_num(_get(entry, "delivered", s, key), digits) for s in ("liver", "tumour"))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def _row(e: dict) -> str:
    if e["status"] != "ok":
        reason = e["reason"].replace("|", "\\|").replace("\n", " ")
        return f"| {e['name']} | failed: {reason} |" + " |" * (HEADER.count("|") - 3)
    epochs = f"{e['epochs']} epoch{'s' if e['epochs'] != 1 else ''}"
    cells = [e["name"], f"{e['parameters'] / 1e6:.2f} M", f"{_duration(e['train_seconds'])}, {epochs}",
             _num(e["infer_seconds_per_study"], 2),
             _num(_get(e, "delivered", "liver", "dice_global")), _num(_get(e, "delivered", "tumour", "dice_global")),
             _num(_get(e, "network", "liver", "dice_global")), _num(_get(e, "network", "tumour", "dice_global")),
             _pair(e, "voe_mean"), _pair(e, "rvd_mean"), _pair(e, "assd_mm_mean", 1), _pair(e, "hd95_mm_mean", 1),
             " / ".join(_num(_get(e, "delivered", "tumour", k)) for k in ("lesion_recall", "lesion_precision"))]
    return "| " + " | ".join(cells) + " |"


def table(result: dict, commit: str) -> str:
    """The markdown for one comparison: where and how it was measured, then one row per configuration."""
    cmd = result["command"]
    tested = result.get("test_cases") or []
    recipe = f" --config {_shown(cmd['config'])}" if cmd.get("config") else ""
    intro = (f"Measured on commit {commit}: `livernode compare --format {cmd['format']}{recipe} --archs "
             f"{','.join(cmd['archs'])} --context {','.join(map(str, cmd['contexts']))}` on "
             f"`{Path(cmd['data']).name}`, {len(tested)} held-out test case{'s' if len(tested) != 1 else ''} "
             f"({', '.join(tested)}), {result['wall_seconds'] / 60:.1f} min in all. Dice is global (every test voxel "
             "pooled); the other figures are means per case, delivered (post-processed); raw = the network's own "
             "labels.")
    lines = [intro, "", HEADER, "|" + " --- |" * (HEADER.count("|") - 1)]
    if not result.get("same_split", True):
        lines.insert(1, "\n**The configurations were not tested on the same cases; compare with care.**")
    lines += [_row(e) for e in result["configurations"]]
    return "\n".join(lines)


def _shown(path: str) -> str:
    """A path as the reader would type it in the repository: relative to it when inside."""
    p = Path(path)
    return str(p.resolve().relative_to(REPO)) if p.is_absolute() and p.resolve().is_relative_to(REPO) else path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sources = [Path(a) for a in args if not a.endswith(".md")]
    readmes = [Path(a) for a in args if a.endswith(".md")]
    readme = readmes[0] if readmes else REPO / "README.md"
    if not sources:
        sources = [REPO / "bench" / "compare" / "comparison.json"]
        longer = REPO / "bench" / "compare-long" / "comparison.json"
        if longer.is_file():
            sources.append(longer)
    for source in sources:
        if not source.is_file():
            print(f"{source}: no such file; run `livernode compare ... --out DIR` first and pass DIR/comparison.json",
                  file=sys.stderr)
            return 1
    results = [json.loads(source.read_text()) for source in sources]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=False).stdout.strip() or "unknown"
    text = "\n\n".join(table(result, commit) for result in results)
    if not write_between_markers(readme, BEGIN, END, text):
        print(f"{readme}: the compare table markers are missing; add the lines\n{BEGIN}\n{END}\nwhere the table "
              "belongs", file=sys.stderr)
        return 1
    print(f"{readme}: {sum(len(r['configurations']) for r in results)} configurations written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
