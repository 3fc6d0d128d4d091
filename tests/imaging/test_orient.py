"""Slices the right way up: every axial storage (mirrored, rotated, transposed, slightly oblique) maps exactly to
the model's convention and back."""

import itertools

import numpy as np
import pytest

from livernode.errors import SeriesRejected
from livernode.imaging.orient import Orientation


def _stored(canonical: np.ndarray, transpose: bool, flip_rows: bool, flip_cols: bool):
    """The canonical slice stored another way, with the ImageOrientationPatient that describes that storage."""
    row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])  # canonical: columns to +x, rows to +y
    a = canonical
    if flip_cols:
        a, row = a[:, ::-1], -row
    if flip_rows:
        a, col = a[::-1, :], -col
    if transpose:
        a, row, col = a.T, col, row
    return np.ascontiguousarray(a), [*row, *col]


@pytest.mark.parametrize("transpose,flip_rows,flip_cols", list(itertools.product([False, True], repeat=3)))
def test_every_axial_storage_maps_to_the_convention_and_back(transpose, flip_rows, flip_cols):
    canonical = np.arange(6 * 9).reshape(6, 9)  # not square, so a wrong transpose cannot pass
    stored, iop = _stored(canonical, transpose, flip_rows, flip_cols)
    turn = Orientation.from_iop(iop)
    assert np.array_equal(turn.forward(stored), canonical)
    assert np.array_equal(turn.inverse(turn.forward(stored)), stored)
    assert turn.shape(stored.shape) == canonical.shape
    assert turn.identity == (not (transpose or flip_rows or flip_cols))
    stack = np.stack([stored, stored + 1])  # works on (slices, rows, cols) too
    assert np.array_equal(turn.forward(stack)[1], canonical + 1)


def test_feet_first_prone_and_oblique_within_tolerance():
    # feet first supine: the slice normal points to the feet, so slices stored along it run head to foot
    assert Orientation.from_iop([-1, 0, 0, 0, 1, 0]) == Orientation(False, False, True, reverse_slices=True)
    assert Orientation.from_iop([-1, 0, 0, 0, -1, 0]) == Orientation(False, True, True)  # head first prone
    assert not Orientation.from_iop([1, 0, 0, 0, 1, 0]).reverse_slices
    assert Orientation.from_iop([1, 0, 0, 0, -1, 0]).reverse_slices  # rows mirrored: normal to the feet
    a = np.radians(6)  # rotated 6 degrees in plane: snapped to the nearest axes
    assert Orientation.from_iop([np.cos(a), np.sin(a), 0, -np.sin(a), np.cos(a), 0]).identity
    assert Orientation.from_iop([1, 0, 0, 0, 1, 0]).spacing((3.0, 0.7, 0.8)) == (3.0, 0.7, 0.8)
    assert Orientation.from_iop([0, 1, 0, 1, 0, 0]).spacing((3.0, 0.7, 0.8)) == (3.0, 0.8, 0.7)


def test_oblique_or_non_axial_slices_are_refused_with_the_angle():
    a = np.radians(30)
    with pytest.raises(SeriesRejected, match=r"30.0 deg from the nearest patient axis"):
        Orientation.from_iop([np.cos(a), np.sin(a), 0, -np.sin(a), np.cos(a), 0])
    with pytest.raises(SeriesRejected, match="not axial"):
        Orientation.from_iop([1, 0, 0, 0, 0, -1])  # coronal


def test_the_manifest_records_the_convention_and_older_models_mean_the_same():
    from livernode.imaging.orient import CONVENTION
    from livernode.inference.manifest import parse_manifest

    older = {"schema": "livernode-model-manifest", "schema_version": 1,
             "input": {"name": "input", "channels": 1, "preferred_size": 64},
             "output": {"name": "output", "classes": 3},
             "preprocessing": {"window": {"low": -100, "high": 400}},  # written before orientation was recorded
             "labels": [{"value": 0, "name": "Background"}],
             "architecture": {"name": "Unet", "backbone": "resnet34", "framework": "tf", "opset": 17,
                              "precision": "float32"},
             "training": {}, "test_metrics": {},
             "parity": {"slices": 1, "max_abs_diff": 0.0, "argmax_agreement": 1.0, "tolerance": 1e-4},
             "livernode_version": "0.1.0", "created": "2026-11-01", "weights_sha256": "0" * 64}
    import json

    manifest = parse_manifest(json.dumps(older), "older.onnx")
    assert manifest.preprocessing.orientation == CONVENTION
    assert json.loads(manifest.to_json())["preprocessing"]["orientation"] == CONVENTION
