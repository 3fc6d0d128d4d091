"""Fixed-spacing grid: shape arithmetic, resampling both ways, window placement and Gaussian-blended inference."""

from __future__ import annotations

import math
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from livernode.imaging.grid import (
    Grid,
    from_grid,
    gaussian_weights,
    sliding_window,
    to_grid,
    window_starts,
)


def reader(volume: np.ndarray, calls: list[tuple[int, int]] | None = None):
    """read(start, stop) over an in-memory volume, optionally recording each request."""

    def read(start: int, stop: int) -> np.ndarray:
        if calls is not None:
            calls.append((start, stop))
        return volume[start:stop]

    return read


def centres(count: int, spacing: float) -> np.ndarray:
    return (np.arange(count) + 0.5) * spacing


def blob(shape: tuple[int, int, int], spacing: tuple[float, float, float], sigma_mm: float) -> np.ndarray:
    """A Gaussian centred in the volume, sampled at voxel centres in mm."""
    axes = [centres(n, s) for n, s in zip(shape, spacing, strict=True)]
    mid = [n * s / 2 for n, s in zip(shape, spacing, strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    r2 = (z - mid[0]) ** 2 + (y - mid[1]) ** 2 + (x - mid[2]) ** 2
    return np.exp(-r2 / (2 * sigma_mm**2)).astype(np.float32)


# --- Grid -------------------------------------------------------------------------------------------------------


def test_grid_shape_rounds_extent_over_target_spacing():
    assert Grid((100, 512, 512), (1.0, 0.7, 0.7), (2.5, 1.4, 1.4)).shape == (40, 256, 256)
    # 10*3/2 = 15, 10*1/3 = 3.33 -> 3, 11*1/0.5 = 22
    assert Grid((10, 10, 11), (3.0, 1.0, 1.0), (2.0, 3.0, 0.5)).shape == (15, 3, 22)
    # 6.67 rounds up to 7 (not truncated to 6)
    assert Grid((7, 10, 10), (1.0, 1.0, 1.0), (1.0, 1.5, 1.5)).shape == (7, 7, 7)
    # 0.2 and 0.4 round to 0, which becomes 1
    assert Grid((1, 4, 4), (1.0, 1.0, 1.0), (5.0, 10.0, 10.0)).shape == (1, 1, 1)


def test_grid_normalises_sequences_and_numpy_scalars():
    g = Grid([np.int64(20), 30, 40], np.array([2.0, 1.0, 1.0]), (2, 1, 1))
    assert g.source_shape == (20, 30, 40) and type(g.source_shape[0]) is int
    assert g.source_spacing == (2.0, 1.0, 1.0) and type(g.source_spacing[0]) is float
    assert g.target_spacing == (2.0, 1.0, 1.0) and type(g.target_spacing[0]) is float
    assert g.shape == (20, 30, 40)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"source_shape": (0, 10, 10)}, "source_shape"),
        ({"source_shape": (10, -3, 10)}, "-3"),
        ({"source_shape": (10.5, 10, 10)}, "10.5"),
        ({"source_shape": (True, 10, 10)}, "True"),
        ({"source_shape": (10, 10)}, "three values"),
        ({"source_shape": 10}, "three values"),
        ({"source_spacing": (1.0, 0.0, 1.0)}, "source_spacing"),
        ({"source_spacing": (1.0, -0.5, 1.0)}, "-0.5"),
        ({"source_spacing": (float("nan"), 1.0, 1.0)}, "nan"),
        ({"target_spacing": (1.0, 1.0, float("inf"))}, "inf"),
        ({"target_spacing": (1.0, 1.0, 0)}, "target_spacing"),
        ({"target_spacing": ("1", 1.0, 1.0)}, "'1'"),
    ],
)
def test_grid_rejects_invalid_values_and_names_them(kwargs, named):
    valid = {"source_shape": (10, 10, 10), "source_spacing": (1.0, 1.0, 1.0), "target_spacing": (1.0, 1.0, 1.0)}
    args = valid | kwargs
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        Grid(**args)


# --- window_starts and gaussian_weights -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "patch", "overlap", "expected"),
    [
        (100, 32, 0.5, [0, 16, 32, 48, 64, 68]),
        (100, 32, 0.0, [0, 32, 64, 68]),
        (96, 32, 0.0, [0, 32, 64]),
        (32, 32, 0.5, [0]),
        (33, 32, 0.5, [0, 1]),
        (50, 16, 0.99, list(range(35))),  # step rounds to 0 and is raised to 1
    ],
)
def test_window_starts_examples(size, patch, overlap, expected):
    assert window_starts(size, patch, overlap) == expected


def test_window_starts_cover_every_axis_exactly_to_its_end():
    checked = 0
    for size, patch, overlap in product(range(1, 90), (1, 2, 5, 16, 32, 33), (0.0, 0.25, 0.5, 0.6, 0.9)):
        if size < patch:
            continue
        starts = window_starts(size, patch, overlap)
        assert starts, (size, patch, overlap)
        assert starts == sorted(set(starts))
        assert starts[0] == 0 and starts[-1] == size - patch
        covered = np.zeros(size, dtype=bool)
        for s in starts:
            covered[s : s + patch] = True
        assert covered.all(), (size, patch, overlap)
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize(("size", "patch", "overlap"), [(31, 32, 0.5), (0, 0, 0.5), (64, 32, 1.0), (64, 32, -0.1)])
def test_window_starts_rejects_bad_arguments(size, patch, overlap):
    with pytest.raises(ValueError):
        window_starts(size, patch, overlap)


def test_gaussian_weights_peak_at_centre_with_positive_floor():
    w = gaussian_weights((16, 32, 24))
    assert w.shape == (16, 32, 24) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0)
    assert np.unravel_index(w.argmax(), w.shape) == (7, 15, 11)  # the lower of the two central voxels
    assert w.min() == pytest.approx(1e-3) and (w > 0).all()
    # symmetric about the centre on every axis
    assert np.array_equal(w, w[::-1, ::-1, ::-1])
    # sigma = patch / 8: one sigma from the centre along x (3 voxels) the weight is exp(-1/2) of the peak
    odd = gaussian_weights((1, 1, 25))
    assert odd[0, 0, 12] == pytest.approx(1.0)
    assert odd[0, 0, 12 + 3] / odd[0, 0, 12] == pytest.approx(math.exp(-0.5 * (3 / (25 / 8)) ** 2), rel=1e-5)


def test_gaussian_weights_reject_bad_arguments():
    with pytest.raises(ValueError, match="patch"):
        gaussian_weights((0, 32, 32))
    with pytest.raises(ValueError, match="sigma_scale"):
        gaussian_weights((16, 16, 16), sigma_scale=0.0)


# --- sliding_window ---------------------------------------------------------------------------------------------

CONSTANT = np.array([0.2, 0.3, 0.5], dtype=np.float32)


def constant_net(x: np.ndarray) -> np.ndarray:
    assert x.dtype == np.float32 and x.ndim == 5 and x.shape[4] == 1
    return np.broadcast_to(CONSTANT, (*x.shape[:4], 3)).copy()


@pytest.mark.parametrize(
    "shape",
    [
        (37, 50, 71),  # no axis a multiple of the patch
        (37, 20, 71),  # H shorter than the patch
        (10, 20, 5),  # every axis shorter than the patch: one padded patch
        (16, 32, 32),  # exactly one patch
    ],
)
def test_sliding_window_constant_network_gives_the_constant_everywhere(shape):
    rng = np.random.default_rng(0)
    volume = rng.random(shape, dtype=np.float32)
    out = sliding_window(volume, (16, 32, 32), 0.5, constant_net, batch=3)
    assert out.shape == (*shape, 3) and out.dtype == np.float32
    assert out.flags.c_contiguous
    assert np.allclose(out, CONSTANT, atol=1e-6)


def test_sliding_window_pads_short_axes_at_their_end_with_pad_value():
    seen: list[np.ndarray] = []

    def net(x: np.ndarray) -> np.ndarray:
        seen.append(x.copy())
        return np.ones((*x.shape[:4], 1), dtype=np.float32)

    volume = np.full((20, 10, 40), 7.0, dtype=np.float32)
    sliding_window(volume, (16, 16, 16), 0.0, net, pad_value=-1000.0)
    assert seen
    for x in seen:
        assert x.shape[1:] == (16, 16, 16, 1)
        assert (x[:, :, :10] == 7.0).all()  # the volume's 10 rows first
        assert (x[:, :, 10:] == -1000.0).all()  # then 6 rows of padding


@pytest.mark.parametrize(
    ("shape", "batch"), [((37, 50, 71), 1), ((37, 50, 71), 4), ((9, 50, 33), 5), ((40, 64, 64), 64)]
)
def test_sliding_window_visits_every_window_once_in_batches(shape, batch):
    patch, overlap = (16, 32, 32), 0.5
    padded = [max(s, p) for s, p in zip(shape, patch, strict=True)]
    expected_total = math.prod(len(window_starts(s, p, overlap)) for s, p in zip(padded, patch, strict=True))
    batch_sizes: list[int] = []
    progress: list[tuple[int, int]] = []

    def net(x: np.ndarray) -> np.ndarray:
        batch_sizes.append(x.shape[0])
        y = np.zeros((*x.shape[:4], 2), dtype=np.float32)
        y[..., 0] = 1.0
        return y

    def on_patch(done: int, total: int) -> None:
        progress.append((done, total))

    out = sliding_window(np.zeros(shape, np.float32), patch, overlap, net, batch=batch, on_patch=on_patch)

    calls = math.ceil(expected_total / batch)
    assert len(batch_sizes) == len(progress) == calls
    assert batch_sizes == [batch] * (calls - 1) + [expected_total - batch * (calls - 1)]
    assert progress == [(min((i + 1) * batch, expected_total), expected_total) for i in range(calls)]
    assert np.allclose(out[..., 0], 1.0, atol=1e-6) and np.allclose(out[..., 1], 0.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(37, 50, 71), (12, 50, 20)])
def test_sliding_window_identity_network_reproduces_the_volume(shape):
    rng = np.random.default_rng(1)
    volume = rng.normal(size=shape).astype(np.float32)
    out = sliding_window(volume, (16, 32, 32), 0.5, lambda x: x, batch=2)
    assert out.shape == (*shape, 1)
    assert np.allclose(out[..., 0], volume, rtol=1e-5, atol=1e-6)
    assert np.abs(out[..., 0]).max() > 1.0  # really the volume, not zeros


def test_sliding_window_blends_by_gaussian_weight():
    # Two windows along x overlapping by half; the network returns the window's start as its output. Where both
    # reach, the result is their Gaussian-weighted mean.
    volume = np.zeros((4, 4, 24), np.float32)
    starts = iter([0.0, 8.0])

    def net(x: np.ndarray) -> np.ndarray:
        return np.full((*x.shape[:4], 1), next(starts), np.float32)

    out = sliding_window(volume, (4, 4, 16), 0.5, net)[..., 0]
    w = gaussian_weights((4, 4, 16))[0, 0]
    assert np.allclose(out[:, :, :8], 0.0) and np.allclose(out[:, :, 16:], 8.0)
    expected = 8.0 * w[:8] / (w[8:] + w[:8])  # voxel 8 + i is voxel 8 + i of window 0 and voxel i of window 1
    assert np.allclose(out[0, 0, 8:16], expected, atol=1e-5)
    assert 0.0 < out[0, 0, 12] < 8.0


def test_sliding_window_rejects_a_network_with_the_wrong_output_shape():
    with pytest.raises(ValueError, match="run returned shape"):
        sliding_window(np.zeros((16, 16, 16), np.float32), (16, 16, 16), 0.5, lambda x: x[:, :8])
    with pytest.raises(ValueError, match="volume"):
        sliding_window(np.zeros((16, 16), np.float32), (16, 16, 16), 0.5, lambda x: x)


# --- to_grid ----------------------------------------------------------------------------------------------------


def test_to_grid_z_is_linear_on_the_centre_aligned_coordinate():
    n, s, t = 23, 1.25, 3.0
    volume = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None, None], (n, 6, 5))  # value = source z index
    out = to_grid(reader(volume), Grid((n, 6, 5), (s, 1.0, 1.0), (t, 1.0, 1.0)), slab=3)
    depth = round(n * s / t)
    assert out.shape == (depth, 6, 5) and out.dtype == np.float32
    expected = np.clip((np.arange(depth) + 0.5) * t / s - 0.5, 0, n - 1)
    assert np.allclose(out, expected[:, None, None], atol=1e-5)


def test_to_grid_in_plane_follows_cv2_centre_alignment_when_enlarging():
    # A ramp along x enlarged 2.5x: linear interpolation of a linear function is exact inside the first and last
    # half voxel, which clip to the edge values.
    w_in, w_out = 10, 25
    volume = np.broadcast_to(np.arange(w_in, dtype=np.float32), (2, 3, w_in))
    out = to_grid(reader(volume), Grid((2, 3, w_in), (1.0, 1.0, 2.5), (1.0, 1.0, 1.0)))
    assert out.shape == (2, 3, w_out)
    expected = np.clip((np.arange(w_out) + 0.5) * w_in / w_out - 0.5, 0, w_in - 1)
    assert np.allclose(out[1, 2], expected, atol=1e-5)


def test_to_grid_shrinks_by_area_and_grows_linearly_on_different_axes():
    # y shrinks 3x (area: mean of row triples; linear would take the middle row), x grows 2x (linear); each checked
    # on a volume that varies along it.
    rng = np.random.default_rng(2)
    rows = rng.random(12).astype(np.float32)
    grid = Grid((3, 12, 8), (1.0, 1 / 3, 2.0), (1.0, 1.0, 1.0))
    assert grid.shape == (3, 4, 16)
    by_row = to_grid(reader(np.broadcast_to(rows[None, :, None], (3, 12, 8))), grid)
    assert np.allclose(by_row, rows.reshape(4, 3).mean(axis=1)[None, :, None], atol=1e-6)
    cols = np.arange(8, dtype=np.float32) ** 2
    by_col = to_grid(reader(np.broadcast_to(cols[None, None, :], (3, 12, 8))), grid)
    x = np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, 7)
    assert np.allclose(by_col, np.interp(x, np.arange(8), cols)[None, None, :], atol=1e-4)


def test_to_grid_shrinking_both_in_plane_axes_averages_areas():
    rng = np.random.default_rng(7)
    plane = rng.random((12, 18)).astype(np.float32)
    grid = Grid((2, 12, 18), (1.0, 1.0, 1.0), (1.0, 3.0, 2.0))
    assert grid.shape == (2, 4, 9)
    out = to_grid(reader(np.broadcast_to(plane, (2, 12, 18))), grid)
    assert np.allclose(out[1], plane.reshape(4, 3, 9, 2).mean(axis=(1, 3)), atol=1e-6)


def test_to_grid_of_a_blob_matches_the_blob_sampled_on_the_target_grid():
    shape, spacing, target = (60, 96, 80), (1.0, 0.8, 0.8), (2.0, 1.6, 1.6)
    volume = blob(shape, spacing, sigma_mm=12.0)
    grid = Grid(shape, spacing, target)
    out = to_grid(reader(volume), grid)
    expected = blob(grid.shape, target, sigma_mm=12.0)  # both volumes span the same 60 x 76.8 x 64 mm
    assert out.shape == (30, 48, 40)
    assert out.max() > 0.95
    # measured: mean 1.0e-4, max 2.0e-3
    assert np.abs(out - expected).mean() < 5e-4
    assert np.abs(out - expected).max() < 5e-3


def test_to_grid_reads_the_source_in_slabs():
    n = 100
    volume = np.random.default_rng(3).random((n, 20, 20)).astype(np.float32)
    grid = Grid((n, 20, 20), (1.0, 1.0, 1.0), (2.5, 2.0, 2.0))
    calls: list[tuple[int, int]] = []
    out = to_grid(reader(volume, calls), grid, slab=8)
    assert out.shape == (40, 10, 10)
    assert len(calls) == math.ceil(40 / 8)
    # 8 target planes at 2.5 source planes each reach at most 8 * 2.5 + 2 source planes
    assert all(0 < stop - start <= 22 for start, stop in calls)
    assert calls[0][0] == 0 and calls[-1][1] == n
    assert [start for start, _ in calls] == sorted(start for start, _ in calls)
    # the slab size changes what is read, never the result
    whole = to_grid(reader(volume), grid, slab=1000)
    assert np.array_equal(out, whole)


def test_to_grid_labels_are_nearest_and_uint8():
    rng = np.random.default_rng(4)
    n, h, w = 40, 30, 26
    labels = rng.integers(0, 3, size=(n, h, w)).astype(np.uint8)
    grid = Grid((n, h, w), (2.0, 1.0, 1.0), (3.0, 1.3, 0.8))
    calls: list[tuple[int, int]] = []
    out = to_grid(reader(labels, calls), grid, labels=True, slab=5)
    depth, height, width = grid.shape
    assert out.shape == (depth, height, width) and out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 1, 2}
    assert len(calls) == math.ceil(depth / 5) and all(stop - start <= 9 for start, stop in calls)
    # the voxel whose extent holds the target voxel's centre
    iz = np.minimum(np.floor((np.arange(depth) + 0.5) * 3.0 / 2.0).astype(int), n - 1)
    iy = np.minimum(np.floor((np.arange(height) + 0.5) * h / height).astype(int), h - 1)
    ix = np.minimum(np.floor((np.arange(width) + 0.5) * w / width).astype(int), w - 1)
    assert np.array_equal(out, labels[np.ix_(iz, iy, ix)])


def test_to_grid_labels_take_exact_ties_the_way_the_convention_says():
    # 30 -> 13 columns: target column 6 has its centre exactly on the border of source columns 14 and 15; the
    # convention picks 15 (cv2.INTER_NEAREST_EXACT would pick 14).
    labels = np.broadcast_to(np.arange(30, dtype=np.uint8), (1, 2, 30))
    out = to_grid(reader(labels), Grid((1, 2, 30), (1.0, 1.0, 1.0), (1.0, 1.0, 30 / 13)), labels=True)
    assert out.shape == (1, 2, 13)
    assert out[0, 0, 6] == 15


def test_to_grid_labels_accept_wider_integers_and_refuse_floats():
    grid = Grid((4, 4, 4), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))
    wide = np.full((4, 4, 4), 2, dtype=np.int16)
    out = to_grid(reader(wide), grid, labels=True)
    assert out.dtype == np.uint8 and (out == 2).all()
    with pytest.raises(ValueError, match="integers"):
        to_grid(reader(wide.astype(np.float32)), grid, labels=True)
    with pytest.raises(ValueError, match="0..255"):
        to_grid(reader(wide * 200), grid, labels=True)


def test_to_grid_rejects_a_reader_that_returns_the_wrong_shape():
    grid = Grid((10, 8, 8), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"read\(0, "):
        to_grid(lambda start, stop: np.zeros((stop - start, 8, 7), np.float32), grid)


# --- from_grid --------------------------------------------------------------------------------------------------


def test_round_trip_of_a_smooth_volume_through_a_coarser_grid():
    shape, spacing = (60, 96, 80), (1.0, 0.8, 0.8)
    volume = blob(shape, spacing, sigma_mm=12.0)
    grid = Grid(shape, spacing, (2.0, 1.6, 1.6))
    coarse = to_grid(reader(volume), grid)
    back = np.concatenate([c for _, c in from_grid(coarse[..., None], grid)])
    assert back.shape == (*shape, 1) and back.dtype == np.float32
    err = np.abs(back[..., 0] - volume)
    # measured: mean 4.6e-4, max 7.9e-3 on a blob of peak 1.0
    assert err.mean() < 1e-3
    assert err.max() < 2e-2
    assert back.max() > 0.95


def test_from_grid_chunks_cover_every_source_plane_once_in_order():
    grid = Grid((37, 12, 10), (1.0, 1.0, 1.0), (2.5, 2.0, 2.0))
    prob = np.random.default_rng(5).random((*grid.shape, 2)).astype(np.float32)
    chunks = list(from_grid(prob, grid, chunk=8))
    assert [start for start, _ in chunks] == [0, 8, 16, 24, 32]
    assert [c.shape for _, c in chunks] == [(8, 12, 10, 2)] * 4 + [(5, 12, 10, 2)]
    planes = np.concatenate([np.arange(start, start + len(c)) for start, c in chunks])
    assert np.array_equal(planes, np.arange(37))
    assert all(c.dtype == np.float32 for _, c in chunks)
    # chunking changes memory, never values; a chunk the caller kept is not overwritten by the next one
    whole = next(from_grid(prob, grid, chunk=1000))[1]
    assert np.array_equal(np.concatenate([c for _, c in chunks]), whole)


def test_from_grid_z_is_linear_on_the_inverse_coordinate():
    grid = Grid((23, 4, 4), (1.25, 1.0, 1.0), (3.0, 1.0, 1.0))
    depth = grid.shape[0]
    prob = np.broadcast_to(np.arange(depth, dtype=np.float32)[:, None, None, None], (depth, 4, 4, 1))
    out = np.concatenate([c for _, c in from_grid(prob, grid, chunk=4)])
    expected = np.clip((np.arange(23) + 0.5) * 1.25 / 3.0 - 0.5, 0, depth - 1)
    assert np.allclose(out[..., 0], expected[:, None, None], atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 4, 5, 9])
def test_from_grid_resizes_every_channel_alike(k):
    # channel c is (c + 1) times channel 0, whatever the number of cv2 calls the channels are split into
    grid = Grid((20, 30, 26), (1.0, 0.7, 0.7), (2.0, 1.5, 1.5))
    base = np.random.default_rng(6).random(grid.shape).astype(np.float32)
    prob = base[..., None] * np.arange(1, k + 1, dtype=np.float32)
    out = np.concatenate([c for _, c in from_grid(prob, grid, chunk=7)])
    assert out.shape == (20, 30, 26, k)
    assert out[..., 0].std() > 0.01
    for c in range(k):
        assert np.allclose(out[..., c], out[..., 0] * (c + 1), rtol=1e-5, atol=1e-6)


def test_from_grid_rejects_probabilities_of_another_shape():
    grid = Grid((20, 30, 26), (1.0, 0.7, 0.7), (2.0, 1.5, 1.5))
    with pytest.raises(ValueError, match="expected"):
        next(from_grid(np.zeros((*grid.shape,), np.float32), grid))
    with pytest.raises(ValueError, match="expected"):
        next(from_grid(np.zeros((10, 14, 13, 2), np.float32), grid))


def test_grid_module_imports_no_network_runtime():
    code = (
        "import sys, livernode.imaging.grid; "
        "bad = [m for m in ('tensorflow', 'keras', 'onnxruntime', 'torch') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=repo, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
