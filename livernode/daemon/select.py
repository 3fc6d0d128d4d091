"""Series selection: which series of a study to segment, read as a radiologist would, with a reason for every
series.

1. What is never segmented: other modalities, secondary captures (dose screens), projections (MIP, MinIP,
   localizers), non-axial reformats, series that are not one regular stack of slices.
2. Among the rest, coverage decides first: the series in which the whole liver lies (from the model's cheap
   coverage pass, `coverage.py`), else the one that holds most of it.
3. Then the site's rules (`[selection] prefer` / `avoid`, e.g. the portal-venous phase), a soft-tissue kernel,
   original over derived images, and only then thinner slices and more images.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pydicom

from livernode.config import SelectionConfig
from livernode.errors import SeriesRejected
from livernode.imaging.dicomio import (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, SliceOrder, order_slices,
                                      slice_normal)
from livernode.imaging.orient import Orientation

log = logging.getLogger(__name__)
AXIAL_TOLERANCE_DEG = 10.0
MIN_SLICES = 8
# Reconstruction kernels for lung or bone: sharp, noisy, a poor input for soft-tissue segmentation.
SHARP_KERNEL_HINTS = ("LUNG", "BONE", "B60", "B70", "B80", "BR64", "FC51", "YC", "SHARP")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame kinds, .7.1 to .7.4
NO_NUMBER = 1 << 31  # a series without a SeriesNumber sorts after every numbered one
# ImageType values whose voxels are not the patient's CT values at one place: never segmented.
PROJECTIONS = {"MIP": "MIP: a projection, not CT values at one place",
               "MINIP": "MinIP: a projection, not CT values at one place",
               "PROJECTION IMAGE": "a projection image",
               "LOCALIZER": "localizer (scout): a projection for planning"}


@dataclass(frozen=True)
class SeriesDecision:
    """What was decided about one series of a study, and why (goes into summary.json and the index)."""

    series_instance_uid: str
    description: str
    images: int
    accepted: bool
    reason: str
    slice_thickness_mm: float | None = None
    step_mm: float | None = None
    kernel: str = ""
    chosen: bool = False
    image_type: str = ""
    orientation: str = ""  # how the slices are turned for the model ("as stored", "columns flipped", ...)
    rule: str = ""  # the site rule that matched: "preferred by rule 'portal'", "avoided by rule 'arterial'"
    liver_share: float | None = None  # share of the liver the study shows that lies in this series (coverage pass)
    liver_complete: bool | None = None  # the liver lies wholly inside: it touches neither its lowest nor highest slice
    liver_note: str = ""  # how it falls short: "cuts the liver off at its upper end (toward the head)", "shows no liver"


@dataclass(frozen=True)
class Coverage:
    """What the coverage pass found for one series."""

    share: float | None  # of the liver the study shows, the part in this series; None when not measured
    complete: bool
    note: str = ""
    unusable: str = ""  # why the series cannot be used after all (its pixels cannot be read)


@dataclass(frozen=True)
class Candidate:
    """A usable series: its decision so far, its slices in order and what ranks it."""

    decision: SeriesDecision
    items: tuple[tuple[str, pydicom.Dataset], ...]  # (source, header) in slice order
    orientation: Orientation
    positions_mm: tuple[float, ...]  # each slice's height (z of its centre, mm), in the series' slice order
    frame_of_reference: str
    avoided: bool
    prefer_rank: int
    sharp: bool
    derived: bool
    series_number: int

    @property
    def uid(self) -> str:
        return self.decision.series_instance_uid


# (study's candidates) -> {series uid: Coverage}: the coverage pass (`coverage.py`)
CoveragePass = Callable[[Sequence[Candidate]], dict[str, Coverage]]


def short_key(uid: str) -> str:
    """A short digest that names a series in log lines without quoting its UID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def _sharp(kernel: str) -> bool:
    return any(h in kernel.upper() for h in SHARP_KERNEL_HINTS)


def _rule(rules: SelectionConfig, text: str) -> tuple[bool, int, str]:
    """(avoided, prefer rank, what matched) for one series' description | kernel | image type."""
    for pattern in rules.avoid:
        if re.search(pattern, text, re.IGNORECASE):
            return True, len(rules.prefer), f"avoided by rule '{pattern}'"
    for rank, pattern in enumerate(rules.prefer):
        if re.search(pattern, text, re.IGNORECASE):
            return False, rank, f"preferred by rule '{pattern}'"
    return False, len(rules.prefer), ""


def _judge(uid: str, items: Sequence[tuple[str, pydicom.Dataset]], rules: SelectionConfig
           ) -> SeriesDecision | Candidate:
    """A rejection (SeriesDecision with its reason) or a usable series (Candidate)."""
    ref = items[0][1]
    desc = str(getattr(ref, "SeriesDescription", ""))
    kernel = str(getattr(ref, "ConvolutionKernel", "") or "")
    if isinstance(getattr(ref, "ConvolutionKernel", None), pydicom.multival.MultiValue):
        kernel = "\\".join(ref.ConvolutionKernel)
    raw_type = getattr(ref, "ImageType", None)
    # pydicom gives one value as a str: "MIP" must not become "M", "I", "P"
    image_type = [str(v).upper() for v in ([raw_type] if isinstance(raw_type, str) else (raw_type or []))]
    base = dict(series_instance_uid=uid, description=desc, images=len(items), kernel=kernel,
                image_type="\\".join(image_type))

    def no(reason: str) -> SeriesDecision:
        return SeriesDecision(**base, accepted=False, reason=reason)
    classes = {str(ds.SOPClassUID) for _, ds in items}
    if any(c == SECONDARY_CAPTURE or c.startswith(SECONDARY_CAPTURE + ".") for c in classes):
        return no("secondary capture (a screen such as a dose report), not CT values")
    modality = str(getattr(ref, "Modality", ""))
    if modality != "CT":
        return no(f"modality {modality or 'missing'}, not CT")
    for value, why in PROJECTIONS.items():
        if value in image_type:
            return no(why)
    if ENHANCED_CT_IMAGE_STORAGE in classes:
        return no("multi-frame Enhanced CT is not supported yet: have the modality or PACS send this series as CT "
                  "Image Storage (one instance per slice)")
    if classes != {CT_IMAGE_STORAGE}:
        return no(f"SOP classes {sorted(classes)}: not CT Image Storage")
    iop = getattr(ref, "ImageOrientationPatient", None)
    if iop is None:
        return no("no ImageOrientationPatient")
    n = slice_normal([float(v) for v in iop])
    angle = float(np.degrees(np.arccos(min(1.0, abs(n[2]) / max(np.linalg.norm(n), 1e-9)))))
    if angle > AXIAL_TOLERANCE_DEG:
        return no(f"not axial (a reformat or another plane): slice normal {angle:.1f} deg from the patient axis")
    try:
        turn = Orientation.from_iop([float(v) for v in iop])
        order: SliceOrder = order_slices(items, uid)
    except SeriesRejected as exc:
        return no(str(exc))
    if len(order.kept) < MIN_SLICES:
        return no(f"{len(order.kept)} slices, fewer than {MIN_SLICES}")
    thickness = float(getattr(ref, "SliceThickness", order.step) or order.step)
    derived = bool(image_type) and (image_type[0] == "DERIVED" or "SECONDARY" in image_type[1:2])
    avoided, prefer_rank, rule = _rule(rules, f"{desc} | {kernel} | {base['image_type']}")
    kept = tuple(items[i] for i in order.kept)
    decision = SeriesDecision(**base, accepted=True, reason="usable", slice_thickness_mm=thickness,
                              step_mm=order.step, orientation=turn.describe(), rule=rule)
    try:
        number = int(getattr(ref, "SeriesNumber", None))
    except (TypeError, ValueError):
        number = NO_NUMBER
    return Candidate(decision, kept, turn, _heights(kept), str(getattr(ref, "FrameOfReferenceUID", "") or uid),
                     avoided, prefer_rank, _sharp(kernel), derived, number)


def _heights(kept: Sequence[tuple[str, pydicom.Dataset]]) -> tuple[float, ...]:
    """Each slice's height along the patient's feet-to-head axis (z of the slice's centre, mm). One axis for every
    series of a study, whichever way a series' own slice normal points."""
    out = []
    for _, ds in kept:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
        centre = (np.array([float(v) for v in ds.ImagePositionPatient]) + iop[:3] * col_mm * (int(ds.Columns) - 1) / 2
                  + iop[3:] * row_mm * (int(ds.Rows) - 1) / 2)
        out.append(float(centre[2]))
    return tuple(out)


def _key(c: Candidate) -> tuple:
    """Smaller is better: coverage, then rules, kernel, original images, thinner slices, more images; the lower
    series number when all of that is equal (e.g. two phases and no rule to tell them apart)."""
    d = c.decision
    incomplete = d.liver_complete is False
    share = -round(d.liver_share or 0.0, 2) if incomplete else 0.0
    return (incomplete, share, c.avoided, c.prefer_rank, c.sharp, c.derived, d.slice_thickness_mm or 0.0, -d.images,
            c.series_number)


def _why_not(c: Candidate, best: Candidate) -> str:
    """The first criterion on which `c` loses to `best`, in words."""
    d, b = c.decision, best.decision
    k, kb = _key(c), _key(best)
    if k[0] != kb[0] or k[1] != kb[1]:
        if b.liver_complete:
            return f"{d.liver_note}; another series holds the whole liver"
        return f"holds {100 * (d.liver_share or 0):.0f} % of the liver the study shows ({d.liver_note})"
    if k[2] != kb[2]:
        return d.rule
    if k[3] != kb[3]:
        return f"{b.rule} chose another series" if b.rule else "another series matches an earlier rule"
    if k[4] != kb[4]:
        return f"sharp kernel {d.kernel}: bone or lung reconstruction"
    if k[5] != kb[5]:
        return "derived reformat: ranks below original images"
    if k[6] != kb[6]:
        return f"{d.slice_thickness_mm:g} mm slices, the chosen series has {b.slice_thickness_mm:g} mm"
    if k[7] != kb[7]:
        return f"{d.images} images, the chosen series has {b.images}"
    number = "without a number" if c.series_number == NO_NUMBER else str(c.series_number)
    return (f"equal to the chosen series in coverage, rules, kernel, thickness and images; series {number} comes "
            f"after series {best.series_number}")


def _why_chosen(c: Candidate, others: int) -> str:
    d = c.decision
    if d.liver_complete:
        what = "holds the whole liver"
    elif d.liver_complete is False and not d.liver_share:
        what = "no series shows liver to the coverage pass; ranked by its headers"
    elif d.liver_complete is False:
        what = (f"holds {100 * (d.liver_share or 0):.0f} % of the liver the study shows, the most of any series; "
                f"it {d.liver_note}: the liver is not completely covered")
    else:
        what = "the only usable series" if not others else "ranked first by its headers"
    extra = [d.rule] if d.rule else []
    extra += [f"{d.slice_thickness_mm:g} mm"]
    return f"chosen: {what} ({', '.join(extra)})"


class NoUsableSeries(SeriesRejected):
    """No series of the study can be segmented; `decisions` holds every series' reason."""

    def __init__(self, decisions: Sequence[SeriesDecision]) -> None:
        self.decisions = list(decisions)
        super().__init__("no usable CT series (" + "; ".join(
            f"{d.description or short_key(d.series_instance_uid)}: {d.reason}" for d in self.decisions) + ")")

    def __reduce__(self):  # pickled whole (a Ray actor raises it to the node), decisions and all
        return type(self), (self.decisions,)


def select_series(items: Sequence[tuple[str, pydicom.Dataset]], rules: SelectionConfig | None = None,
                  coverage: CoveragePass | None = None) -> tuple[list[str], list[SeriesDecision]]:
    """Choose the series to segment from (source, header) pairs of one study.

    Returns the chosen Series Instance UIDs and a decision with its reason for every series. One series; with
    `rules.segment_all`, also every other soft-tissue, original, not avoided series that holds the whole liver.
    `coverage` runs the model's coverage pass over the usable series when there is more than one to choose from;
    a series whose pixels it cannot read is rejected with the reason. NoUsableSeries, with every series' reason,
    when none is usable."""
    rules = rules or SelectionConfig()
    by_series: dict[str, list[tuple[str, pydicom.Dataset]]] = defaultdict(list)
    for src, ds in items:
        by_series[str(getattr(ds, "SeriesInstanceUID", ""))].append((src, ds))
    judged: list[SeriesDecision | Candidate] = [_judge(uid, group, rules) for uid, group in by_series.items()]
    candidates = [j for j in judged if isinstance(j, Candidate)]
    if coverage is not None and (len(candidates) > 1 or rules.segment_all):
        seen = coverage(candidates)
        judged = [replace(j.decision, accepted=False, reason=seen[j.uid].unusable)
                  if isinstance(j, Candidate) and seen[j.uid].unusable else j for j in judged]
        candidates = [replace(c, decision=replace(c.decision, liver_share=seen[c.uid].share,
                                                  liver_complete=seen[c.uid].complete, liver_note=seen[c.uid].note))
                      for c in candidates if not seen[c.uid].unusable]
    if not candidates:
        decisions = [j for j in judged if isinstance(j, SeriesDecision)]
        _log(decisions)
        raise NoUsableSeries(decisions)
    ranked = sorted(candidates, key=_key)
    best = ranked[0]
    chosen = [best]
    if rules.segment_all:  # every phase that holds the whole liver, not the sharp or derived copies of one
        chosen += [c for c in ranked[1:] if c.decision.liver_complete and not (c.sharp or c.derived or c.avoided)]
    final: dict[str, SeriesDecision] = {}
    for c in ranked:
        reason = _why_chosen(c, len(ranked) - 1) if c in chosen else f"usable, not chosen: {_why_not(c, best)}"
        final[c.uid] = replace(c.decision, chosen=c in chosen, reason=reason)
    decisions = [final[j.uid] if isinstance(j, Candidate) else j for j in judged]
    _log(decisions)
    return [c.uid for c in chosen], decisions


def _log(decisions: Sequence[SeriesDecision]) -> None:
    for d in decisions:
        log.info("series %s (%s, %d images): %s", short_key(d.series_instance_uid), d.description or "-", d.images,
                 d.reason)
