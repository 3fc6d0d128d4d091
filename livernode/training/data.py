"""Patient-level splits and folds, splits over the prepared cache, and the streamed, augmented batches.

Nothing here holds a split in memory: a `CaseSplit` indexes cache entries, and every batch is made from the
slices it reads. A batch is a pure function of (seed, global step), so the data order is the same after
`--resume`, whatever the number of pipeline workers or machines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np

from livernode.config import SplitConfig, TrainConfig
from livernode.errors import DatasetError
from livernode.imaging.preprocess import context_span, stack_context
from livernode.training.cache import HAS_LIVER, HAS_TUMOUR, TUMOUR_LABELLED, CachedCase
from livernode.training.datasets import CaseRef

log = logging.getLogger(__name__)


def split_cases(refs: list[CaseRef], cfg: SplitConfig, folds: int | None = None,
                fold: int | None = None) -> dict[str, list[CaseRef]]:
    """Seeded split by patient (case), never by slice; the same cases and seed give the same split every time.

    Without folds, test and validation take their shares (one case each at least). With `folds` K and `fold` I,
    the cases are dealt into K folds in a seeded order; fold I is the test set, validation takes its share of
    the rest, and training the remainder, so each case is tested in exactly one of the K runs."""
    if len(refs) < 3:
        raise DatasetError(f"{len(refs)} cases: need at least 3 to split by patient into train/validation/test")
    ordered = sorted(refs, key=lambda r: r.case_id)  # the listing order of a download must not matter
    order = np.random.default_rng(cfg.seed).permutation(len(ordered))
    if folds:
        if not 2 <= folds <= len(ordered) - 1:
            raise DatasetError(f"--folds {folds}: need 2 to {len(ordered) - 1} folds for {len(ordered)} cases")
        if fold is None or not 0 <= fold < folds:
            raise DatasetError(f"--fold {fold}: choose 0 to {folds - 1}")
        parts = fold_parts(order, folds)
        test_idx = parts[fold]
        rest = np.concatenate([p for k, p in enumerate(parts) if k != fold])
        n_val = max(1, round(cfg.validation * len(ordered)))
        if len(rest) - n_val < 1:
            raise DatasetError(f"{len(ordered)} cases leave no training case in fold {fold} of {folds}")
        val_idx, train_idx = rest[:n_val], rest[n_val:]
    else:
        n_test = max(1, round(cfg.test * len(ordered))) if cfg.test > 0 else 0
        n_val = max(1, round(cfg.validation * len(ordered)))
        if len(ordered) - n_test - n_val < 1:
            raise DatasetError(f"{len(ordered)} cases leave no training case after {n_val} validation and "
                               f"{n_test} test")
        test_idx, val_idx, train_idx = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return {name: [ordered[i] for i in idx]
            for name, idx in (("train", train_idx), ("validation", val_idx), ("test", test_idx))}


def fold_parts(order: np.ndarray, folds: int) -> list[np.ndarray]:
    return np.array_split(order, folds)


def fold_members(refs: list[CaseRef], cfg: SplitConfig, folds: int) -> list[list[str]]:
    """The patients of each fold, as `split_cases` deals them (for run.json)."""
    ordered = sorted(refs, key=lambda r: r.case_id)
    order = np.random.default_rng(cfg.seed).permutation(len(ordered))
    return [sorted(ordered[i].case_id for i in part) for part in fold_parts(order, folds)]


@dataclass(frozen=True)
class CaseSplit:
    """The slices of some prepared cases, addressed by one flat index; only flags are held in memory. Each slice
    comes with `context` neighbours on each side as channels (2.5-D); without context a grey slice is repeated
    into `channels`."""

    name: str
    cases: tuple[CachedCase, ...]
    channels: int = 1
    context: int = 0

    @property
    def net_channels(self) -> int:
        """Channels of the network input."""
        return 2 * self.context + 1 if self.context else self.channels

    @cached_property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([c.n for c in self.cases])]).astype(np.int64)

    @property
    def n(self) -> int:
        return int(self.starts[-1])

    @property
    def case_ids(self) -> tuple[str, ...]:
        return tuple(c.case_id for c in self.cases)

    @property
    def synthetic(self) -> tuple[bool, ...]:
        return tuple(c.synthetic for c in self.cases)

    @cached_property
    def flags(self) -> np.ndarray:
        return (np.concatenate([c.flags for c in self.cases]) if self.cases else np.zeros((0, 3), bool))

    @property
    def known(self) -> np.ndarray:
        return self.flags[:, TUMOUR_LABELLED]

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, int(i - self.starts[k])

    def planes(self, k: int, start: int, stop: int) -> np.ndarray:
        """(stop - start, s, s, 2 * context + 1) float32: slices start..stop of case k, each with its neighbours
        (the node stacks them with the same function)."""
        c = self.cases[k]
        first, last = context_span(c.n, start, stop, self.context)
        return stack_context(c.images(first, last), c.n, start, stop, self.context, first)

    def slice(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(size, size, 2 * context + 1) float32 image in [0, 1] and (size, size) uint8 labels of flat slice i."""
        k, j = self.locate(i)
        return self.planes(k, j, j + 1)[0], self.cases[k].labels(j, j + 1)[0]

    def inputs(self, x: np.ndarray) -> np.ndarray:
        """(n, s, s, c) slices (with their context) -> (n, s, s, net_channels) network inputs."""
        return np.repeat(x, self.channels, -1) if x.shape[-1] == 1 and self.channels > 1 else x

    def case_arrays(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One case's network inputs, labels and tumour-labelled flags (read from the cache now)."""
        return self.case_chunk(k, 0, self.cases[k].n)

    def case_chunk(self, k: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inputs, labels and tumour-labelled flags of slices start..stop of case k."""
        c = self.cases[k]
        stop = min(stop, c.n)
        return self.inputs(self.planes(k, start, stop)), c.labels(start, stop), c.flags[start:stop, TUMOUR_LABELLED]

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inputs, labels and flags of the flat slices `idx` (a sample; never a whole split)."""
        pairs = [self.slice(int(i)) for i in idx]
        s = self.cases[0].size if self.cases else 0
        x = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, s, s, 2 * self.context + 1), np.float32)
        y = np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, s, s), np.uint8)
        return self.inputs(x), y, self.known[np.asarray(idx, int)]


def targets(y: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(n, ...) labels (slices or patches) + (n,) tumour-labelled flags -> (n, ..., 4) float32 one-hot + flag
    channel."""
    out = np.zeros(y.shape + (4,), np.float32)
    for c in range(3):
        out[..., c] = y == c
    out[..., 3] = np.asarray(known, np.float32).reshape((-1,) + (1,) * (y.ndim - 1))
    return out


def _warp(a: np.ndarray, m: np.ndarray, flags: int) -> np.ndarray:
    """cv2.warpAffine of an (r, c) or (r, c, channels) array, keeping its shape (OpenCV drops a last axis of 1
    and takes at most 4 channels at once)."""
    size = (a.shape[1], a.shape[0])
    if a.ndim == 2:
        return cv2.warpAffine(np.ascontiguousarray(a), m, size, flags=flags, borderValue=0)
    return np.stack([cv2.warpAffine(np.ascontiguousarray(a[..., i]), m, size, flags=flags, borderValue=0)
                     for i in range(a.shape[-1])], -1)


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Image (rows, cols, channels) and labels (rows, cols), or a patch (d, rows, cols) and its labels, augmented
    alike in every slice and channel."""
    a = cfg.augment
    if a.flip and rng.random() < 0.5:  # off by default: a mirrored abdomen puts the liver on the wrong side
        x, y = (x[:, :, ::-1], y[:, :, ::-1]) if y.ndim == 3 else (x[:, ::-1], y[:, ::-1])
    if a.rotate_degrees > 0:
        r, c = y.shape[-2:]
        m = cv2.getRotationMatrix2D((c / 2, r / 2), rng.uniform(-a.rotate_degrees, a.rotate_degrees),
                                    rng.uniform(0.92, 1.08))
        if y.ndim == 3:  # a patch: the same turn for every slice
            x = np.stack([_warp(p, m, cv2.INTER_LINEAR) for p in x])
            y = np.stack([_warp(p, m, cv2.INTER_NEAREST) for p in y])
        else:
            x, y = _warp(x, m, cv2.INTER_LINEAR), _warp(y, m, cv2.INTER_NEAREST)
    if a.intensity_jitter > 0:
        j = a.intensity_jitter
        x = np.clip(x * rng.uniform(1 - j, 1 + j) + rng.uniform(-j, j), 0, 1)
    return x.astype(np.float32), y


@dataclass
class Batches:
    """Training batches from a split: configured shares of each batch come from slices with a labelled tumour and
    from slices with liver, the rest from any slice. `batch(step)` depends only on (seed, step): every worker of
    a multi-worker run makes the same global batch, and tf.distribute hands each its part."""

    split: CaseSplit
    cfg: TrainConfig
    seed: int
    _pools: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        f = self.split.flags
        self._pools = (np.flatnonzero(f[:, HAS_TUMOUR] & f[:, TUMOUR_LABELLED]), np.flatnonzero(f[:, HAS_LIVER]),
                       np.arange(self.split.n))
        if self.split.n == 0:
            raise DatasetError(f"the {self.split.name} split has no slices")

    @property
    def size(self) -> int:
        return self.cfg.batch_size

    def shares(self) -> tuple[int, int, int]:
        """(batch size, items from the tumour pool, items from the liver pool) of every batch."""
        b, c = self.size, self.cfg
        tumour, liver, _ = self._pools
        n_tumour = int(round(b * c.tumour_slices_fraction)) if len(tumour) else 0
        n_liver = min(b - n_tumour, int(round(b * c.liver_slices_only_fraction))) if len(liver) else 0
        return b, n_tumour, n_liver

    def picks(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, 0])
        tumour, liver, anything = self._pools
        b, n_tumour, n_liver = self.shares()
        return np.concatenate([rng.choice(tumour, n_tumour), rng.choice(liver, n_liver),
                               rng.choice(anything, b - n_tumour - n_liver)]).astype(np.int64)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (b, s, s, channels), targets (b, s, s, 4)) for global step `step`."""
        pick = self.picks(step)
        rng = np.random.default_rng([self.seed, step, 1])
        xs, ys = [], []
        for i in pick:
            x, y = self.split.slice(int(i))
            if self.cfg.augment.enabled:
                x, y = _augment(x, y, rng, self.cfg)
            xs.append(x)
            ys.append(y)
        return self.split.inputs(np.stack(xs)), targets(np.stack(ys), self.split.known[pick])

    def x_shape(self) -> tuple[int, ...]:
        s = self.split.cases[0].size
        return (self.size, s, s, self.split.net_channels)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1

    def dataset(self, tf, first_step: int, last_step: int, workers: int):
        """A tf.data pipeline of batches for global steps [first_step, last_step): `workers` batches are made in
        parallel (OpenCV and the memory-mapped reads release the interpreter lock) and two are kept ready."""
        shape = self.x_shape()

        def make(step):
            x, t = self.batch(int(step))
            return x, t

        def load(step):
            x, t = tf.numpy_function(make, [step], (tf.float32, tf.float32), stateful=False)
            x.set_shape(shape)
            t.set_shape(shape[:-1] + (4,))
            return x, t

        ds = tf.data.Dataset.range(first_step, last_step)
        ds = ds.map(load, num_parallel_calls=max(1, workers), deterministic=True)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options).prefetch(2)
