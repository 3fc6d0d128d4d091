"""`make bench-sr`: the tail with the SR built in a helper process beside the SEG (`[inference] sr_process = true`)
against the SR built after it (false), on the 200-slice study of `make bench` through `livernode serve`, as the
bench's end-to-end part runs it (bench/pipeline.py `node_once`).

Four fresh nodes, in the order after, beside, beside, after (the symmetric order cancels a steady drift of this
machine's speed); for each, the tail as `make bench` defines it (seconds from the last acknowledgement to the SEG
and SR at the PACS, less the quiet period and the network's own seconds) and the stage timings of its
summary.json. Kept out of `make bench`, which must stay within 20 minutes: these four runs take about 3.
Written to bench/sr-beside.json."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, log, stacked_study  # noqa: E402
from bench.pipeline import QUIET_S, node_once, pipeline_model  # noqa: E402

WORK = REPO / "bench" / "work-sr"


def main() -> int:
    from livernode.daemon.sr_process import sr_beside
    from livernode.imaging.synth import synthesize

    t0 = time.perf_counter()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    synthesize(WORK / "template", cases=1, slices=20, size=512, seed=3, layout="dicom")
    template = sorted((WORK / "template" / "case_000" / "ct").glob("*.dcm"))
    study = stacked_study(template, 200, WORK / "study-200")
    model, scores = pipeline_model(WORK, WORK / "template", evaluate_it=False)
    runs: dict[bool, list] = {True: [], False: []}
    for i, beside in enumerate((False, True, True, False)):
        e2e, _, stages, summary = node_once(study, model, WORK / f"node-{i}", sr_process=beside)
        tail = e2e - QUIET_S - summary["network_s"]
        runs[beside].append({"tail_s": tail, "last_ack_to_pacs_s": e2e, "stages_s": stages})
        log(f"SR {'beside' if beside else 'after'} the SEG: tail {tail:.2f} s (" + ", ".join(
            f"{k} {v:.2f}" for k, v in stages.items()) + ")")
    mean = {b: sum(r["tail_s"] for r in runs[b]) / len(runs[b]) for b in runs}
    result = {"slices": len(study), "weights": scores.get("weights"), "default_here": sr_beside(None),
              "beside": runs[True], "after": runs[False], "tail_beside_s": mean[True], "tail_after_s": mean[False],
              "after_vs_beside": mean[False] / mean[True], "seconds": time.perf_counter() - t0}
    out = REPO / "bench" / "sr-beside.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\ntail of a {len(study)}-slice study, the SR beside the SEG: {mean[True]:.2f} s (runs "
          + ", ".join(f"{r['tail_s']:.2f}" for r in runs[True]) + f"); after it: {mean[False]:.2f} s (runs "
          + ", ".join(f"{r['tail_s']:.2f}" for r in runs[False]) + f"); after / beside {result['after_vs_beside']:.2f}x"
          f"; the node's default here: {'beside' if result['default_here'] else 'after'}. Written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
