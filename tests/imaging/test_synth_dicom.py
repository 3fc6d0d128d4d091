import subprocess

import highdicom as hd
import numpy as np
import pydicom


def _dciodvfy(path) -> str:
    r = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    return r.stdout + r.stderr


def test_synth_ct_and_seg_pass_dciodvfy_with_zero_errors(synth_dirs):
    case = synth_dirs["dicom"] / "case_000"
    files = sorted((case / "ct").glob("*.dcm"))
    assert len(files) == 12
    for f in [files[0], files[-1], case / "seg.dcm"]:
        report = _dciodvfy(f)
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert errors == [], f"{f}: {errors}"
        assert "Warning" not in report, report


def test_synth_seg_references_ct_and_holds_both_segments(synth_dirs):
    case = synth_dirs["dicom"] / "case_001"
    seg = hd.seg.segread(case / "seg.dcm")
    ct = pydicom.dcmread(next((case / "ct").glob("*.dcm")), stop_before_pixels=True)
    assert seg.StudyInstanceUID == ct.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver", "Liver tumour"]
    assert seg.SegmentationType == "BINARY"
    types = [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence]
    assert types == ["10200004", "108369006"]


def test_synth_is_deterministic(tmp_path):
    from livernode.imaging.synth import synthesize

    a = synthesize(tmp_path / "a", cases=1, slices=4, size=64, seed=3, layout="dicom")[0]
    b = synthesize(tmp_path / "b", cases=1, slices=4, size=64, seed=3, layout="dicom")[0]
    da, db = pydicom.dcmread(a / "ct" / "CT0002.dcm"), pydicom.dcmread(b / "ct" / "CT0002.dcm")
    assert da.SOPInstanceUID == db.SOPInstanceUID
    assert np.array_equal(da.pixel_array, db.pixel_array)
