"""Write the figures of the last `make bench-train` (bench/train_results.json) into README.md, between the
`bench-train table` markers, so the README quotes a measurement and says which commit it was measured on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from livernode.fsutil import write_between_markers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench-train table: begin (bench/render_train.py) -->", "<!-- bench-train table: end -->"


def table(r: dict, commit: str) -> str:
    mem, speed, lits = r["memory_and_cache"], r["speed"]["rows"], r["lits_projection"]
    setup = r.get("seconds_with_make_setup_on_a_clean_clone")
    took = f"{r['seconds'] / 60:.1f} min" + (f" ({setup / 60:.1f} min with `make setup` on a clean clone)"
                                             if setup else "")
    rows = [f"Measured on commit {commit}, {took} on this 2-core machine:", "",
            "| what | livernode | against | ratio | target |", "| --- | --- | --- | --- | --- |",
            f"| peak RSS of one short epoch, 48 cases vs 8 (256 px) | {mem['peak_rss_mib_48']:.0f} MiB | "
            f"{mem['peak_rss_mib_8']:.0f} MiB | {mem['rss_ratio']:.3f} | <= 1.15 |"]
    for s in speed:
        one = s["pipeline_batches_per_s"]["1"]
        rows.append(f"| {s['size']} px: input pipeline with augmentation (batches of 8 per s; 1 / 2 / 4 workers) vs "
                    f"the model's training steps per s | "
                    f"{' / '.join(f'{v:.1f}' for v in s['pipeline_batches_per_s'].values())} | "
                    f"{s['model_steps_per_s']:.3f} | {one / s['model_steps_per_s']:.0f}x with 1 worker | >= 3x |")
    rows.append(f"| cache preparation, 512 px source to 256 px | {mem['prepare_slices_per_s']:.0f} slices/s | | | |")
    rows.append(f"| time to the first training step, cache ready vs preparing it (48 cases) | "
                f"{mem['first_step_warm_s']:.1f} s | {mem['first_step_cold_s']:.1f} s | "
                f"{mem['first_step_ratio']:.2f} | |")
    for p in lits:
        rows.append(f"| LiTS (58,600 slices) at {p['size']} px: cache on disk / peak training memory / one epoch on "
                    f"this CPU | {p['cache_gib']:.1f} GiB / {p['peak_training_memory_mib']:.0f} MiB / "
                    f"{p['epoch_hours_this_cpu']:.1f} h | | | |")
    return "\n".join(rows)


def main() -> int:
    results = json.loads((REPO / "bench" / "train_results.json").read_text())
    commit = results.get("commit") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                     capture_output=True, text=True).stdout.strip()
    readme = REPO / "README.md"
    if not write_between_markers(readme, BEGIN, END, table(results, commit)):
        print(f"{readme}: the bench-train markers are missing", file=sys.stderr)
        return 1
    print(f"{readme}: bench-train figures of {commit} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
