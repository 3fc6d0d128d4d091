"""`livernode evaluate`: run an exported ONNX model over labelled cases and score it as LiTS and CHAOS do: what
the node delivers (after post-processing) and the raw network, side by side."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from livernode.errors import EvaluationError, SeriesRejected
from livernode.fsutil import replacing, write_text
from livernode.imaging import metrics as M
from livernode.imaging.orient import Orientation
from livernode.imaging.postprocess import postprocess
from livernode.imaging.volume import TUMOUR
from livernode.inference.runner import Segmenter
from livernode.training.datasets import list_cases, load_case

log = logging.getLogger(__name__)
OUTPUTS = ("delivered", "network")  # what PACS receives (post-processed), and the network's raw labels
CSV_COLUMNS = ["case", "output", "structure", "dice", "iou", "voe", "rvd", "assd_mm", "hd95_mm", "msd_mm",
               "lesions_ref", "lesions_pred", "lesion_recall", "lesion_precision"]


def score_case(case_id: str, pred: np.ndarray, ref: np.ndarray, spacing, tumour_labelled: bool,
               output: str = "delivered") -> list[dict]:
    """Rows for liver (label > 0, as LiTS scores it) and, where labelled, tumour."""
    rows = []
    structures = [("liver", pred > 0, ref > 0)]
    if tumour_labelled:
        structures.append(("tumour", pred == TUMOUR, ref == TUMOUR))
    for name, p, r in structures:
        o = M.overlap(p, r)
        s = M.surface(p, r, spacing)
        row = {"case": case_id, "output": output, "structure": name, "dice": o.dice, "iou": o.iou, "voe": o.voe, "rvd": o.rvd,
               "assd_mm": s.assd, "hd95_mm": s.hd95, "msd_mm": s.msd,
               "_inter": int(np.logical_and(p, r).sum()), "_sum": int(p.sum() + r.sum())}
        if name == "tumour":
            det = M.lesion_detection(p, r)
            row.update(lesions_ref=det.reference_lesions, lesions_pred=det.predicted_lesions,
                       lesion_recall=det.recall, lesion_precision=det.precision,
                       _tp=det.true_positives, _matched=det.matched_predictions)
        rows.append(row)
    return rows


def summarise(rows: list[dict], output: str = "delivered") -> dict:
    """Per structure, for one output: mean per case (NaN left out), global Dice (all voxels pooled), pooled lesion
    detection."""
    out = {}
    for name in ("liver", "tumour"):
        rs = [r for r in rows if r["structure"] == name and r.get("output", "delivered") == output]
        if not rs:
            continue
        total_sum = sum(r["_sum"] for r in rs)
        agg = {"cases": len(rs),
               "dice_global": 2 * sum(r["_inter"] for r in rs) / total_sum if total_sum else 1.0}
        for k in ("dice", "iou", "voe", "rvd", "assd_mm", "hd95_mm", "msd_mm"):
            agg[f"{k}_mean"] = M.nanmean([r[k] for r in rs])
            agg[f"{k}_undefined"] = sum(1 for r in rs if isinstance(r[k], float) and math.isnan(r[k]))
        if name == "tumour":
            nref, npred = sum(r["lesions_ref"] for r in rs), sum(r["lesions_pred"] for r in rs)
            agg.update(lesions_ref=nref, lesions_pred=npred,
                       lesion_recall=sum(r["_tp"] for r in rs) / nref if nref else float("nan"),
                       lesion_precision=sum(r["_matched"] for r in rs) / npred if npred else float("nan"))
        out[name] = agg
    return out


def evaluate(model: Path, data: Path, fmt: str, out: Path, cases: Iterable[str] | None = None) -> dict:
    """Score `model` on the cases under `data` (only those whose ids are in `cases`, when given); writes
    metrics.json and metrics.csv into `out`. The report times the network on each case (`infer_seconds`, the
    wall time of segmenting its volume, post-processing and loading not counted) and sums that up in `timing`.

    EvaluationError naming any id in `cases` that is not among the cases found."""
    seg = Segmenter(model, providers="auto")
    refs = _keep(list_cases(data, fmt), cases, data)
    rows, skipped, seconds = [], [], {}
    for ref in tqdm(refs, desc="evaluate", unit="case"):
        case = load_case(ref)
        try:
            turn = Orientation.from_iop(case.volume.orientation)
        except SeriesRejected as exc:  # not axial: the node would refuse such a study, so it is not scored
            log.warning("skipping case %s: %s", ref.case_id, exc)
            skipped.append({"case": ref.case_id, "reason": str(exc)})
            continue
        t0 = time.perf_counter()
        raw = seg.segment(case.volume.hu, turn, case.volume.spacing)
        seconds[case.case_id] = time.perf_counter() - t0
        delivered = postprocess(raw, case.volume.spacing).labels  # as the node sends it
        for output, pred in (("delivered", delivered), ("network", raw)):
            rows += score_case(case.case_id, pred, case.labels, case.volume.spacing, case.tumour_labelled, output)
    total = sum(seconds.values())
    report = {"model": str(model), "data": str(data), "format": fmt, "providers": seg.providers_used,
              "skipped": skipped, "summary": summarise(rows, "delivered"),
              "network_summary": summarise(rows, "network"),
              "timing": {"cases": len(seconds), "infer_seconds_mean": total / len(seconds) if seconds else math.nan,
                         "infer_seconds_total": total},
              "cases": [{**{k: v for k, v in r.items() if not k.startswith("_")},
                         "infer_seconds": seconds[r["case"]]} for r in rows]}
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "metrics.json", json.dumps(report, indent=1, default=_json_default).replace("NaN", "null"))
    with replacing(out / "metrics.csv") as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return report


def _keep(refs: list, cases: Iterable[str] | None, data: Path) -> list:
    """The refs whose case ids are in `cases` (all of them for None), in their listing order."""
    if cases is None:
        return refs
    wanted = {cases} if isinstance(cases, str) else set(cases)  # one id, not its characters
    unknown = wanted - {r.case_id for r in refs}
    if unknown:
        raise EvaluationError(f"{data}: no case {', '.join(sorted(unknown))} among the {len(refs)} cases found "
                              f"there")
    return [r for r in refs if r.case_id in wanted]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(report: dict) -> str:
    """Per-case rows, then the summaries of what PACS receives and of the raw network, side by side in one
    fixed-width text table."""
    cols = CSV_COLUMNS
    lines = [" ".join(f"{c:>14}" for c in cols)]
    for r in report["cases"]:
        lines.append(" ".join(f"{_fmt(r.get(c, '')):>14}" for c in cols))
    for output, summary in (("delivered (post-processed, what PACS receives)", report["summary"]),
                            ("network (raw labels, before post-processing)", report["network_summary"])):
        lines += ["", f"{output}:", *_summary_lines(summary)]
    timing = report.get("timing")
    if timing and timing["cases"]:
        lines += ["", (f"network: {timing['infer_seconds_mean']:.3f} s per case on average, "
                       f"{timing['infer_seconds_total']:.1f} s for {timing['cases']} cases")]
    return "\n".join(lines)


def _summary_lines(summary: dict) -> list[str]:
    lines = []
    for name, agg in summary.items():
        lines.append(f"{name:>8}: global Dice {_fmt(agg['dice_global'])}, mean Dice {_fmt(agg['dice_mean'])}, "
                     f"IoU {_fmt(agg['iou_mean'])}, VOE {_fmt(agg['voe_mean'])}, RVD {_fmt(agg['rvd_mean'])}, "
                     f"ASSD {_fmt(agg['assd_mm_mean'])} mm, HD95 {_fmt(agg['hd95_mm_mean'])} mm, "
                     f"MSD {_fmt(agg['msd_mm_mean'])} mm ({agg['cases']} cases)")
        if name == "tumour":
            lines.append(f"{'':>8}  lesions: {agg['lesions_ref']} reference, {agg['lesions_pred']} predicted, "
                         f"recall {_fmt(agg['lesion_recall'])}, precision {_fmt(agg['lesion_precision'])}")
    return lines
