"""Series selection: which CT series of a study to segment, with a recorded reason for every series."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom

from livernode.errors import SeriesRejected
from livernode.imaging.dicomio import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, order_slices, slice_normal

log = logging.getLogger(__name__)
AXIAL_TOLERANCE_DEG = 10.0
MIN_SLICES = 8
# Reconstruction kernels for lung or bone: sharp, noisy, a poor input for soft-tissue segmentation.
SHARP_KERNEL_HINTS = ("LUNG", "BONE", "B60", "B70", "B80", "BR64", "FC51", "YC", "SHARP")


@dataclass(frozen=True)
class SeriesDecision:
    """What was decided about one series of a study, and why (goes into the summary)."""

    series_instance_uid: str
    description: str
    images: int
    accepted: bool
    reason: str
    slice_thickness_mm: float | None = None
    step_mm: float | None = None
    kernel: str = ""
    chosen: bool = False


def _soft_tissue(kernel: str) -> bool:
    k = kernel.upper()
    return not any(h in k for h in SHARP_KERNEL_HINTS)


def _judge(uid: str, items: Sequence[tuple[str, pydicom.Dataset]]) -> SeriesDecision:
    ref = items[0][1]
    desc = str(getattr(ref, "SeriesDescription", ""))
    kernel = str(getattr(ref, "ConvolutionKernel", "") or "")
    base = dict(series_instance_uid=uid, description=desc, images=len(items), kernel=kernel)
    modality = str(getattr(ref, "Modality", ""))
    if modality != "CT":
        return SeriesDecision(**base, accepted=False, reason=f"modality {modality or 'missing'}, not CT")
    classes = {str(ds.SOPClassUID) for _, ds in items}
    if ENHANCED_CT_IMAGE_STORAGE in classes:
        return SeriesDecision(**base, accepted=False,
                              reason="multi-frame Enhanced CT is not supported yet: have the modality or PACS send "
                                     "this series as CT Image Storage (one instance per slice)")
    if classes != {CT_IMAGE_STORAGE}:
        return SeriesDecision(**base, accepted=False, reason=f"SOP classes {sorted(classes)}: not CT Image Storage")
    iop = getattr(ref, "ImageOrientationPatient", None)
    if iop is None:
        return SeriesDecision(**base, accepted=False, reason="no ImageOrientationPatient")
    n = slice_normal([float(v) for v in iop])
    angle = float(np.degrees(np.arccos(min(1.0, abs(n[2]) / max(np.linalg.norm(n), 1e-9)))))
    if angle > AXIAL_TOLERANCE_DEG:
        return SeriesDecision(**base, accepted=False,
                              reason=f"not axial: slice normal {angle:.1f} deg from the patient axis")
    try:
        order = order_slices(items, uid)
    except SeriesRejected as exc:
        return SeriesDecision(**base, accepted=False, reason=str(exc))
    if len(order.kept) < MIN_SLICES:
        return SeriesDecision(**base, accepted=False, reason=f"{len(order.kept)} slices, fewer than {MIN_SLICES}")
    thickness = float(getattr(ref, "SliceThickness", order.step) or order.step)
    return SeriesDecision(**base, accepted=True, reason="usable", slice_thickness_mm=thickness, step_mm=order.step)


def select_series(items: Sequence[tuple[str, pydicom.Dataset]]) -> tuple[str, list[SeriesDecision]]:
    """Pick the series to segment from (source, header) pairs of one study.

    Preference among usable series: soft-tissue kernel, then thinnest slices, then most slices. Returns the chosen
    SeriesInstanceUID and a decision per series; SeriesRejected (with every series' reason) when none is usable.
    """
    by_series: dict[str, list[tuple[str, pydicom.Dataset]]] = defaultdict(list)
    for src, ds in items:
        by_series[str(getattr(ds, "SeriesInstanceUID", ""))].append((src, ds))
    decisions = [_judge(uid, group) for uid, group in by_series.items()]
    usable = [d for d in decisions if d.accepted]
    if not usable:
        reasons = "; ".join(f"{d.series_instance_uid}: {d.reason}" for d in decisions)
        raise SeriesRejected(f"no usable CT series ({reasons})")
    best = min(usable, key=lambda d: (not _soft_tissue(d.kernel), d.slice_thickness_mm, -d.images))
    decisions = [SeriesDecision(**{**d.__dict__, "chosen": d is best}) for d in decisions]
    for d in decisions:
        log.info("series %s (%d images): %s%s", d.series_instance_uid, d.images, d.reason,
                 " -> chosen" if d.chosen else "")
    return best.series_instance_uid, decisions
