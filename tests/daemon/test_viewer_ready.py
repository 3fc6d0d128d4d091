"""The SEG and SR read back by dcmqi, the converter behind 3D Slicer's QuantitativeReporting: masks equal to what
livernode wrote, our colours rather than dcmqi's default, measurements equal to summary.json, and each measured
lesion's long axis as a line on its slice. On a phantom study and on the real CHAOS case."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from livernode.daemon.pipeline import process_files
from livernode.imaging.labels import LABELS
from livernode.imaging.synth_study import abdomen_study
from livernode.inference.runner import Segmenter
from livernode.training.datasets import nifti_to_lps_slices

pytestmark = pytest.mark.slow
BIN = Path(__import__("sys").executable).parent


def _dcmqi(tool: str, *args: str) -> str:
    r = subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout + r.stderr


def _check(result, files: list[Path], out: Path) -> dict:
    """Everything dcmqi reads back from one result; returns figures."""
    out.mkdir(parents=True)
    log = _dcmqi("segimage2itkimage", "--inputDICOM", str(result.seg_path), "--outputDirectory", str(out), "-t",
                 "nifti", "-p", "seg")
    assert "CIELab" not in log, log  # "Failed to get CIELab values - initializing to default"
    meta = json.loads((out / "seg-meta.json").read_text())
    colours = {a[0]["SegmentLabel"]: a[0]["recommendedDisplayRGBValue"] for a in meta["segmentAttributes"]}
    assert colours == {li.name: list(li.rgb) for li in LABELS}
    labels = result.findings.labels
    assert (labels > 0).any()  # there is something to compare
    zs = sorted(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files)
    for li in LABELS:
        path = out / f"seg-{li.value}.nii.gz"
        mine = labels == li.value
        if not mine.any():
            assert not path.exists() or not np.asarray(nib.load(path).dataobj).any()
            continue
        arr, spacing, origin = nifti_to_lps_slices(nib.load(path))
        first = int(np.argmin(np.abs(np.asarray(zs) - origin[2])))  # dcmqi keeps the slices with frames only
        assert np.array_equal(arr > 0, mine[first:first + len(arr)]), li.name
        assert not mine[:first].any() and not mine[first + len(arr):].any(), li.name
    _dcmqi("tid1500reader", "--inputDICOM", str(result.sr_path), "--outputMetadata", str(out / "sr.json"))
    groups = json.loads((out / "sr.json").read_text())["Measurements"]
    summary = json.loads(result.summary_path.read_text())

    def value(group, meaning):
        return float(next(m["value"] for m in group["measurementItems"] if m["quantity"]["CodeMeaning"] == meaning))
    by_id = {g["TrackingIdentifier"]: g for g in groups}
    assert value(by_id["Liver"], "Volume") == pytest.approx(summary["liver_volume_ml"], abs=0.01)
    assert value(by_id["Liver"], "Lesion count") == summary["lesion_count"]
    assert value(by_id["All liver tumours"], "Volume") == pytest.approx(summary["tumour_volume_ml"], abs=0.01)
    lines = 0
    for lesion in summary["lesions"][:20]:
        group = by_id.get(f"Lesion {lesion['index']}")
        if group is None:  # only the 20 largest are measured one by one
            continue
        assert value(group, "Volume") == pytest.approx(lesion["volume_ml"], abs=0.001)
        assert value(group, "Long axis") == pytest.approx(lesion["longest_axial_diameter_mm"], abs=0.001)
        line = by_id.get(f"Lesion {lesion['index']} long axis")
        if line is not None:
            assert value(line, "Long axis") == pytest.approx(lesion["longest_axial_diameter_mm"], abs=0.001)
            lines += 1
    return {"segments_compared": len(LABELS), "lesions": summary["lesion_count"], "long_axis_lines": lines}


def test_phantom_study_reads_back_in_dcmqi(liver_model, tmp_path):
    files = abdomen_study(tmp_path / "study", seed=78)["portal"]
    result = process_files(files, Segmenter(liver_model, providers="cpu"), tmp_path / "out")
    figures = _check(result, files, tmp_path / "dcmqi")
    assert figures["lesions"] > 0 and figures["long_axis_lines"] > 0  # the phantom has tumours, drawn as lines


def test_real_chaos_case_reads_back_in_dcmqi(liver_model, chaos_sample, tmp_path):
    files = sorted((chaos_sample / "DICOM_anon").iterdir())
    result = process_files(files, Segmenter(liver_model, providers="cpu"), tmp_path / "out")
    _check(result, files, tmp_path / "dcmqi")
