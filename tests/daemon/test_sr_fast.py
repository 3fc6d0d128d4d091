"""The SR is built in one pass (livernode.daemon.sr._document): pinned to highdicom's own Comprehensive3DSR
construction on the same inputs, element by element, and no worse under dciodvfy.

Why it exists (200-slice study, 50 lesions, 2-core machine): highdicom given the whole TID 1500 tree spent
~0.55 of ~0.9 s deep-copying it, parsing the copy back and searching it twice for references; built in one pass
the SR takes ~0.3 s to build. The numbers live here and in the commit, never in an assertion."""

import itertools
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from livernode.daemon import sr as srmod
from livernode.daemon.seg import write_result_seg
from livernode.fsutil import write_dataset
from livernode.imaging.postprocess import postprocess
from livernode.imaging.segwrite import Algorithm

# Set from the clock when highdicom builds the document; everything else must match to the byte.
PER_RUN = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime"}
ONE_PASS = {"document": srmod._document, "measurement": srmod._Measurement}  # before a test replaces them


def _reference_document(report, evidence, **kw):
    """Today's call before the one-pass build: highdicom given the whole tree."""
    return hd.sr.Comprehensive3DSR(evidence=evidence, content=report, **kw)


def _source(synth_dirs):
    files = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def _findings(n: int):
    """A liver with nine lesions of different sizes on different slices, one of a single pixel (no long-axis
    line), so the SR holds volumetric and planar groups."""
    labels = np.zeros((n, 64, 64), np.uint8)
    labels[1:-1, 2:62, 2:62] = 1
    for k in range(9):
        r, c, z = 4 + 18 * (k // 3), 4 + 18 * (k % 3), 2 + k % (n - 4)
        labels[z:z + 1 + k % 2, r:r + 1 + k, c:c + 1 + 2 * k // 3] = 2
    return postprocess(labels, (2.0, 0.8, 0.8), min_lesion_ml=0.0)


def _build(monkeypatch, seg, source, findings, out: Path, *, reference: bool) -> Dataset:
    """build_sr + write_sr with repeatable UIDs, as they are or (`reference`) with highdicom's own pieces in place
    of the one-pass ones: the construction before it, the whole tree given to Comprehensive3DSR."""
    counter = itertools.count(1)
    monkeypatch.setattr(srmod, "generate_uid", lambda: f"2.25.{next(counter)}")
    monkeypatch.setattr(srmod, "_document", _reference_document if reference else ONE_PASS["document"])
    monkeypatch.setattr(srmod, "_Measurement", hd.sr.Measurement if reference else ONE_PASS["measurement"])
    sr = srmod.build_sr(seg, source, findings, Algorithm("livernode test", "1 (abc)"), series_uid="1.2.3.6",
                        sop_uid="1.2.3.7", note=" (liver cut off)", description="research use only")
    if reference:
        assert type(sr.content) is hd.sr.value_types.ContentSequence  # the tree highdicom parsed back
        write_dataset(out, sr)
    else:
        srmod.write_sr(sr, out)
    return sr


def _differences(a: Dataset, b: Dataset, path: str = "") -> list[str]:
    out = []
    for tag in sorted(set(a.keys()) | set(b.keys())):
        ea, eb = a.get(tag), b.get(tag)
        where = f"{path}/{(ea or eb).keyword or tag}"
        if ea is None or eb is None:
            out.append(f"{where}: only in {'new' if ea is None else 'reference'}")
        elif (ea.keyword or "") in PER_RUN:
            continue
        elif ea.VR != eb.VR:
            out.append(f"{where}: VR {ea.VR} != {eb.VR}")
        elif ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{where}: {len(ea.value)} != {len(eb.value)} items")
            for i, (x, y) in enumerate(zip(ea.value, eb.value)):
                out += _differences(x, y, f"{where}[{i}]")
        elif ea.value != eb.value:
            out.append(f"{where}: {ea.value!r} != {eb.value!r}")
    return out


@pytest.fixture
def inputs(synth_dirs, tmp_path):
    source = _source(synth_dirs)
    findings = _findings(len(source))
    seg_path = tmp_path / "seg.dcm"
    write_result_seg(source, findings.labels, seg_path, algorithm=Algorithm("livernode test", "1 (abc)"),
                     series_uid="1.2.3.4", sop_uid="1.2.3.5")
    return pydicom.dcmread(seg_path), source, findings


def test_one_pass_sr_equals_highdicoms_construction(inputs, tmp_path, monkeypatch):
    seg, source, findings = inputs
    assert len(findings.lesions) == 9
    ref = _build(monkeypatch, seg, source, findings, tmp_path / "ref.dcm", reference=True)
    new = _build(monkeypatch, seg, source, findings, tmp_path / "new.dcm", reference=False)
    planar = [g for g in new.content.get_planar_roi_measurement_groups()]
    assert len(planar) == 8 and len(new.content.get_volumetric_roi_measurement_groups()) == 11
    # In memory, in the file, and read back by highdicom: the same document.
    assert _differences(ref, new) == []
    ref_file, new_file = pydicom.dcmread(tmp_path / "ref.dcm"), pydicom.dcmread(tmp_path / "new.dcm")
    assert _differences(ref_file, new_file) == []
    assert _differences(ref_file.file_meta, new_file.file_meta) == []
    assert isinstance(new_file.ContentSequence, Sequence) and len(new_file.ContentSequence) > 0
    ref_read, new_read = hd.sr.srread(tmp_path / "ref.dcm"), hd.sr.srread(tmp_path / "new.dcm")
    assert [g.tracking_uid for g in new_read.content.get_planar_roi_measurement_groups()] == \
        [g.tracking_uid for g in ref_read.content.get_planar_roi_measurement_groups()]
    assert new_read.get_evidence() == ref_read.get_evidence()
    assert len(new_read.get_evidence()) == len(source) + 1
    # The content highdicom hands back holds the same tree as the document.
    assert _differences(new.content[0], ref.content[0]) == []


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
    r = subprocess.run([exe, str(path)], capture_output=True, text=True)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


@pytest.mark.skipif(not (shutil.which("dciodvfy") or Path("/usr/bin/dciodvfy").exists()),
                    reason="dciodvfy (dicom3tools) is not installed")
def test_one_pass_sr_has_no_more_dciodvfy_errors(inputs, tmp_path, monkeypatch):
    seg, source, findings = inputs
    _build(monkeypatch, seg, source, findings, tmp_path / "ref.dcm", reference=True)
    _build(monkeypatch, seg, source, findings, tmp_path / "new.dcm", reference=False)
    ref, new = _dciodvfy_errors(tmp_path / "ref.dcm"), _dciodvfy_errors(tmp_path / "new.dcm")
    assert new == [] or len(new) <= len(ref), new


def test_the_sr_file_is_the_bytes_pydicom_writes(inputs, tmp_path, monkeypatch):
    """write_sr encodes the evidence and content trees itself (one pass, no ambiguous-VR checks below every
    item): the file is what pydicom's save_as writes for the same document, byte for byte, and a document it
    cannot encode (a non-ASCII code meaning) is written by pydicom."""
    import io

    from livernode.imaging.segwrite import encode_from

    seg, source, findings = inputs
    sr = _build(monkeypatch, seg, source, findings, tmp_path / "new.dcm", reference=False)
    assert encode_from(sr, srmod.EVIDENCE) is not None  # the fast path was taken
    want = io.BytesIO()
    sr.save_as(want, enforce_file_format=True)
    got = (tmp_path / "new.dcm").read_bytes()
    assert len(got) > 20000 and got == want.getvalue()
    sr.ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning = "Mesure \u00e9"
    assert encode_from(sr, srmod.EVIDENCE) is None
    srmod.write_sr(sr, tmp_path / "latin.dcm")
    assert pydicom.dcmread(tmp_path / "latin.dcm").ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning == \
        "Mesure \u00e9"
