"""3-D training data for the V-Net: prepared cases resampled to one spacing, and batches of patches.

A case's resampled volume is a second entry inside its cache entry (`grid-<spacing>/`), made once from the
prepared slices with `imaging.grid.to_grid` — the function the node resamples a study with — so the V-Net is trained
on exactly what the node will give it. Patches are read a slab at a time (pread), as slices are for the 2-D models.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm import tqdm

from livernode.config import TrainConfig, VolumeConfig
from livernode.errors import DatasetError
from livernode.fsutil import building_dir, write_json
from livernode.imaging.grid import Grid, to_grid
from livernode.training.cache import _npy_layout, read_rows
from livernode.training.data import Batches, CaseSplit, _augment, targets

log = logging.getLogger(__name__)
IMAGE, LABELS, PLANES, META = "image.npy", "labels.npy", "planes.npy", "grid.json"
HAS_LIVER, HAS_TUMOUR = 0, 1


@dataclass(frozen=True)
class CachedGrid:
    """One case on the V-Net's grid: float16 image (D, H, W) in [0, 1], uint8 labels, per-plane flags."""

    path: Path
    grid: Grid

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @cached_property
    def _layouts(self) -> dict:
        return {name: _npy_layout(self.path / name) for name in (IMAGE, LABELS)}

    def images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return read_rows(self.path / IMAGE, start, self.shape[0] if stop is None else stop, self._layouts[IMAGE])

    def labels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return read_rows(self.path / LABELS, start, self.shape[0] if stop is None else stop, self._layouts[LABELS])

    @cached_property
    def planes(self) -> np.ndarray:
        return np.load(self.path / PLANES)


def grid_entry(case, spacing: tuple[float, float, float]) -> CachedGrid:
    """The case resampled to `spacing`, made now when its entry is missing."""
    grid = Grid((case.n, case.size, case.size), tuple(case.plane_spacing), tuple(float(s) for s in spacing))
    folder = case.path / ("grid-" + "x".join(f"{s:g}" for s in grid.target_spacing))
    if not (folder / META).exists():
        image = to_grid(lambda a, b: case.images(a, b), grid).astype(np.float16)
        labels = to_grid(lambda a, b: case.labels(a, b), grid, labels=True)
        flat = labels.reshape(len(labels), -1)
        with building_dir(folder) as tmp:
            np.save(tmp / IMAGE, image)
            np.save(tmp / LABELS, labels)
            np.save(tmp / PLANES, np.stack([(flat > 0).any(1), (flat == 2).any(1)], 1))
            write_json(tmp / META, {"shape": list(grid.shape), "source_shape": list(grid.source_shape),
                                    "source_spacing": list(grid.source_spacing),
                                    "target_spacing": list(grid.target_spacing)})
    meta = json.loads((folder / META).read_text())
    if tuple(meta["shape"]) != grid.shape:
        raise DatasetError(f"{folder}: holds a grid of {meta['shape']}, expected {list(grid.shape)}; delete it")
    return CachedGrid(folder, grid)


@dataclass(frozen=True)
class VolumeSplit(CaseSplit):
    """The cases of a split as volumes on the V-Net's grid (their slices stay available for scoring)."""

    volume_cfg: VolumeConfig = field(default_factory=VolumeConfig)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.volume_cfg.spacing_mm)

    @cached_property
    def grids(self) -> tuple[CachedGrid, ...]:
        todo = [c for c in self.cases]
        return tuple(grid_entry(c, self.spacing) for c in tqdm(todo, desc=f"resample {self.name}", unit="case",
                                                              disable=len(todo) < 8, leave=False))

    @property
    def voxels(self) -> int:
        return int(sum(np.prod(g.shape) for g in self.grids))


def crop(volume: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """volume[start : start + size] per axis, zero-padded at the end where the volume is smaller."""
    part = volume[tuple(slice(s, s + n) for s, n in zip(start, size))]
    pad = [(0, n - p) for n, p in zip(size, part.shape)]
    return np.pad(part, pad) if any(p for _, p in pad) else part


def patch_start(centre: int, size: int, length: int, jitter: int) -> int:
    """The first index of a patch of `size` around `centre` (moved by `jitter`), inside [0, length - size]."""
    return int(np.clip(centre - size // 2 + jitter, 0, max(0, length - size)))


@dataclass
class PatchBatches(Batches):
    """Batches of patches: configured shares centred on a tumour voxel and on a liver voxel, the rest anywhere;
    a pure function of (seed, step), as the slice batches are."""

    volume: VolumeConfig = field(default_factory=VolumeConfig)

    def __post_init__(self) -> None:
        split = self.split
        if not isinstance(split, VolumeSplit) or not split.cases:
            raise DatasetError(f"the {split.name} split has no volumes")
        tumour, liver, anything = [], [], []
        for k, g in enumerate(split.grids):
            planes = g.planes
            for z in range(g.shape[0]):
                anything.append((k, z))
                if planes[z, HAS_LIVER]:
                    liver.append((k, z))
                if planes[z, HAS_TUMOUR] and split.cases[k].tumour_labelled:
                    tumour.append((k, z))
        self._pools = tuple(np.asarray(p, np.int64).reshape(-1, 2) for p in (tumour, liver, anything))

    @property
    def size(self) -> int:
        return self.volume.batch_size

    def picks(self, step: int) -> np.ndarray:
        """(b, 3): pool (0 tumour, 1 liver, 2 anywhere), case, plane of each patch's centre."""
        rng = np.random.default_rng([self.seed, step, 0])
        tumour, liver, anything = self._pools
        b, n_tumour, n_liver = self.shares()
        rows = []
        for pool, pool_id, count in ((tumour, 0, n_tumour), (liver, 1, n_liver), (anything, 2, b - n_tumour - n_liver)):
            for i in rng.integers(0, len(pool), count):
                rows.append((pool_id, *pool[i]))
        return np.asarray(rows, np.int64).reshape(-1, 3)

    def patch(self, k: int, z: int, pool: int, rng: np.random.Generator, augment: bool = True
              ) -> tuple[np.ndarray, np.ndarray]:
        """One patch (d, h, w) float32 and its labels around plane z of case k."""
        g = self.split.grids[k]
        d, h, w = self.volume.patch
        D, H, W = g.shape
        plane = g.labels(z, z + 1)[0]
        wanted = plane == 2 if pool == 0 else plane > 0 if pool == 1 else None
        if wanted is not None and wanted.any():
            ys, xs = np.nonzero(wanted)
            i = int(rng.integers(len(ys)))
            cy, cx = int(ys[i]), int(xs[i])
        else:
            cy, cx = int(rng.integers(H)), int(rng.integers(W))
        jit = [int(rng.integers(-n // 4, n // 4 + 1)) for n in (d, h, w)]
        start = (patch_start(z, d, D, jit[0]), patch_start(cy, h, H, jit[1]), patch_start(cx, w, W, jit[2]))
        x = crop(g.images(start[0], start[0] + d)[:, start[1]:start[1] + h, start[2]:start[2] + w],
                 (0, 0, 0), (d, h, w)).astype(np.float32)
        y = crop(g.labels(start[0], start[0] + d)[:, start[1]:start[1] + h, start[2]:start[2] + w],
                 (0, 0, 0), (d, h, w))
        if augment and self.cfg.augment.enabled:
            x, y = _augment(x, y, rng, self.cfg)
        return x, y

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (b, d, h, w, 1), targets (b, d, h, w, 4)) for global step `step`."""
        rng = np.random.default_rng([self.seed, step, 1])
        xs, ys, known = [], [], []
        for pool, k, z in self.picks(step):
            x, y = self.patch(int(k), int(z), int(pool), rng)
            xs.append(x)
            ys.append(y)
            known.append(self.split.cases[int(k)].tumour_labelled)
        return np.stack(xs)[..., None], targets(np.stack(ys), np.asarray(known))

    def x_shape(self) -> tuple[int, ...]:
        return (self.size, *self.volume.patch, 1)

    def sample(self, n: int) -> np.ndarray:
        """n patches (n, d, h, w, 1) without augmentation, for the export's parity check: seeded, liver first."""
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        tumour, liver, anything = self._pools
        pool = liver if len(liver) else anything
        out = []
        for i in rng.integers(0, len(pool), n):
            k, z = pool[i]
            out.append(self.patch(int(k), int(z), 1, rng, augment=False)[0])
        return np.stack(out)[..., None]
