"""The result SEG is read back before sending: misregistration or a changed mask fails the job."""

import copy
import re
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


def test_sr_measures_the_largest_lesions_and_counts_them_all(synth_dirs, tmp_path):
    """25 lesions of different sizes: the SR has one group per lesion for the 20 largest, and the count is 25."""
    from livernode.imaging.postprocess import postprocess
    from livernode.daemon.sr import MAX_SR_LESIONS, build_sr

    source = _source(synth_dirs)
    labels = np.zeros((len(source), 64, 64), np.uint8)
    labels[1:-1, 2:62, 2:62] = 1
    for k in range(25):  # 5 x 5 lesions, k + 1 voxels in-plane each, on slices 2-3
        r, c = 4 + 12 * (k // 5), 4 + 12 * (k % 5)
        labels[2:4, r:r + 1 + k // 5, c:c + 1 + k % 5] = 2
    findings = postprocess(labels, (2.0, 1.0, 1.0), min_lesion_ml=0.0)
    assert len(findings.lesions) == 25
    seg = write_result_seg(source, findings.labels, tmp_path / "seg.dcm", algorithm=Algorithm("t", "1"),
                           series_uid="1.2.3.4", sop_uid="1.2.3.5")
    sr = build_sr(seg, source, findings, Algorithm("t", "1"), series_uid="1.2.3.6", sop_uid="1.2.3.7")
    groups = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    lesion_groups = []
    for g in groups[0].ContentSequence:
        ids = [x.TextValue for x in g.ContentSequence  # the tracking identifier, not the long-axis line's label
               if re.fullmatch(r"Lesion \d+", getattr(x, "TextValue", ""))]
        lesion_groups += ids
    want = sorted(findings.lesions, key=lambda le: -le.voxels)[:MAX_SR_LESIONS]
    assert sorted(lesion_groups) == sorted(f"Lesion {le.index}" for le in want)
    counts = [m.MeasuredValueSequence[0].NumericValue for g in groups[0].ContentSequence
              for m in g.ContentSequence if m.ValueType == "NUM" and m.ConceptNameCodeSequence[0].CodeValue == "LC"]
    assert [int(c) for c in counts] == [25]
