"""The coverage pass: where in a study the liver lies, from the model itself, on a few slices only.

The network runs at its own input size on single slices, and the liver and tumour area of its output is measured.
First each usable series' first and last slice: a series whose end slices show liver cuts the liver off. A series
whose ends are clear is then looked into from its middle outwards, every `step_mm`, until the liver shows (it
holds the whole liver) or it does not (no liver at all). Only when no series holds the whole liver is the study
sampled every `step_mm` along the union of the series' ranges, to rank them by the share of the liver each holds.
A position is looked at once, in the best-ranked series that reaches it: series of one Frame of Reference share
their slices' positions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livernode.daemon.select import Candidate, Coverage
from livernode.imaging.dicomio import hu_of, read_dataset
from livernode.imaging.labels import LABELS
from livernode.imaging.preprocess import prepare_slices
from livernode.inference.runner import Segmenter

# A slice shows liver from 3 cm² of it: less is a sliver at the dome's tip or a stray pixel of another organ.
MIN_LIVER_MM2 = 300.0

# (candidate, slice indices) -> liver area in mm² of each of those slices
AreaProbe = Callable[[Candidate, list[int]], np.ndarray]


def _static_rank(c: Candidate) -> tuple:
    d = c.decision
    return (c.avoided, c.prefer_rank, c.sharp, c.derived, d.slice_thickness_mm or 0.0, -d.images, c.series_number)


def measure(candidates: Sequence[Candidate], probe: AreaProbe, step_mm: float) -> dict[str, Coverage]:
    """The Coverage of every candidate; series that share a Frame of Reference are measured along one axis."""
    groups: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        groups[c.frame_of_reference].append(c)
    out: dict[str, Coverage] = {}
    for group in groups.values():
        out.update(_Group(group, probe, step_mm).measure())
    return out


@dataclass
class _Group:
    candidates: list[Candidate]
    probe: AreaProbe
    step_mm: float

    def __post_init__(self) -> None:
        self.ranked = sorted(self.candidates, key=_static_rank)
        self.seen: list[tuple[float, float, float]] = []  # (position, half its slice step, liver area)

    def area(self, c: Candidate, i: int) -> float:
        """Liver area at slice i of c, or at a slice already looked at in the same place."""
        z = c.positions_mm[i]
        for zz, half, a in self.seen:
            if abs(zz - z) <= half:
                return a
        a = float(self.probe(c, [i])[0])
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

    def measure(self) -> dict[str, Coverage]:
        cut: dict[str, str] = {}
        for c in self.ranked:
            first, last = (self.area(c, i) >= MIN_LIVER_MM2 for i in (0, len(c.positions_mm) - 1))
            cut[c.uid] = {(True, True): "cuts the liver off at both ends", (True, False): "cuts the liver off at its "
                          "first slice", (False, True): "cuts the liver off at its last slice"}.get((first, last), "")
        complete = {c.uid: not cut[c.uid] and any(self.area(c, i) >= MIN_LIVER_MM2 for i in self._indices(c))
                    for c in self.ranked}
        if any(complete.values()):
            return {c.uid: Coverage(1.0 if complete[c.uid] else None, complete[c.uid],
                                    cut[c.uid] or ("" if complete[c.uid] else "shows no liver")) for c in self.ranked}
        return self._shares(cut)

    def _shares(self, cut: dict[str, str]) -> dict[str, Coverage]:
        """No series holds the whole liver: the share of the liver the study shows that lies in each."""
        lo = min(c.positions_mm[0] for c in self.ranked)
        hi = max(c.positions_mm[-1] for c in self.ranked)
        liver: list[tuple[float, float]] = []
        for z in np.arange(lo, hi + self.step_mm / 2, self.step_mm):
            for c in self.ranked:
                pos = np.asarray(c.positions_mm)
                if pos[0] - self.step_mm / 2 <= z <= pos[-1] + self.step_mm / 2:
                    i = int(np.argmin(np.abs(pos - z)))
                    if (a := self.area(c, i)) >= MIN_LIVER_MM2:
                        liver.append((float(pos[i]), a))
                    break
        total = sum(a for _, a in liver)
        out = {}
        for c in self.ranked:
            first, last = c.positions_mm[0], c.positions_mm[-1]
            inside = sum(a for z, a in liver if first - self.step_mm / 2 <= z <= last + self.step_mm / 2)
            out[c.uid] = Coverage(inside / total if total else 0.0, False, cut[c.uid] or "shows no liver")
        return out


def model_probe(segmenter: Segmenter, progress: Callable[[int, int], None] = lambda done, total: None
                ) -> AreaProbe:
    """An AreaProbe that decodes the requested slices, turns them the model's way and runs the network at its input
    size: liver plus tumour pixels of the argmax, times the area one such pixel covers."""
    values = [li.value for li in LABELS]
    size = segmenter.spec.size
    done = [0]

    def probe(c: Candidate, idx: list[int]) -> np.ndarray:
        hu = np.stack([hu_of(read_dataset(Path(c.items[i][0])), c.items[i][0]) for i in idx])
        ref = c.items[0][1]
        row_mm, col_mm = (float(v) for v in ref.PixelSpacing)
        pixel_mm2 = (max(hu.shape[1:]) / size) ** 2 * row_mm * col_mm  # square padding keeps pixels' aspect
        labels = segmenter.run(prepare_slices(c.orientation.forward(hu), segmenter.spec)).argmax(-1)
        done[0] += len(idx)
        progress(done[0], 0)
        return np.isin(labels, values).reshape(len(idx), -1).sum(axis=1) * pixel_mm2
    return probe


def coverage_pass(segmenter: Segmenter, step_mm: float,
                  progress: Callable[[int, int], None] = lambda done, total: None):
    """The CoveragePass `select_series` takes: the model's view of where the liver lies."""
    probe = model_probe(segmenter, progress)
    return lambda candidates: measure(candidates, probe, step_mm)
