"""raw -> HU -> window -> [0,1] -> (optional bilateral) -> square, multiple of 32 -> 1 or 3 channels.

The training loaders and the daemon both call these functions, so a slice gives the same array in both halves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PreprocessSpec:
    """What a model expects as input; written into and read back from the ONNX manifest."""

    window_low: float = -100.0
    window_high: float = 400.0
    channels: int = 1
    size: int = 256
    size_multiple: int = 32
    bilateral: bool = False

    def __post_init__(self) -> None:
        if self.window_high <= self.window_low:
            raise ValueError(f"window high {self.window_high} must exceed low {self.window_low}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.size % self.size_multiple:
            raise ValueError(f"size {self.size} is not a multiple of {self.size_multiple}")


def to_hu(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Stored pixel values to Hounsfield units (float32)."""
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip HU to [low, high] and scale linearly to [0, 1] (float32)."""
    out = (hu.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def _square_pad(shape: tuple[int, int]) -> tuple[int, int, int, int]:
    rows, cols = shape
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    return top, side - rows - top, left, side - cols - left


def _resize(img: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def prepare_slices(hu: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(n, rows, cols) HU -> (n, size, size, channels) float32 network input.

    Non-square slices are padded to a square with the window's low value (air), then resized.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected (slices, rows, cols), got shape {hu.shape}")
    top, bottom, left, right = _square_pad(hu.shape[1:])
    out = np.empty((hu.shape[0], spec.size, spec.size, spec.channels), np.float32)
    for i, sl in enumerate(hu):
        w = window(sl, spec.window_low, spec.window_high)
        if spec.bilateral:
            w = cv2.bilateralFilter(w, d=5, sigmaColor=0.1, sigmaSpace=2.0)
        if top or bottom or left or right:
            w = cv2.copyMakeBorder(w, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0.0)
        out[i] = _resize(w, spec.size, nearest=False)[..., None]
    return out


def prepare_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """(n, rows, cols) integer labels -> (n, size, size) uint8, padded and resized like `prepare_slices`."""
    top, bottom, left, right = _square_pad(labels.shape[1:])
    out = np.empty((labels.shape[0], size, size), np.uint8)
    for i, sl in enumerate(labels.astype(np.uint8)):
        if top or bottom or left or right:
            sl = cv2.copyMakeBorder(sl, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
        out[i] = _resize(sl, size, nearest=True)
    return out


def prepared_spacing(shape: tuple[int, int], spacing: tuple[float, float, float], size: int
                     ) -> tuple[float, float, float]:
    """(slice, row, column) mm of slices of `shape` (rows, cols) and `spacing` after `prepare_slices` has padded
    them to a square and resized them to `size`."""
    side = max(shape)
    return float(spacing[0]), float(spacing[1]) * side / size, float(spacing[2]) * side / size


def context_index(n: int, start: int, stop: int, k: int, reverse: bool = False) -> np.ndarray:
    """(stop - start, 2k + 1) slice indices: slice i with its k neighbours on each side, foot to head, for slices
    start..stop of an n-slice volume. A neighbour beyond the volume repeats the edge slice. `reverse`: the volume
    is stored head to foot (Orientation.reverse_slices), so the foot-side neighbour of slice i is i + 1."""
    offsets = np.arange(-k, k + 1)
    if reverse:
        offsets = offsets[::-1]
    return np.clip(np.arange(start, stop)[:, None] + offsets[None, :], 0, n - 1)


def stack_context(planes: np.ndarray, n: int, start: int, stop: int, k: int, first: int = 0,
                  reverse: bool = False) -> np.ndarray:
    """2.5-D network input, the same in training and in the node: (stop - start, s, s, 2k + 1) float32 for slices
    start..stop, each with its neighbours as channels (context_index). `planes` (m, s, s) holds the preprocessed
    slices first..first + m of the n-slice volume, which must include every neighbour asked for."""
    idx = context_index(n, start, stop, k, reverse) - first
    if idx.size and (idx.min() < 0 or idx.max() >= len(planes)):
        raise ValueError(f"slices {first}..{first + len(planes)} do not hold the neighbours of {start}..{stop}")
    return np.ascontiguousarray(np.moveaxis(planes[idx], 1, -1), dtype=np.float32)


def context_span(n: int, start: int, stop: int, k: int) -> tuple[int, int]:
    """The slices (first, last + 1) that `stack_context` needs for slices start..stop."""
    return max(0, start - k), min(n, stop + k)


def restore_probabilities(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(n, size, size, k) network output -> (n, rows, cols, k) at the original slice shape (undoes pad + resize)."""
    top, bottom, left, right = _square_pad(shape)
    side = shape[0] + top + bottom
    out = np.empty((prob.shape[0], shape[0], shape[1], prob.shape[-1]), np.float32)
    for i, p in enumerate(prob):
        big = cv2.resize(p, (side, side), interpolation=cv2.INTER_LINEAR) if p.shape[0] != side else p
        if big.ndim == 2:  # cv2 drops a trailing axis of length 1
            big = big[..., None]
        out[i] = big[top : top + shape[0], left : left + shape[1]]
    return out


def argmax_last(p: np.ndarray) -> np.ndarray:
    """p.argmax(-1) as uint8 (the first of equal maxima, as numpy), by comparing whole channel planes: numpy's
    argmax over a short last axis costs several times more."""
    return _argmax_planes([p[..., c] for c in range(p.shape[-1])])


def _argmax_planes(planes, values: Sequence[int] | None = None) -> np.ndarray:
    """At each element, the index (uint8) of the largest of equally shaped `planes`, the first of equal maxima;
    or `values[index]` when given (a label map applied in the same pass)."""
    planes = iter(planes)
    best = np.array(next(planes))  # a copy, in the planes' own type: it is overwritten
    idx = np.full(best.shape, 0 if values is None else values[0], np.uint8)
    for c, plane in enumerate(planes, 1):
        np.copyto(idx, c if values is None else values[c], where=plane > best)
        np.maximum(best, plane, out=best)
    return idx


def restore_labels(prob: np.ndarray, shape: tuple[int, int], values: Sequence[int] | None = None) -> np.ndarray:
    """argmax(restore_probabilities(prob, shape)) as uint8 (n, rows, cols), or `values` of it (the model's label
    map), with one class plane resized at a time: OpenCV's bilinear resize treats channels alike, so each plane
    comes out as in the multi-channel resize, and a contiguous single-channel plane resizes and compares several
    times faster than interleaved channels (bench/host_steps.py). Only the crop of the padded square is compared."""
    n, s, _, k = prob.shape
    top, bottom, left, right = _square_pad(shape)
    side, (rows, cols) = shape[0] + top + bottom, shape
    planes = np.ascontiguousarray(np.moveaxis(prob, -1, 1), np.float32)  # (n, k, s, s)
    out = np.empty((n, rows, cols), np.uint8)

    def plane(i: int, c: int) -> np.ndarray:
        p = planes[i, c]
        if s != side:
            p = cv2.resize(p, (side, side), interpolation=cv2.INTER_LINEAR)
        return p[top:top + rows, left:left + cols]

    for i in range(n):
        out[i] = _argmax_planes((plane(i, c) for c in range(k)), values)
    return out
