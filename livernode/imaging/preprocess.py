"""raw -> HU -> window -> [0,1] -> (optional bilateral) -> square, multiple of 32 -> 1 or 3 channels.

The training loaders and the daemon both call these functions, so a slice gives the same array in both halves.
"""

from __future__ import annotations

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


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR along one axis from `src` to `dst` samples: for each output sample its two source
    samples and the weight of the second (as cv2.resize computes them in float, edges clamped)."""
    f = ((np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    first = np.floor(f).astype(np.intp)
    f -= first.astype(np.float32)
    below, beyond = first < 0, first >= src - 1
    f[below], first[below] = 0, 0
    f[beyond], first[beyond] = 0, src - 1
    return first, np.minimum(first + 1, src - 1), f


def argmax_last(p: np.ndarray) -> np.ndarray:
    """p.argmax(-1) as uint8 (the first of equal maxima, as numpy), by comparing whole channel planes: numpy's
    argmax over a short last axis costs several times more."""
    idx = np.zeros(p.shape[:-1], np.uint8)
    best = p[..., 0].copy()
    for c in range(1, p.shape[-1]):
        better = p[..., c] > best
        idx[better] = c
        np.maximum(best, p[..., c], out=best)
    return idx


def restore_labels(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """argmax(restore_probabilities(prob, shape)) as uint8 (n, rows, cols), without resizing every channel.

    Bilinear interpolation mixes the four network pixels around an output pixel with weights that are >= 0 and sum
    to 1; where those four share one argmax, the mixture has that argmax too. So the argmax is taken at the
    network's resolution, spread to the output by the interpolation's own source indices, and interpolated only
    where the four neighbours disagree (the organ boundaries, a few per cent of the pixels). Equal to the full path
    up to float rounding at exact ties."""
    n, s, _, k = prob.shape
    top, bottom, left, right = _square_pad(shape)
    side = shape[0] + top + bottom
    low = argmax_last(prob)
    if s == side:
        return np.ascontiguousarray(low[:, top:top + shape[0], left:left + shape[1]])
    rows, cols = shape
    y0, y1, wy = (a[top:top + rows] for a in _linear_taps(s, side))
    x0, x1, wx = (a[left:left + cols] for a in _linear_taps(s, side))
    one = np.ones(low.shape, bool)  # the 2x2 block from (r, c) holds one label (an edge block only its own)
    one[:, :-1] &= low[:, :-1] == low[:, 1:]
    one[:, :, :-1] &= low[:, :, :-1] == low[:, :, 1:]
    one[:, :-1, :-1] &= low[:, :-1, :-1] == low[:, 1:, 1:]
    out = low.take(y0, axis=1).take(x0, axis=2)
    mixed = np.flatnonzero(~one.take(y0, axis=1).take(x0, axis=2))
    if len(mixed):
        i, rest = np.divmod(mixed, rows * cols)
        y, x = np.divmod(rest, cols)
        flat, base = prob.reshape(-1, k), i * (s * s)
        r0, r1, c0, c1 = base + y0[y] * s, base + y1[y] * s, x0[x], x1[x]
        fx, fy = wx[x][:, None], wy[y][:, None]
        top_row = flat.take(r0 + c0, axis=0) * (1 - fx) + flat.take(r0 + c1, axis=0) * fx
        low_row = flat.take(r1 + c0, axis=0) * (1 - fx) + flat.take(r1 + c1, axis=0) * fx
        out.reshape(-1)[mixed] = argmax_last(top_row * (1 - fy) + low_row * fy)
    return out
