"""The result SEG is read back before sending: misregistration or a changed mask fails the job."""

import copy
import subprocess

import numpy as np
import pydicom
import pytest

from livernode.daemon.seg import SegCheckFailed, verify_seg, write_result_seg
from livernode.imaging.segwrite import Algorithm


def _source(synth_dirs):
    files = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def _labels(n):
    lab = np.zeros((n, 64, 64), np.uint8)
    lab[3:9, 10:40, 10:40] = 1
    lab[5:7, 20:26, 20:26] = 2
    return lab


def test_written_seg_passes_dciodvfy_and_its_own_check(synth_dirs, tmp_path):
    source = _source(synth_dirs)
    labels = _labels(len(source))
    path = tmp_path / "seg.dcm"
    write_result_seg(source, labels, path, algorithm=Algorithm("livernode test", "1"), series_uid="1.2.3.4",
                     sop_uid="1.2.3.5")
    r = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    assert not [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(("Error", "Warning"))]


def test_misregistered_frame_is_caught(synth_dirs, tmp_path):
    source = _source(synth_dirs)
    labels = _labels(len(source))
    path = tmp_path / "seg.dcm"
    write_result_seg(source, labels, path, algorithm=Algorithm("t", "1"), series_uid="1.2.3.4", sop_uid="1.2.3.5")
    moved = [copy.deepcopy(ds) for ds in source]
    pos = [float(v) for v in moved[5].ImagePositionPatient]
    moved[5].ImagePositionPatient = [pos[0], pos[1], pos[2] + 1.0]
    with pytest.raises(SegCheckFailed, match="misregistered"):
        verify_seg(path, moved, labels)
    changed = labels.copy()
    changed[4, 30, 30] = 0
    with pytest.raises(SegCheckFailed, match="Liver read back differs"):
        verify_seg(path, source, changed)
