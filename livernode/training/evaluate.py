"""`livernode evaluate`: run an exported ONNX model over labelled cases and score it as LiTS and CHAOS do."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from livernode.errors import SeriesRejected
from livernode.imaging import metrics as M
from livernode.imaging.orient import Orientation
from livernode.inference.runner import Segmenter
from livernode.training.datasets import list_cases, load_case

log = logging.getLogger(__name__)
CSV_COLUMNS = ["case", "structure", "dice", "iou", "voe", "rvd", "assd_mm", "hd95_mm", "msd_mm",
               "lesions_ref", "lesions_pred", "lesion_recall", "lesion_precision"]


def score_case(case_id: str, pred: np.ndarray, ref: np.ndarray, spacing, tumour_labelled: bool) -> list[dict]:
    """Rows for liver (label > 0, as LiTS scores it) and, where labelled, tumour (label 2)."""
    rows = []
    structures = [("liver", pred > 0, ref > 0)]
    if tumour_labelled:
        structures.append(("tumour", pred == 2, ref == 2))
    for name, p, r in structures:
        o = M.overlap(p, r)
        s = M.surface(p, r, spacing)
        row = {"case": case_id, "structure": name, "dice": o.dice, "iou": o.iou, "voe": o.voe, "rvd": o.rvd,
               "assd_mm": s.assd, "hd95_mm": s.hd95, "msd_mm": s.msd,
               "_inter": int(np.logical_and(p, r).sum()), "_sum": int(p.sum() + r.sum())}
        if name == "tumour":
            det = M.lesion_detection(p, r)
            row.update(lesions_ref=det.reference_lesions, lesions_pred=det.predicted_lesions,
                       lesion_recall=det.recall, lesion_precision=det.precision,
                       _tp=det.true_positives, _matched=det.matched_predictions)
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per structure: mean per case (NaN left out), global Dice (all voxels pooled), pooled lesion detection."""
    out = {}
    for name in ("liver", "tumour"):
        rs = [r for r in rows if r["structure"] == name]
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


def evaluate(model: Path, data: Path, fmt: str, out: Path) -> dict:
    """Score `model` on every case under `data`; writes metrics.json and metrics.csv into `out`."""
    seg = Segmenter(model, providers="auto")
    refs = list_cases(data, fmt)
    rows, skipped = [], []
    for ref in tqdm(refs, desc="evaluate", unit="case"):
        case = load_case(ref)
        try:
            turn = Orientation.from_iop(case.volume.orientation)
        except SeriesRejected as exc:  # not axial: the node would refuse such a study, so it is not scored
            log.warning("skipping case %s: %s", ref.case_id, exc)
            skipped.append({"case": ref.case_id, "reason": str(exc)})
            continue
        pred = seg.segment(case.volume.hu, turn)
        rows += score_case(case.case_id, pred, case.labels, case.volume.spacing, case.tumour_labelled)
    report = {"model": str(model), "data": str(data), "format": fmt, "providers": seg.providers_used,
              "skipped": skipped,
              "summary": summarise(rows), "cases": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=1, default=_json_default).replace("NaN", "null"))
    with (out / "metrics.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return report


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(report: dict) -> str:
    """Per-case rows, then the summary, as a fixed-width text table."""
    cols = CSV_COLUMNS
    lines = [" ".join(f"{c:>14}" for c in cols)]
    for r in report["cases"]:
        lines.append(" ".join(f"{_fmt(r.get(c, '')):>14}" for c in cols))
    lines.append("")
    for name, agg in report["summary"].items():
        lines.append(f"{name:>8}: global Dice {_fmt(agg['dice_global'])}, mean Dice {_fmt(agg['dice_mean'])}, "
                     f"IoU {_fmt(agg['iou_mean'])}, VOE {_fmt(agg['voe_mean'])}, RVD {_fmt(agg['rvd_mean'])}, "
                     f"ASSD {_fmt(agg['assd_mm_mean'])} mm, HD95 {_fmt(agg['hd95_mm_mean'])} mm, "
                     f"MSD {_fmt(agg['msd_mm_mean'])} mm ({agg['cases']} cases)")
        if name == "tumour":
            lines.append(f"{'':>8}  lesions: {agg['lesions_ref']} reference, {agg['lesions_pred']} predicted, "
                         f"recall {_fmt(agg['lesion_recall'])}, precision {_fmt(agg['lesion_precision'])}")
    return "\n".join(lines)
