"""The coverage pass: where in a study the liver lies, from the model itself, on a few slices only.

The network runs at its own input size on single slices, and the liver and tumour area of its output is measured.
First each usable series' lowest and highest slice: a series whose end slice shows liver cuts the liver off there.
A series whose ends are clear is then looked into from its middle outwards, about every `step_mm`, until the liver
shows (it holds the whole liver) or it does not (no liver at all). Only when no series holds the whole liver is the
study sampled every `step_mm` along the union of the series' ranges, to rank them by the share of the liver each
holds. Heights are z of the slices' centres, one axis for every series however it is stored; series of one Frame
of Reference share them, and a height is looked at once, in the best-ranked series that reaches it. A series
whose pixels cannot be read is reported unusable, and the others go on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from livernode.daemon.select import Candidate, Coverage
from livernode.errors import InputError
from livernode.imaging.dicomio import hu_of, read_dataset
from livernode.imaging.preprocess import context_span
from livernode.imaging.volume import LIVER, TUMOUR
from livernode.inference.runner import Segmenter

# A slice shows liver from 3 cm² of it: less is a sliver at the dome's tip or a stray pixel of another organ.
MIN_LIVER_MM2 = 300.0

# (candidate, slice indices) -> liver area in mm² of each of those slices
AreaProbe = Callable[[Candidate, list[int]], np.ndarray]


def _static_rank(c: Candidate) -> tuple:
    """The order in which series are looked into: a height shared by several is looked at in the first."""
    d = c.decision
    return (c.avoided, c.prefer_rank, c.sharp, c.derived, d.slice_thickness_mm or 0.0, -d.images, c.series_number)


def measure(candidates: Sequence[Candidate], probe: AreaProbe, step_mm: float) -> dict[str, Coverage]:
    """The Coverage of every candidate. Series that share a Frame of Reference are measured along one axis, each
    such group on its own; shares are of the most liver any group shows (groups are separate acquisitions of the
    same liver)."""
    groups: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        groups[c.frame_of_reference].append(c)
    measured = [_Group(group, probe, step_mm).measure() for group in groups.values()]
    most = max((total for _, total in measured), default=0.0)
    out: dict[str, Coverage] = {}
    for found, _ in measured:
        for uid, (cov, inside) in found.items():
            out[uid] = cov if inside is None else replace(cov, share=inside / most if most else 0.0)
    return out


def _range(c: Candidate) -> tuple[float, float]:
    """The heights a series covers: its lowest and highest slice, half a slice step beyond each."""
    half = (c.decision.step_mm or 1.0) / 2
    return min(c.positions_mm) - half, max(c.positions_mm) + half


@dataclass
class _Group:
    candidates: list[Candidate]
    probe: AreaProbe
    step_mm: float

    def __post_init__(self) -> None:
        self.ranked = sorted(self.candidates, key=_static_rank)
        self.seen: list[tuple[float, float, float]] = []  # (height, half its slice step, liver area)
        self.broken: dict[str, str] = {}

    def area(self, c: Candidate, i: int) -> float:
        """Liver area at slice i of c, or at a slice already looked at in the same place (0 when c is broken)."""
        z = c.positions_mm[i]
        for zz, half, a in self.seen:
            if abs(zz - z) <= half:
                return a
        if c.uid in self.broken:
            return 0.0
        try:
            a = float(self.probe(c, [i])[0])
        except InputError as exc:  # a damaged file: this series cannot be used, the study goes on
            self.broken[c.uid] = f"pixel data cannot be used: {exc}"
            return 0.0
        self.seen.append((z, max(0.5, (c.decision.step_mm or 1.0) / 2), a))
        return a

    def _indices(self, c: Candidate) -> list[int]:
        """Slice indices about every step_mm, from the middle of c outwards."""
        n = len(c.positions_mm)
        k = max(1, round(self.step_mm / (c.decision.step_mm or 1.0)))
        mid = n // 2
        out = [mid]
        for j in range(k, n, k):
            out += [i for i in (mid + j, mid - j) if 0 <= i < n]
        return out

    def measure(self) -> tuple[dict[str, tuple[Coverage, float | None]], float]:
        """({uid: (Coverage, liver area x height inside it, or None when not measured)}, the group's liver area x
        height). When a series holds the whole liver, the others are not sampled: they lose whatever their share."""
        cut: dict[str, str] = {}
        for c in self.ranked:
            pos = np.asarray(c.positions_mm)
            low, high = (self.area(c, int(i)) >= MIN_LIVER_MM2 for i in (np.argmin(pos), np.argmax(pos)))
            cut[c.uid] = {(True, True): "cuts the liver off at both ends",
                          (True, False): "cuts the liver off at its lower end (toward the feet)",
                          (False, True): "cuts the liver off at its upper end (toward the head)"}.get((low, high), "")
        complete = {c.uid: not cut[c.uid] and any(self.area(c, i) >= MIN_LIVER_MM2 for i in self._indices(c))
                    for c in self.ranked}
        if any(complete[c.uid] and c.uid not in self.broken for c in self.ranked):
            inside: dict[str, float | None] = {c.uid: None for c in self.ranked}
            total = 0.0
        else:
            self._sample()
            liver = [(z, a) for z, _, a in self.seen if a >= MIN_LIVER_MM2]
            total = sum(a for _, a in liver) * self.step_mm
            inside = {c.uid: sum(a for z, a in liver if _range(c)[0] <= z <= _range(c)[1]) * self.step_mm
                      for c in self.ranked}
        out = {}
        for c in self.ranked:
            if c.uid in self.broken:
                out[c.uid] = (Coverage(None, False, unusable=self.broken[c.uid]), None)
            elif complete[c.uid]:
                out[c.uid] = (Coverage(1.0, True), None)
            else:
                out[c.uid] = (Coverage(None, False, cut[c.uid] or "shows no liver"), inside[c.uid])
        return out, total

    def _sample(self) -> None:
        """No series holds the whole liver: look at the study every step_mm, each height once."""
        lo = min(_range(c)[0] for c in self.ranked)
        hi = max(_range(c)[1] for c in self.ranked)
        for z in np.arange(lo, hi + self.step_mm / 2, self.step_mm):
            for c in self.ranked:
                if c.uid not in self.broken and _range(c)[0] <= z <= _range(c)[1]:
                    self.area(c, int(np.argmin(np.abs(np.asarray(c.positions_mm) - z))))
                    break


def model_probe(segmenter: Segmenter, progress: Callable[[int, int], None] = lambda done, total: None
                ) -> AreaProbe:
    """An AreaProbe that decodes the requested slices, turns them the model's way and runs the network at its input
    size: liver plus tumour pixels of the argmax, times the area one such pixel covers."""
    size, mode = segmenter.spec.size, segmenter.mode
    done = [0]
    whole: dict[str, np.ndarray] = {}  # 3-D models: liver area of every slice of a series segmented whole

    def decode(c: Candidate, i: int) -> np.ndarray:
        return hu_of(read_dataset(Path(c.items[i][0])), c.items[i][0])

    def probe(c: Candidate, idx: list[int]) -> np.ndarray:
        ref = c.items[0][1]
        row_mm, col_mm = (float(v) for v in ref.PixelSpacing)
        n = len(c.items)
        if mode.dims == 3:  # a volume model sees whole series: segment each once, at its own resolution
            if c.uid not in whole:
                hu = np.stack([decode(c, i) for i in range(n)])
                step = abs(c.positions_mm[-1] - c.positions_mm[0]) / max(1, n - 1) if n > 1 else 1.0
                labels = segmenter.segment(hu, c.orientation, (step or 1.0, row_mm, col_mm))
                whole[c.uid] = np.isin(labels, (LIVER, TUMOUR)).reshape(n, -1).sum(axis=1) * row_mm * col_mm
            done[0] += len(idx)
            progress(done[0], 0)
            return whole[c.uid][list(idx)]
        if segmenter.fused:  # labels at the slices' own size, straight from the graph (no context: fusable)
            labels = segmenter.fused_labels(np.stack([decode(c, i) for i in idx]), c.orientation)
            done[0] += len(idx)
            progress(done[0], 0)
            return np.isin(labels, (LIVER, TUMOUR)).reshape(len(idx), -1).sum(axis=1) * row_mm * col_mm
        shape = (int(ref.Rows), int(ref.Columns))
        pixel_mm2 = (max(shape) / size) ** 2 * row_mm * col_mm  # square padding keeps pixels' aspect
        read: dict[int, np.ndarray] = {}
        xs = []
        for i in idx:  # each probed slice with the neighbours a 2.5-D model needs
            first, last = context_span(n, i, i + 1, mode.context)
            for j in range(first, last):
                if j not in read:
                    read[j] = decode(c, j)
            hu = np.stack([read[j] for j in range(first, last)])
            xs.append(segmenter.inputs(hu, n, i, i + 1, first, c.orientation))
        labels = segmenter.labels_of(segmenter.run(np.concatenate(xs)))
        done[0] += len(idx)
        progress(done[0], 0)
        return np.isin(labels, (LIVER, TUMOUR)).reshape(len(idx), -1).sum(axis=1) * pixel_mm2
    return probe


def coverage_pass(segmenter: Segmenter, step_mm: float,
                  progress: Callable[[int, int], None] = lambda done, total: None):
    """The CoveragePass `select_series` takes: the model's view of where the liver lies."""
    probe = model_probe(segmenter, progress)
    return lambda candidates: measure(candidates, probe, step_mm)
