"""Post-processing: one liver, tumour kept near it, lesions as 3-D components, each with its longest axis."""

import numpy as np
import pytest

from livernode.imaging.postprocess import postprocess


def _volume():
    lab = np.zeros((10, 40, 40), np.uint8)
    lab[2:8, 5:30, 5:30] = 1  # liver
    lab[4:6, 12:20, 12:20] = 2  # a tumour inside
    lab[4, 25, 25] = 0  # a hole in the liver
    lab[3:5, 36:39, 36:39] = 1  # a small stray blob: not the liver
    lab[6, 1, 1] = 2  # a tumour voxel far from the liver
    lab[5, 27, 27] = 2  # a one-voxel lesion inside the liver, below the minimum volume
    return lab


def test_largest_liver_holes_tumours_and_lesions():
    f = postprocess(_volume(), (2.0, 1.0, 1.0), min_lesion_ml=0.01, liver_margin_mm=2.0)
    assert f.labels[3, 37, 37] == 0  # stray blob removed
    assert f.labels[4, 25, 25] == 1  # hole filled
    assert f.labels[6, 1, 1] == 0  # tumour outside the liver dropped
    assert f.labels[5, 27, 27] == 1  # 0.002 mL lesion dropped, its voxel stays liver
    assert len(f.lesions) == 1
    lesion = f.lesions[0]
    assert lesion.voxels == 2 * 8 * 8
    assert lesion.volume_ml == pytest.approx(128 * 2.0 / 1000)
    assert lesion.longest_axial_diameter_mm == pytest.approx(np.hypot(7, 7))
    k, r0, c0, r1, c1 = lesion.diameter_line  # its ends: on a tumour slice, in the volume's coordinates, 7 x 7 apart
    assert k in (4, 5) and f.labels[k, r0, c0] == f.labels[k, r1, c1] == 2
    assert np.hypot(r1 - r0, c1 - c0) == pytest.approx(lesion.longest_axial_diameter_mm)
    assert f.liver_volume_ml == pytest.approx(6 * 25 * 25 * 2.0 / 1000)
    assert f.tumour_burden_percent == pytest.approx(100 * 128 / (6 * 25 * 25))
    assert not f.liver_touches_scan_edge


def test_liver_on_first_slice_is_flagged_and_empty_volume_is_empty():
    lab = np.zeros((4, 10, 10), np.uint8)
    lab[0:2, 2:8, 2:8] = 1
    assert postprocess(lab, (1, 1, 1)).liver_touches_scan_edge
    empty = postprocess(np.zeros((3, 5, 5), np.uint8), (1, 1, 1))
    assert empty.liver_volume_ml == 0 and empty.lesions == ()


@pytest.mark.parametrize("spacing", [(2.0, 0.7, 0.7), (1.0, 1.0, 1.0), (2.5, 0.8, 0.6)])
def test_liver_margin_matches_a_3d_distance_transform(spacing):
    """`_near` (per-slice distance maps for square pixels, slabs otherwise) equals scipy's 3-D Euclidean distance
    transform exactly, ties at the margin included."""
    from scipy import ndimage

    from livernode.imaging.postprocess import _near

    rng = np.random.default_rng(7)
    for margin in (1.0, 2.0, 5.0, 7.3):
        mask = ndimage.binary_dilation(rng.random((24, 40, 36)) < 0.004, iterations=2)
        want = ndimage.distance_transform_edt(~mask, sampling=spacing) <= margin
        got = _near(mask, spacing, margin)
        assert mask.any() and 0 < want.sum() < want.size
        assert np.array_equal(got, want), (margin, int((got != want).sum()))


def test_hole_filling_matches_scipy():
    """The flood-fill hole filling equals scipy's binary_fill_holes (4-connected background) on random masks."""
    from scipy import ndimage

    from livernode.imaging.postprocess import fill_holes_2d

    rng = np.random.default_rng(3)
    holes = 0
    for _ in range(100):
        m = rng.random((int(rng.integers(3, 50)), int(rng.integers(3, 50)))) < rng.uniform(0.3, 0.8)
        want = ndimage.binary_fill_holes(m)
        holes += int((want & ~m).sum())
        assert np.array_equal(fill_holes_2d(m), want)
    assert holes > 100  # the masks did have holes to fill
