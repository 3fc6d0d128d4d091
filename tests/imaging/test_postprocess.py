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


@pytest.mark.parametrize("spacing", [(2.0, 0.7, 0.7), (1.0, 1.0, 1.0), (2.5, 0.8, 0.6)])
def test_liver_margin_at_stray_voxels_matches_a_3d_distance_transform(spacing):
    """`_near_at` (the margin looked up around a few query voxels only) equals scipy's 3-D Euclidean distance
    transform at the query voxels, ties at the margin included, for queries at the volume's edges too, and by the
    slice maps when the look-ups exceed its budget."""
    from scipy import ndimage

    from livernode.imaging.postprocess import _near_at

    rng = np.random.default_rng(11)
    far = 0
    for margin in (1.0, 2.0, 5.0, 7.3):
        mask = ndimage.binary_dilation(rng.random((24, 40, 36)) < 0.004, iterations=2)
        query = (rng.random(mask.shape) < 0.02) & ~mask
        query[0, 0, 0] = query[-1, -1, -1] = True
        want = query & (ndimage.distance_transform_edt(~mask, sampling=spacing) <= margin)
        assert want.any()
        far += int((query & ~want).sum())
        for budget in (20_000_000, 0):
            got = _near_at(mask, query, spacing, margin, budget=budget)
            assert np.array_equal(got, want), (margin, budget, int((got != want).sum()))
    assert far > 100  # query voxels beyond the margin were there to refuse


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


def _reference(labels, spacing, min_lesion_ml, liver_margin_mm):
    """Post-processing as it was written first, with scipy's labelling and one pass per component: what the
    faster `postprocess` must equal."""
    from scipy import ndimage

    from livernode.imaging.postprocess import _near, fill_holes_2d

    full = np.ones((3, 3, 3), bool)
    comp, n = ndimage.label(labels > 0, full)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    sizes[0] = 0
    liver = comp == sizes.argmax()
    for k in range(len(liver)):
        liver[k] = fill_holes_2d(liver[k]) if liver[k].any() else liver[k]
    tumour = (labels == 2) & _near(liver, spacing, liver_margin_mm)
    out = liver.astype(np.uint8)
    tcomp, tn = ndimage.label(tumour, full)
    voxel_ml = float(np.prod(spacing)) / 1000
    lesions = []
    for i, sl in enumerate(ndimage.find_objects(tcomp), start=1):
        vox = int((tcomp == i).sum())
        if vox * voxel_ml >= min_lesion_ml:
            out[tcomp == i] = 2
            lesions.append((vox, tuple(x for s in sl for x in (s.start,)) + tuple(s.stop for s in sl)))
    return out, lesions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_postprocess_equals_the_scipy_reference_on_a_noisy_output(seed):
    """Labels as a noisy network gives them (an organ, stray blobs, hundreds of tumour specks in and out of it):
    the same cleaned labels, lesions in the same order with the same voxels and boxes, as scipy's labelling."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (30, 96, 80)
    lab = np.zeros(shape, np.uint8)
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    lab[((zz - 15) / 12) ** 2 + ((yy - 48) / 35) ** 2 + ((xx - 40) / 30) ** 2 < 1] = 1
    lab[ndimage.binary_dilation(rng.random(shape) < 0.002, iterations=1)] = 1  # stray blobs
    lab[ndimage.binary_dilation(rng.random(shape) < 0.001, iterations=rng.integers(1, 3))] = 2  # tumour specks
    spacing = (2.5, 0.8, 0.8)
    want, want_lesions = _reference(lab, spacing, 0.01, 5.0)
    got = postprocess(lab, spacing, min_lesion_ml=0.01, liver_margin_mm=5.0)
    assert len(want_lesions) >= 10 and (want == 1).sum() > 10000
    assert np.array_equal(got.labels, want), int((got.labels != want).sum())
    assert [(le.voxels, le.bbox) for le in got.lesions] == want_lesions
    assert [le.index for le in got.lesions] == list(range(1, len(want_lesions) + 1))
    voxel_ml = float(np.prod(spacing)) / 1000
    assert got.liver_volume_ml == pytest.approx((want > 0).sum() * voxel_ml)
    assert got.tumour_volume_ml == pytest.approx((want == 2).sum() * voxel_ml)
    # written into the network's labels (as the node asks): the same findings, held in that very array
    into = lab.copy()
    again = postprocess(into, spacing, min_lesion_ml=0.01, liver_margin_mm=5.0, overwrite=True)
    assert again.labels is into and np.array_equal(into, want)
    assert again.lesions == got.lesions and again.liver_volume_ml == got.liver_volume_ml
    shared = lab.copy()
    shared.flags.writeable = False  # as Ray hands an array over: a new volume instead
    assert np.array_equal(postprocess(shared, spacing, min_lesion_ml=0.01, overwrite=True).labels, want)
    assert np.array_equal(shared, lab)


def test_the_liver_among_equally_large_components_is_the_first_in_scan_order():
    lab = np.zeros((6, 20, 20), np.uint8)
    lab[3:5, 2:6, 2:6] = 1  # met first in C order (slice 3 before slice 4)...
    lab[4:6, 10:14, 10:14] = 1  # ... and this one, as large, is met later
    f = postprocess(lab, (1.0, 1.0, 1.0))
    assert f.labels[3, 3, 3] == 1 and not f.labels[4:6, 10:14, 10:14].any()


def test_bounding_box_equals_the_extent_of_the_labelled_voxels():
    """`_box` (one pass: the slices that hold a label, then one projected plane) equals the least and greatest
    index of the non-zero voxels along each axis, for labels and masks, and is None for an empty volume."""
    from livernode.imaging.postprocess import _box

    rng = np.random.default_rng(3)
    boxes = 0
    for _ in range(300):
        lab = np.zeros(tuple(rng.integers(1, 9, 3)), np.uint8)
        for _ in range(int(rng.integers(0, 4))):
            lab[tuple(int(rng.integers(0, s)) for s in lab.shape)] = rng.integers(1, 3)
        at = np.argwhere(lab)
        want = None if not len(at) else tuple(slice(int(a), int(b) + 1) for a, b in zip(at.min(0), at.max(0)))
        assert _box(lab) == want and _box(lab > 0) == want
        boxes += want is not None
    assert boxes > 200
    assert _box(np.zeros((0, 4, 4), np.uint8)) is None
    signed = np.zeros((2, 2, 2), np.int8)
    signed[0, 0, 1], signed[1, 0, 0] = -1, 1
    assert _box(signed) == (slice(0, 2), slice(0, 1), slice(0, 2))  # a negative label is a label too
