"""Resampling to and from a fixed-spacing grid, and sliding-window inference over it, for a 3-D network.

Both halves use this module: training runs a Keras model, the node runs ONNX Runtime, so the network always comes
in as a callable and nothing here imports either.

Coordinates are centre-aligned. Along an axis with n source voxels of spacing s and a target spacing t, target
voxel j sits at source coordinate (j + 0.5) * t / s - 0.5, clipped to [0, n - 1]; the way back puts source voxel i
at target coordinate (i + 0.5) * s / t - 0.5, clipped to [0, D - 1]. Along z this is computed here; in-plane
cv2.resize does the same with the ratio of the two sizes (which differs from t / s only by the rounding of the
grid's shape). In-plane, both directions use INTER_AREA along an axis that shrinks and INTER_LINEAR along one that
grows. Label maps take the nearest voxel of that coordinate, floor((j + 0.5) * ratio), on every axis.

Memory stays proportional to the output: `to_grid` reads the source a slab at a time, `from_grid` yields source
planes a chunk at a time, and `sliding_window` holds one accumulator, one weight sum and one batch.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

# Gaussian weights never fall below this fraction of their maximum, so every voxel of a patch counts a little and
# the weight sum is positive wherever any patch reached.
_WEIGHT_FLOOR = 1e-3
# cv2.resize refuses arrays of a few hundred channels and has its fast paths for up to four, so probabilities are
# resized in groups of this many.
_CHANNEL_GROUP = 4


@dataclass(frozen=True)
class Grid:
    """Source planes (n, h, w) with spacing (dz, dy, dx) mm, resampled to target spacing (tz, ty, tx) mm."""

    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    target_spacing: tuple[float, float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_shape", _positive_ints("source_shape", self.source_shape))
        object.__setattr__(self, "source_spacing", _positive_spacings("source_spacing", self.source_spacing))
        object.__setattr__(self, "target_spacing", _positive_spacings("target_spacing", self.target_spacing))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Target grid size (D, H, W): per axis max(1, round(n * s / t))."""
        return tuple(  # type: ignore[return-value]
            max(1, round(n * s / t))
            for n, s, t in zip(self.source_shape, self.source_spacing, self.target_spacing, strict=True)
        )


def _triple(name: str, value: object) -> tuple:
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} {value!r}: expected three values") from None
    if len(items) != 3:
        raise ValueError(f"{name} {value!r}: expected three values, got {len(items)}")
    return items


def _positive_ints(name: str, value: object) -> tuple[int, int, int]:
    items = _triple(name, value)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise ValueError(f"{name} {value!r}: {v!r} is not a positive integer")
    return tuple(int(v) for v in items)  # type: ignore[return-value]


def _positive_spacings(name: str, value: object) -> tuple[float, float, float]:
    items = _triple(name, value)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} {value!r}: {v!r} is not a positive finite spacing in mm")
    return tuple(float(v) for v in items)  # type: ignore[return-value]


def _linear_taps(count: int, ratio: float, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For outputs 0..count-1 at input coordinate (j + 0.5) * ratio - 0.5 clipped to [0, limit - 1]: the lower and
    upper input index and the weight of the upper one."""
    coord = np.clip((np.arange(count) + 0.5) * ratio - 0.5, 0.0, limit - 1)
    lower = np.floor(coord).astype(np.intp)
    upper = np.minimum(lower + 1, limit - 1)
    return lower, upper, coord - lower


def _nearest_taps(count: int, ratio: float, limit: int) -> np.ndarray:
    """Nearest input index to the coordinate (j + 0.5) * ratio - 0.5, clipped to [0, limit - 1]."""
    return np.minimum(np.floor((np.arange(count) + 0.5) * ratio).astype(np.intp), limit - 1)


def _nearest_size_taps(count: int, limit: int) -> np.ndarray:
    # Integer arithmetic: cv2.INTER_NEAREST_EXACT works in fixed point and picks the lower voxel at exact ties
    # (e.g. 30 -> 13), so it does not follow the convention above; these indices do, exactly.
    return np.minimum((2 * np.arange(count) + 1) * limit // (2 * count), limit - 1)


def _blend(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) * a + weight * b as a C-contiguous float32 array (what cv2 wants), skipping b at weight zero."""
    if weight == 0.0:
        return np.ascontiguousarray(a, dtype=np.float32)
    lower = np.asarray(a, dtype=np.float32) * np.float32(1.0 - weight)
    return lower + np.asarray(b, dtype=np.float32) * np.float32(weight)


def _resize_plane(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float32 (h, w) or (h, w, c <= 4) plane to size (H, W): INTER_AREA along an axis that shrinks,
    INTER_LINEAR along one that grows. The channel axis is kept even when c == 1."""
    h, w = size
    ih, iw = img.shape[:2]
    if (ih, iw) == (h, w):
        return img
    out = img
    if (h < ih and w > iw) or (h > ih and w < iw):
        # One interpolation per cv2 call, so an axis that shrinks and one that grows are done one after the other.
        out = cv2.resize(out, (w, ih), interpolation=cv2.INTER_AREA if w < iw else cv2.INTER_LINEAR)
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_AREA if h < ih else cv2.INTER_LINEAR)
    else:
        interp = cv2.INTER_AREA if h <= ih and w <= iw else cv2.INTER_LINEAR
        out = cv2.resize(out, (w, h), interpolation=interp)
    # cv2 drops a trailing channel axis of length 1.
    return out.reshape((h, w) + img.shape[2:])


def _resize_channels(plane: np.ndarray, size: tuple[int, int], out: np.ndarray) -> None:
    """Resize a float32 (H, W, k) plane into out (h, w, k), a few channels per cv2 call."""
    k = plane.shape[2]
    for c in range(0, k, _CHANNEL_GROUP):
        part = np.ascontiguousarray(plane[:, :, c : c + _CHANNEL_GROUP])
        out[:, :, c : c + _CHANNEL_GROUP] = _resize_plane(part, size)


def _read_slab(read: Callable[[int, int], np.ndarray], start: int, stop: int, plane: tuple[int, int]) -> np.ndarray:
    slab = np.asarray(read(start, stop))
    expected = (stop - start, *plane)
    if slab.shape != expected:
        raise ValueError(f"read({start}, {stop}) returned shape {slab.shape}, expected {expected}")
    return slab


def _check_labels(slab: np.ndarray, start: int, stop: int) -> None:
    if slab.dtype == np.uint8 or slab.dtype == np.bool_:
        return
    if not np.issubdtype(slab.dtype, np.integer):
        raise ValueError(f"read({start}, {stop}) returned {slab.dtype} labels; labels must be integers")
    if slab.size and (slab.min() < 0 or slab.max() > 255):
        raise ValueError(f"read({start}, {stop}) returned labels outside 0..255 ({slab.min()}..{slab.max()})")


def to_grid(read: Callable[[int, int], np.ndarray], grid: Grid, *, labels: bool = False, slab: int = 16) -> np.ndarray:
    """Resample source planes to the target grid. read(start, stop) returns source planes start..stop as an array
    (stop-start, h, w) (any float dtype, or uint8 labels). Images: linear in z and in-plane (cv2.INTER_AREA when
    shrinking an axis in-plane, INTER_LINEAR when enlarging), result float32 (D, H, W). labels=True: nearest
    neighbour everywhere, result uint8. Reads the source in slabs (only the source planes needed by `slab` target
    planes at a time), so memory is the output plus a few source planes, never a float copy of the whole source."""
    if slab < 1:
        raise ValueError(f"slab {slab}: must be at least 1 target plane")
    n, h, w = grid.source_shape
    depth, height, width = grid.shape
    ratio = grid.target_spacing[0] / grid.source_spacing[0]
    out = np.empty(grid.shape, dtype=np.uint8 if labels else np.float32)

    if labels:
        planes = _nearest_taps(depth, ratio, n)
        rows = _nearest_size_taps(height, h)
        cols = _nearest_size_taps(width, w)
        for first in range(0, depth, slab):
            want = planes[first : first + slab]
            start, stop = int(want[0]), int(want[-1]) + 1
            source = _read_slab(read, start, stop, (h, w))
            _check_labels(source, start, stop)
            out[first : first + len(want)] = source[want - start][:, rows][:, :, cols]
        return out

    lower, upper, weight = _linear_taps(depth, ratio, n)
    for first in range(0, depth, slab):
        last = min(first + slab, depth)
        start, stop = int(lower[first]), int(upper[last - 1]) + 1
        source = _read_slab(read, start, stop, (h, w))
        for j in range(first, last):
            plane = _blend(source[lower[j] - start], source[upper[j] - start], float(weight[j]))
            out[j] = _resize_plane(plane, (height, width))
    return out


def from_grid(prob: np.ndarray, grid: Grid, *, chunk: int = 16) -> Iterator[tuple[int, np.ndarray]]:
    """prob (D, H, W, k) float on the target grid -> yields (start, (m, h, w, k) float32) chunks of source planes
    start..start+m, in order, covering all n source planes: linear in z and in-plane (cv2.resize per channel group;
    note cv2 drops a trailing axis of length 1). Holds at most `chunk` source planes of output at once."""
    if chunk < 1:
        raise ValueError(f"chunk {chunk}: must be at least 1 source plane")
    if prob.ndim != 4 or prob.shape[:3] != grid.shape or prob.shape[3] < 1:
        raise ValueError(f"prob has shape {prob.shape}, expected {grid.shape} plus a channel axis")
    n, h, w = grid.source_shape
    depth, k = prob.shape[0], prob.shape[3]
    ratio = grid.source_spacing[0] / grid.target_spacing[0]
    lower, upper, weight = _linear_taps(n, ratio, depth)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # A fresh array per chunk: the caller may keep the previous one.
        out = np.empty((stop - start, h, w, k), dtype=np.float32)
        for i in range(start, stop):
            plane = _blend(prob[lower[i]], prob[upper[i]], float(weight[i]))
            _resize_channels(plane, (h, w), out[i - start])
        yield start, out


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of patches along one axis of length `size` (size >= patch):
    step = max(1, round(patch*(1-overlap))), starts 0, step, 2*step, ... and the last start is always size - patch
    (so the end is covered exactly, without padding beyond the volume); sorted, no duplicates. overlap in [0, 1)."""
    if patch < 1 or size < patch:
        raise ValueError(f"size {size}, patch {patch}: need size >= patch >= 1")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap {overlap}: must be in [0, 1)")
    step = max(1, round(patch * (1.0 - overlap)))
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def gaussian_weights(patch: tuple[int, int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """float32 (pd, ph, pw) Gaussian centred on the patch, sigma = sigma_scale * patch size per axis, normalised to
    max 1, with a floor of 1e-3 of the max so that every voxel of every patch has a strictly positive weight."""
    sizes = _positive_ints("patch", patch)
    if not (math.isfinite(sigma_scale) and sigma_scale > 0):
        raise ValueError(f"sigma_scale {sigma_scale}: must be positive")
    weights = np.ones((), dtype=np.float64)
    for p in sizes:
        offset = np.arange(p) - (p - 1) / 2.0
        weights = np.multiply.outer(weights, np.exp(-0.5 * (offset / (sigma_scale * p)) ** 2))
    weights /= weights.max()
    return np.maximum(weights, _WEIGHT_FLOOR).astype(np.float32)


def sliding_window(
    volume: np.ndarray,
    patch: tuple[int, int, int],
    overlap: float,
    run: Callable[[np.ndarray], np.ndarray],
    *,
    batch: int = 1,
    pad_value: float = 0.0,
    on_patch: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """volume (D, H, W) float32 -> blended network output (D, H, W, k) float32.
    Any axis shorter than the patch is padded at its end with pad_value to the patch size (and cropped off again).
    Patches are taken at every combination of window_starts per axis, `batch` patches per call:
    run(x) gets x of shape (b, pd, ph, pw, 1) float32 and returns (b, pd, ph, pw, k) probabilities. Each patch's
    output is multiplied by gaussian_weights(patch) and added into an accumulator; the weights are added into a
    weight sum; the result is accumulator / weight sum. So a network that returns a constant gives exactly that
    constant everywhere (every voxel is covered at least once and the weights divide out). on_patch(done, total)
    after each batch. Memory: the accumulator (D, H, W, k) and the weight sum (D, H, W) float32, plus one batch."""
    patch = _positive_ints("patch", patch)
    if batch < 1:
        raise ValueError(f"batch {batch}: must be at least 1 patch")
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"volume has shape {volume.shape}, expected (D, H, W)")
    size = volume.shape
    short = [max(0, p - s) for p, s in zip(patch, size, strict=True)]
    if any(short):
        volume = np.pad(volume, [(0, e) for e in short], constant_values=np.float32(pad_value))
    padded = volume.shape

    corners = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(padded, patch, strict=True))))
    weights = gaussian_weights(patch)
    channel_weights = weights[..., None]
    weight_sum = np.zeros(padded, dtype=np.float32)
    acc: np.ndarray | None = None

    total = len(corners)
    for first in range(0, total, batch):
        group = corners[first : first + batch]
        slices = [tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True)) for corner in group]
        x = np.stack([volume[s] for s in slices])[..., None]
        y = np.asarray(run(x))
        if y.ndim != 5 or y.shape[:4] != x.shape[:4] or y.shape[4] < 1:
            raise ValueError(f"run returned shape {y.shape} for input {x.shape}; expected {x.shape[:4]} + (k,)")
        if acc is None:
            acc = np.zeros((*padded, y.shape[4]), dtype=np.float32)
        elif y.shape[4] != acc.shape[3]:
            raise ValueError(f"run returned {y.shape[4]} channels after returning {acc.shape[3]}")
        for s, out in zip(slices, y, strict=True):
            acc[s] += out.astype(np.float32, copy=False) * channel_weights
            weight_sum[s] += weights
        if on_patch is not None:
            on_patch(first + len(group), total)

    assert acc is not None  # window_starts never returns an empty list, so run was called at least once
    acc /= weight_sum[..., None]
    return np.ascontiguousarray(acc[: size[0], : size[1], : size[2]])
