import subprocess
import sys

import numpy as np
import pytest

from livernode.daemon.postprocess import postprocess


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
    assert f.liver_volume_ml == pytest.approx(6 * 25 * 25 * 2.0 / 1000)
    assert f.tumour_burden_percent == pytest.approx(100 * 128 / (6 * 25 * 25))
    assert not f.liver_touches_scan_edge


def test_liver_on_first_slice_is_flagged_and_empty_volume_is_empty():
    lab = np.zeros((4, 10, 10), np.uint8)
    lab[0:2, 2:8, 2:8] = 1
    assert postprocess(lab, (1, 1, 1)).liver_touches_scan_edge
    empty = postprocess(np.zeros((3, 5, 5), np.uint8), (1, 1, 1))
    assert empty.liver_volume_ml == 0 and empty.lesions == ()


def test_daemon_does_not_import_tensorflow():
    code = ("import sys, livernode.daemon.postprocess, livernode.inference.runner; "
            "bad = [m for m in ('tensorflow', 'tf_keras', 'segmentation_models', 'livernode.training', "
            "'livernode.export') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
