"""Patient-level splits, case arrays at training resolution, and the augmented batch stream."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from livernode.config import SplitConfig, TrainConfig
from livernode.errors import DatasetError, SeriesRejected
from livernode.imaging.orient import Orientation
from livernode.imaging.preprocess import PreprocessSpec, prepare_labels, prepare_slices
from livernode.training.datasets import CaseRef, list_cases, load_case

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitArrays:
    """All slices of one split at training resolution: x (n, s, s, c), y (n, s, s), known (n,), case index (n,)."""

    name: str
    case_ids: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    known: np.ndarray
    case_index: np.ndarray
    spacings: tuple[tuple[float, float, float], ...]
    synthetic: tuple[bool, ...] = ()  # per case: a livernode phantom

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def split_cases(refs: list[CaseRef], cfg: SplitConfig) -> dict[str, list[CaseRef]]:
    """Seeded split by patient (case), never by slice. With three or more cases, validation and test get one each
    at least, so no patient's slices appear in two splits."""
    if len(refs) < 3:
        raise DatasetError(f"{len(refs)} cases: need at least 3 to split by patient into train/validation/test")
    order = np.random.default_rng(cfg.seed).permutation(len(refs))
    n_test = max(1, round(cfg.test * len(refs))) if cfg.test > 0 else 0
    n_val = max(1, round(cfg.validation * len(refs))) if cfg.validation > 0 else 0
    if len(refs) - n_test - n_val < 1:
        raise DatasetError(f"{len(refs)} cases leave no training case after {n_val} validation and {n_test} test")
    test = [refs[i] for i in order[:n_test]]
    val = [refs[i] for i in order[n_test : n_test + n_val]]
    train = [refs[i] for i in order[n_test + n_val :]]
    return {"train": train, "validation": val, "test": test}


def load_split(name: str, refs: list[CaseRef], spec: PreprocessSpec) -> SplitArrays:
    xs, ys, known, idx, spacings, loaded, synthetic = [], [], [], [], [], [], []
    for ref in tqdm(refs, desc=f"load {name}", unit="case", leave=False):
        case = load_case(ref)
        try:
            turn = Orientation.from_iop(case.volume.orientation)  # every case the way the node will show it
        except SeriesRejected as exc:  # an oblique or non-axial case: the node would refuse such a study too
            log.warning("skipping case %s: %s", ref.case_id, exc)
            continue
        i = len(loaded)
        loaded.append(ref.case_id)
        synthetic.append(case.synthetic)
        xs.append(prepare_slices(turn.forward(case.volume.hu), spec))
        ys.append(prepare_labels(turn.forward(case.labels), spec.size))
        known.append(np.full(len(case.labels), case.tumour_labelled))
        idx.append(np.full(len(case.labels), i))
        spacings.append(turn.spacing(case.volume.spacing))
    if not xs:
        empty = np.zeros((0, spec.size, spec.size, spec.channels), np.float32)
        return SplitArrays(name, (), empty, np.zeros((0, spec.size, spec.size), np.uint8),
                           np.zeros(0, bool), np.zeros(0, int), ())
    return SplitArrays(name, tuple(loaded), np.concatenate(xs), np.concatenate(ys),
                       np.concatenate(known), np.concatenate(idx), tuple(spacings), tuple(synthetic))


def load_splits(data: Path, fmt: str, spec: PreprocessSpec, cfg: SplitConfig) -> dict[str, SplitArrays]:
    refs = list_cases(data, fmt)
    parts = split_cases(refs, cfg)
    return {name: load_split(name, part, spec) for name, part in parts.items()}


def targets(y: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(n, s, s) labels + (n,) tumour-labelled flags -> (n, s, s, 4) float32 one-hot + flag channel."""
    out = np.zeros(y.shape + (4,), np.float32)
    for c in range(3):
        out[..., c] = y == c
    out[..., 3] = known[:, None, None]
    return out


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    a = cfg.augment
    if a.flip and rng.random() < 0.5:  # off by default: a mirrored abdomen puts the liver on the wrong side
        x, y = x[:, ::-1], y[:, ::-1]
    if a.rotate_degrees > 0:
        s = x.shape[0]
        m = cv2.getRotationMatrix2D((s / 2, s / 2), rng.uniform(-a.rotate_degrees, a.rotate_degrees),
                                    rng.uniform(0.92, 1.08))
        x = cv2.warpAffine(np.ascontiguousarray(x), m, (s, s), flags=cv2.INTER_LINEAR, borderValue=0)
        if x.ndim == 2:
            x = x[..., None]
        y = cv2.warpAffine(np.ascontiguousarray(y), m, (s, s), flags=cv2.INTER_NEAREST, borderValue=0)
    if a.intensity_jitter > 0:
        j = a.intensity_jitter
        x = np.clip(x * rng.uniform(1 - j, 1 + j) + rng.uniform(-j, j), 0, 1)
    return x.astype(np.float32), y


class BatchStream:
    """Endless batches; configured shares of each batch come from slices with tumour and with liver."""

    def __init__(self, split: SplitArrays, cfg: TrainConfig, seed: int) -> None:
        self.split, self.cfg = split, cfg
        self.rng = np.random.default_rng(seed)
        flat = split.y.reshape(split.n, -1)
        self.liver_idx = np.flatnonzero((flat > 0).any(1))
        self.tumour_idx = np.flatnonzero((flat == 2).any(1) & split.known)
        self.all_idx = np.arange(split.n)

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        b, c = self.cfg.batch_size, self.cfg
        n_tumour = int(round(b * c.tumour_slices_fraction)) if len(self.tumour_idx) else 0
        n_liver = min(b - n_tumour, int(round(b * c.liver_slices_only_fraction))) if len(self.liver_idx) else 0
        pick = np.concatenate([self.rng.choice(self.tumour_idx, n_tumour), self.rng.choice(self.liver_idx, n_liver),
                               self.rng.choice(self.all_idx, b - n_tumour - n_liver)]).astype(int)
        xs, ys = [], []
        for i in pick:
            x, y = self.split.x[i], self.split.y[i]
            if self.cfg.augment.enabled:
                x, y = _augment(x, y, self.rng, self.cfg)
            xs.append(x)
            ys.append(y)
        return np.stack(xs), targets(np.stack(ys), self.split.known[pick])

    def __iter__(self):
        while True:
            yield self.batch()
