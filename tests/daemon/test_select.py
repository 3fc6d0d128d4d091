import copy

import numpy as np
import pytest

from livernode.daemon.select import select_series
from livernode.errors import SeriesRejected
from livernode.imaging.ctwrite import StudyInfo, ct_datasets
from livernode.imaging.volume import CtVolume


def _series(uid_key: str, n=10, thickness=2.0, kernel="B30f", orientation=(1, 0, 0, 0, 1, 0)):
    vol = CtVolume(hu=np.zeros((n, 16, 16), np.float32), spacing=(thickness, 1.0, 1.0), orientation=orientation,
                   series_instance_uid=StudyInfo(uid_key).uid("series"))
    ds = ct_datasets(vol, StudyInfo("study"))
    for d in ds:
        d.ConvolutionKernel = kernel
    return [(f"{uid_key}/{i}", d) for i, d in enumerate(ds)]


def test_prefers_thin_soft_tissue_series_and_records_every_decision():
    thick = _series("thick", thickness=5.0)
    thin_lung = _series("lung", thickness=1.0, kernel="B70f LUNG")
    thin_soft = _series("soft", thickness=1.0)
    few = _series("few", n=3)
    uid, decisions = select_series(thick + thin_lung + thin_soft + few)
    assert uid == thin_soft[0][1].SeriesInstanceUID
    by_uid = {d.series_instance_uid: d for d in decisions}
    assert by_uid[uid].chosen and sum(d.chosen for d in decisions) == 1
    assert "fewer than 8" in by_uid[few[0][1].SeriesInstanceUID].reason


def test_rejects_non_axial_gap_and_tilt_with_reasons():
    coronal = _series("cor", orientation=(1, 0, 0, 0, 0, -1))
    gap = _series("gap")
    del gap[4]
    tilt = _series("tilt")
    for i, (_, d) in enumerate(tilt):
        pos = [float(v) for v in d.ImagePositionPatient]
        d.ImagePositionPatient = [pos[0], pos[1] + i * 0.5, pos[2]]  # 14 deg of gantry tilt
    mr = copy.deepcopy(_series("mr"))
    for _, d in mr:
        d.Modality = "MR"
    with pytest.raises(SeriesRejected) as exc:
        select_series(coronal + gap + tilt + mr)
    msg = str(exc.value)
    assert "not axial" in msg and "slice gap of 4.00 mm" in msg and "gantry tilt 14.0 deg" in msg
    assert "modality MR, not CT" in msg


def test_duplicate_positions_are_dropped_not_fatal():
    s = _series("dup")
    uid, decisions = select_series(s + [("dup/copy", copy.deepcopy(s[3][1]))])
    assert decisions[0].accepted and uid == s[0][1].SeriesInstanceUID
