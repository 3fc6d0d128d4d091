"""Known answers: the CHAOS organisers' evaluation of the sample segmentation, and hand-made volumes."""

import math

import cv2
import numpy as np
import pytest

from livernode.imaging import metrics as M


def _pngs(folder, pattern):
    files = sorted(folder.glob(pattern))
    return np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) > 0 for f in files])


def test_chaos_sample_known_answer(chaos_sample):
    ref = _pngs(chaos_sample / "Ground", "liver_GT_*.png")
    seg = _pngs(chaos_sample / "Segmentation", "results*.png")
    assert ref.shape == seg.shape == (78, 512, 512)
    o = M.overlap(seg, ref)
    assert o.dice == pytest.approx(0.97843, abs=5e-5)
    assert 100 * o.rvd == pytest.approx(-0.6645, abs=5e-4)
    # slice step 2 mm (from ImagePositionPatient), pixels 0.7265625 mm
    s = M.surface(seg, ref, (2.0, 0.7265625, 0.7265625))
    assert s.assd == pytest.approx(0.734, abs=0.03)
    assert s.msd == pytest.approx(14.0, abs=0.6)
    assert s.assd < s.hd95 <= s.msd


def test_surface_distance_of_shifted_cube_is_the_shift():
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 2, axis=2)
    s = M.surface(a, b, (1.0, 1.0, 3.0))
    assert s.msd == pytest.approx(6.0)  # 2 voxels of 3 mm


def test_empty_mask_rules():
    z = np.zeros((4, 4, 4), bool)
    one = z.copy()
    one[1, 1, 1] = True
    both = M.overlap(z, z)
    assert (both.dice, both.iou, both.voe, both.rvd) == (1.0, 1.0, 0.0, 0.0)
    assert M.surface(z, z, (1, 1, 1)) == M.SurfaceMetrics(0.0, 0.0, 0.0)
    missed = M.overlap(z, one)  # prediction empty
    assert (missed.dice, missed.iou, missed.voe, missed.rvd) == (0.0, 0.0, 1.0, -1.0)
    spurious = M.overlap(one, z)  # reference empty
    assert spurious.dice == 0.0 and math.isnan(spurious.rvd)
    assert all(math.isnan(v) for v in vars(M.surface(one, z, (1, 1, 1))).values())
    assert M.nanmean([1.0, float("nan"), 0.0]) == 0.5


def test_lesion_detection_uses_iou_above_half():
    ref = np.zeros((10, 30, 30), bool)
    ref[2:6, 2:8, 2:8] = True  # lesion A
    ref[2:6, 20:26, 20:26] = True  # lesion B
    pred = np.zeros_like(ref)
    pred[2:6, 2:8, 2:8] = True  # A exactly
    pred[2:6, 20:23, 20:26] = True  # half of B: IoU 0.5, not > 0.5
    pred[8:9, 10:12, 10:12] = True  # a false positive
    d = M.lesion_detection(pred, ref)
    assert (d.reference_lesions, d.predicted_lesions, d.true_positives, d.matched_predictions) == (2, 3, 1, 1)
    assert d.recall == 0.5 and d.precision == pytest.approx(1 / 3)


def test_confusion_and_auc():
    truth = np.array([0, 0, 1, 1], bool)
    prob = np.array([0.1, 0.6, 0.4, 0.9])
    c = M.confusion(prob > 0.5, prob, truth)
    assert (c.tp, c.fp, c.tn, c.fn) == (1, 1, 1, 1)
    assert c.auc == pytest.approx(0.75)
    assert c.sensitivity == 0.5 and c.specificity == 0.5
    assert M.roc_auc(np.array([0.2, 0.8]), np.array([0, 1])) == 1.0
