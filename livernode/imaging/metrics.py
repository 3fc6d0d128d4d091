"""Segmentation metrics as the LiTS and CHAOS challenges define them.

Rules for empty masks (stated once, tested in tests/imaging/test_metrics.py):
- both reference and prediction empty: Dice = IoU = 1, VOE = RVD = 0, surface distances = 0;
- exactly one empty: Dice = IoU = 0, VOE = 1; RVD = -1 when only the prediction is empty and undefined (NaN)
  when only the reference is empty; surface distances are undefined (NaN).
NaN values are left out of averages and reported as such. Surface distances (ASSD, HD95, maximum surface
distance) come from medpy.metric.binary, the implementation the LiTS evaluation used, with voxel spacing in mm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

NAN = float("nan")


@dataclass(frozen=True)
class OverlapMetrics:
    dice: float
    iou: float
    voe: float
    rvd: float


@dataclass(frozen=True)
class SurfaceMetrics:
    assd: float
    hd95: float
    msd: float


def overlap(pred: np.ndarray, ref: np.ndarray) -> OverlapMetrics:
    p, r = pred.astype(bool), ref.astype(bool)
    ps, rs = int(p.sum()), int(r.sum())
    if ps == 0 and rs == 0:
        return OverlapMetrics(1.0, 1.0, 0.0, 0.0)
    inter = int(np.logical_and(p, r).sum())
    union = ps + rs - inter
    dice = 2 * inter / (ps + rs)
    iou = inter / union
    rvd = (ps - rs) / rs if rs else NAN
    return OverlapMetrics(dice, iou, 1 - iou, rvd)


def surface(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> SurfaceMetrics:
    p, r = pred.astype(bool), ref.astype(bool)
    if not p.any() and not r.any():
        return SurfaceMetrics(0.0, 0.0, 0.0)
    if not p.any() or not r.any():
        return SurfaceMetrics(NAN, NAN, NAN)
    from medpy.metric import binary  # the train extra; imported here so the daemon never needs it

    return SurfaceMetrics(
        assd=float(binary.assd(p, r, voxelspacing=spacing)),
        hd95=float(binary.hd95(p, r, voxelspacing=spacing)),
        msd=float(binary.hd(p, r, voxelspacing=spacing)),
    )


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise detection: a reference lesion is found when a predicted lesion overlaps it with IoU > 0.5."""

    reference_lesions: int
    predicted_lesions: int
    true_positives: int  # reference lesions found
    matched_predictions: int  # predicted lesions that match a reference lesion

    @property
    def recall(self) -> float:
        return self.true_positives / self.reference_lesions if self.reference_lesions else NAN

    @property
    def precision(self) -> float:
        return self.matched_predictions / self.predicted_lesions if self.predicted_lesions else NAN


def lesion_detection(pred: np.ndarray, ref: np.ndarray, iou_threshold: float = 0.5) -> LesionDetection:
    """3-D connected components (26-connectivity) of both masks, matched by IoU."""
    structure = np.ones((3, 3, 3), bool)
    rl, nr = ndimage.label(ref.astype(bool), structure)
    pl, npred = ndimage.label(pred.astype(bool), structure)
    if nr == 0 or npred == 0:
        return LesionDetection(nr, npred, 0, 0)
    both = (rl > 0) & (pl > 0)
    pairs, inter = np.unique(np.stack([rl[both], pl[both]]), axis=1, return_counts=True)
    r_size = np.bincount(rl.ravel(), minlength=nr + 1)
    p_size = np.bincount(pl.ravel(), minlength=npred + 1)
    iou = inter / (r_size[pairs[0]] + p_size[pairs[1]] - inter)
    hit = iou > iou_threshold
    return LesionDetection(nr, npred, len(set(pairs[0][hit].tolist())), len(set(pairs[1][hit].tolist())))


@dataclass(frozen=True)
class ConfusionMetrics:
    """Pixel-wise binary classification figures for one class."""

    tp: int
    fp: int
    tn: int
    fn: int
    auc: float

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / max(1, self.tp + self.fp + self.tn + self.fn)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else NAN

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else NAN

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else NAN

    @property
    def dice(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else 1.0

    @property
    def iou(self) -> float:
        d = self.tp + self.fp + self.fn
        return self.tp / d if d else 1.0

    def as_dict(self) -> dict[str, float]:
        out = asdict(self)
        for k in ("accuracy", "precision", "sensitivity", "specificity", "dice", "iou"):
            out[k] = getattr(self, k)
        return out


def _score_histograms(scores: np.ndarray, truth: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    truth = truth.astype(bool).ravel()
    s = np.clip(scores.ravel(), 0, 1)
    b = np.minimum((s * bins).astype(np.int64), bins - 1)
    return (np.bincount(b[truth], minlength=bins).astype(np.float64),
            np.bincount(b[~truth], minlength=bins).astype(np.float64))


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return NAN
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def roc_auc(scores: np.ndarray, truth: np.ndarray, bins: int = 2048) -> float:
    """Area under the ROC curve from scores in [0, 1], by binned rank statistics (ties share half credit)."""
    return _auc(*_score_histograms(scores, truth, bins))


def confusion(pred: np.ndarray, prob: np.ndarray, truth: np.ndarray) -> ConfusionMetrics:
    """Binary figures for the hard prediction `pred` (argmax), with AUC from the class probability `prob`."""
    counter = ConfusionCounter()
    counter.add(pred, prob, truth)
    return counter.result()


class ConfusionCounter:
    """`confusion` over data seen a piece at a time (case by case): the same figures, AUC included, without
    holding the pieces."""

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.counts = np.zeros(4, np.int64)  # tp, fp, tn, fn
        self.pos = np.zeros(bins)
        self.neg = np.zeros(bins)

    def add(self, pred: np.ndarray, prob: np.ndarray, truth: np.ndarray) -> None:
        t, p = truth.astype(bool), pred.astype(bool)
        tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
        self.counts += (tp, fp, t.size - tp - fp - fn, fn)
        pos, neg = _score_histograms(prob, t, self.bins)
        self.pos += pos
        self.neg += neg

    @property
    def seen(self) -> int:
        return int(self.counts.sum())

    def result(self) -> ConfusionMetrics:
        tp, fp, tn, fn = (int(v) for v in self.counts)
        return ConfusionMetrics(tp, fp, tn, fn, _auc(self.pos, self.neg))


def nanmean(values) -> float:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else NAN
