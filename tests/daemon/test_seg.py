"""The result SEG is read back before sending: misregistration or a changed mask fails the job."""

import copy
import io
import re
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest

from livernode.daemon.seg import SegCheckFailed, verify_seg, write_result_seg
from livernode.imaging.segwrite import Algorithm, build_seg, save_seg, write_seg


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


def _pair(synth_dirs, rows=64, cols=64):
    """Source headers and labels; other frame sizes than the fixture's by changing Rows/Columns (headers only)."""
    source = _source(synth_dirs)
    if (rows, cols) != (64, 64):
        source = [copy.deepcopy(ds) for ds in source]
        for ds in source:
            ds.Rows, ds.Columns = rows, cols
    labels = np.zeros((len(source), rows, cols), np.uint8)
    labels[2:-2, 3:rows - 5, 4:cols - 3] = 1
    labels[3:5, 9:17, 11:20] = 2
    labels[6, rows - 1, cols - 1] = 2  # a lone voxel in the frame's last bit
    return source, labels


def _build(source, labels):
    return build_seg(source, labels, series_uid="1.2.3.4", sop_uid="1.2.3.5", series_number=9001,
                     algorithm=Algorithm("t", "1"), series_description="t")


def test_save_seg_writes_what_save_as_writes(synth_dirs, tmp_path):
    """The hand-encoded per-frame groups and pixel data are pydicom's bytes; what they cannot encode (a non-ASCII
    text in a frame) goes to pydicom whole."""
    for rows, cols in [(64, 64), (61, 63)]:  # frames on byte boundaries, and not
        seg = _build(*_pair(synth_dirs, rows, cols))
        save_seg(seg, tmp_path / "fast.dcm")
        seg.save_as(tmp_path / "pydicom.dcm", enforce_file_format=True)
        assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "pydicom.dcm").read_bytes()
    seg.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0].FrameLabel = "Lèber"
    save_seg(seg, tmp_path / "fast.dcm")
    seg.save_as(tmp_path / "pydicom.dcm", enforce_file_format=True)
    assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "pydicom.dcm").read_bytes()
    # the sequences before the frames (encoded here too) with a text that is not ASCII in one of their items, and
    # an element of ambiguous VR beside them, which pydicom resolves
    seg = _build(*_pair(synth_dirs))
    seg.SpecificCharacterSet = "ISO_IR 100"
    seg.ContributingEquipmentSequence[0].InstitutionName = "Hôpital"
    seg.add_new(0x00280106, "US or SS", 0)  # SmallestImagePixelValue
    save_seg(seg, tmp_path / "fast.dcm")
    seg.save_as(tmp_path / "pydicom.dcm", enforce_file_format=True)
    assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "pydicom.dcm").read_bytes()
    assert pydicom.dcmread(tmp_path / "fast.dcm").ContributingEquipmentSequence[0].InstitutionName == "Hôpital"


def _read_back(source, undefined):
    """`source` written to files and read back, each with a Procedure Code Sequence (which highdicom shares with
    the SEG without copying): of undefined length or not, its item's elements still as read, one NUL-padded."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset

    out = []
    for ds in source:
        ds = copy.deepcopy(ds)
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "123", "99X", "Xyz"
        ds.ProcedureCodeSequence = [item]
        ds["ProcedureCodeSequence"].is_undefined_length = undefined
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        buf.seek(0)
        back = pydicom.dcmread(buf)
        meaning = pydicom.tag.Tag("CodeMeaning")
        back.ProcedureCodeSequence[0]._dict[meaning] = RawDataElement(meaning, "LO", 4, b"Xyz\0", 0, False, True)
        out.append(back)
    return out


def test_shared_sequences_read_from_the_sources_are_written_as_read(synth_dirs, tmp_path):
    """A source's own sequence, shared by the SEG, keeps its undefined length and its bytes as they were read
    (save_as writes them so): the SEG's head is not re-encoded there, whichever way the frames are written."""
    source, labels = _pair(synth_dirs)
    for undefined in (True, False):
        shared = _read_back(source, undefined)
        seg = _build(shared, labels)
        assert seg["ProcedureCodeSequence"].is_undefined_length == undefined
        save_seg(seg, tmp_path / "fast.dcm")
        seg.save_as(tmp_path / "pydicom.dcm", enforce_file_format=True)
        assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "pydicom.dcm").read_bytes()
        assert b"Xyz\0" in (tmp_path / "fast.dcm").read_bytes()
        write_seg(shared, labels, tmp_path / "direct.dcm", series_uid="1.2.3.4", sop_uid="1.2.3.5",
                  series_number=9001, algorithm=Algorithm("t", "1"), series_description="t")
        direct = (tmp_path / "direct.dcm").read_bytes()
        assert b"Xyz\0" in direct
        assert _differences(pydicom.dcmread(tmp_path / "direct.dcm"), pydicom.dcmread(tmp_path / "pydicom.dcm")) == []
        assert pydicom.dcmread(tmp_path / "direct.dcm")["ProcedureCodeSequence"].is_undefined_length == undefined


def _differences(a, b, path=""):
    """Element by element, into sequences; dates, times and the dimension organisation's UID (new at each
    construction) are left out."""
    out = []
    for tag in sorted(set(a.keys()) | set(b.keys())):
        if tag not in a or tag not in b:
            out.append(f"{path}{tag} only in one")
            continue
        ea, eb = a[tag], b[tag]
        if ea.VR in ("DA", "TM", "DT") or ea.keyword == "DimensionOrganizationUID":
            continue
        if ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{path}{ea.keyword}: {len(ea.value)} vs {len(eb.value)} items")
            for i, (ia, ib) in enumerate(zip(ea.value, eb.value)):
                out += _differences(ia, ib, f"{path}{ea.keyword}[{i}].")
        elif (ea.VR, ea.value) != (eb.VR, eb.value):
            out.append(f"{path}{ea.keyword}: {ea.value!r:.60} vs {eb.value!r:.60}")
    return out


def test_result_seg_equals_the_highdicom_path(synth_dirs, tmp_path):
    """write_result_seg's file against highdicom's Segmentation written by pydicom's save_as (the path it
    replaced): the same elements, the same pixel data bytes, and the same masks through highdicom's reader."""
    source, labels = _pair(synth_dirs)
    write_result_seg(source, labels, tmp_path / "new.dcm", algorithm=Algorithm("t", "1"), series_uid="1.2.3.4",
                     sop_uid="1.2.3.5", description="t")
    _build(source, labels).save_as(tmp_path / "old.dcm", enforce_file_format=True)
    new, old = pydicom.dcmread(tmp_path / "new.dcm"), pydicom.dcmread(tmp_path / "old.dcm")
    assert _differences(new.file_meta, old.file_meta) == []
    assert _differences(new, old) == []
    assert new.PixelData == old.PixelData
    seg = hd.seg.segread(tmp_path / "new.dcm")
    uids = [str(ds.SOPInstanceUID) for ds in source]
    back = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    assert np.array_equal(back[..., 0] > 0, labels == 1) and np.array_equal(back[..., 1] > 0, labels == 2)


def _cases(synth_dirs):
    """(name, source headers, labels): frames on byte boundaries and not, planes left empty between labelled ones,
    slices given top to bottom, one labelled plane, one segment only, a plane with only tumour, random labels."""
    source, labels = _pair(synth_dirs)
    odd_source, odd = _pair(synth_dirs, 61, 63)
    gaps = labels.copy()
    gaps[5] = 0
    gaps[7, 20:30, 20:30] = 2  # tumour alone on a plane: a frame of segment 2 without one of segment 1
    gaps[7][gaps[7] == 1] = 0
    one = np.zeros_like(labels)
    one[4, 10:20, 10:20] = 1
    tumour_only = np.where(labels == 2, 2, 0).astype(np.uint8)
    noise = np.random.default_rng(7).choice(np.array([0, 1, 2], np.uint8), size=labels.shape, p=[0.6, 0.3, 0.1])
    shuffle = np.random.default_rng(3).permutation(len(source))
    uneven = [k for k in range(len(source)) if k != 3]  # a slice missing: the planes are not evenly spaced
    return [("frames on byte boundaries", source, labels), ("61 x 63 frames", odd_source, odd),
            ("empty and tumour-only planes", source, gaps), ("top to bottom", source[::-1], labels[::-1].copy()),
            ("one labelled plane", source, one), ("tumour only", source, tumour_only), ("random", source, noise),
            ("shuffled", [source[k] for k in shuffle], labels[shuffle]),
            ("uneven spacing", [source[k] for k in uneven], labels[uneven]),
            ("no labels (highdicom writes every frame)", source, np.zeros_like(labels))]


def test_frames_straight_from_the_labels_equal_highdicoms(synth_dirs, tmp_path, monkeypatch):
    """write_seg (highdicom's object model on one labelled voxel, the frames encoded here) against highdicom's
    Segmentation of the whole volume written by pydicom: the same elements and the same pixel data bytes."""
    from livernode.imaging import segwrite

    encoded = []
    real = segwrite._frame
    monkeypatch.setattr(segwrite, "_frame", lambda *a: encoded.append(1) or real(*a))
    for name, source, labels in _cases(synth_dirs):
        encoded.clear()
        with open(tmp_path / "new.dcm", "wb") as f:
            seg = write_seg(source, labels, f, series_uid="1.2.3.4", sop_uid="1.2.3.5", series_number=9001,
                            algorithm=Algorithm("t", "1"), series_description="t")
        _build(source, labels).save_as(tmp_path / "old.dcm", enforce_file_format=True)
        new, old = pydicom.dcmread(tmp_path / "new.dcm"), pydicom.dcmread(tmp_path / "old.dcm")
        assert int(new.NumberOfFrames) > 0 and len(new.PixelData) > 0, name
        assert _differences(new.file_meta, old.file_meta) == [], name
        assert _differences(new, old) == [], name
        assert new.PixelData == old.PixelData, name
        assert int(seg.NumberOfFrames) == int(old.NumberOfFrames), name
        # the frames were encoded here (each, and highdicom's one once more), but for the empty volume
        assert len(encoded) == (int(old.NumberOfFrames) + 1 if labels.any() else 0), name
        if labels.any():
            verify_seg(tmp_path / "new.dcm", source, labels)


def test_frames_fall_back_to_highdicom_where_its_frame_differs(synth_dirs, tmp_path, monkeypatch, caplog):
    """When the one frame highdicom made does not encode as the encoder here would make it (another highdicom),
    highdicom builds every frame: the file is still highdicom's, and a value that is no segment is refused as
    highdicom refuses it."""
    from livernode.imaging import segwrite

    source, labels = _pair(synth_dirs)
    monkeypatch.setattr(segwrite, "_frame", lambda *a: b"not highdicom's")
    built = []
    real = segwrite.build_seg
    monkeypatch.setattr(segwrite, "build_seg", lambda *a, **k: built.append(1) or real(*a, **k))
    write_seg(source, labels, tmp_path / "new.dcm", series_uid="1.2.3.4", sop_uid="1.2.3.5", series_number=9001,
              algorithm=Algorithm("t", "1"), series_description="t")
    assert len(built) == 2  # the probe, then the whole volume
    _build(source, labels).save_as(tmp_path / "old.dcm", enforce_file_format=True)
    new, old = pydicom.dcmread(tmp_path / "new.dcm"), pydicom.dcmread(tmp_path / "old.dcm")
    assert _differences(new, old) == [] and new.PixelData == old.PixelData and int(new.NumberOfFrames) > 0
    bad = labels.copy()
    bad[4, 0, 0] = 3
    with pytest.raises(ValueError):
        write_seg(source, bad, tmp_path / "bad.dcm", series_uid="1.2.3.4", sop_uid="1.2.3.5", series_number=9001,
                  algorithm=Algorithm("t", "1"), series_description="t")


def _corrupt(path, out, change):
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_verify_seg_catches_a_damaged_file(synth_dirs, tmp_path):
    """Each kind of damage in the file itself: a frame moved, a bit flipped (also off byte boundaries, past the
    first chunk of frames), a frame left out, a frame that references a slice not in the series, a segment not
    declared."""
    for rows, cols in [(64, 64), (61, 63)]:
        source, labels = _pair(synth_dirs, rows, cols)
        good = tmp_path / f"seg{rows}.dcm"
        write_result_seg(source, labels, good, algorithm=Algorithm("t", "1"), series_uid="1.2.3.4",
                         sop_uid="1.2.3.5")
        verify_seg(good, source, labels, chunk=8)
        n = int(pydicom.dcmread(good, stop_before_pixels=True).NumberOfFrames)
        assert n > 8

        def move(ds):
            p = ds.PerFrameFunctionalGroupsSequence[n - 2].PlanePositionSequence[0]
            p.ImagePositionPatient = [*p.ImagePositionPatient[:2], float(p.ImagePositionPatient[2]) + 0.5]

        def flip(ds, bit):
            data = bytearray(ds.PixelData)
            data[bit // 8] ^= 1 << (bit % 8)
            ds.PixelData = bytes(data)

        def drop_last(ds):
            del ds.PerFrameFunctionalGroupsSequence[-1]
            ds.NumberOfFrames = n - 1
            bits = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")[:(n - 1) * rows * cols]
            ds.PixelData = np.packbits(bits, bitorder="little").tobytes()

        def stranger(ds):
            ds.PerFrameFunctionalGroupsSequence[3].DerivationImageSequence[0].SourceImageSequence[0]\
                .ReferencedSOPInstanceUID = "1.2.3.999"

        def undeclare(ds):
            del ds.SegmentSequence[-1]

        cases = [(move, "misregistered"), (stranger, "not a source slice"), (drop_last, "but no frame"),
                 (undeclare, "declared"),
                 (lambda ds: flip(ds, 0), "read back differs"),  # the first bit of the first frame
                 (lambda ds: flip(ds, (n - 1) * rows * cols + 5), "read back differs"),  # inside the last frame
                 (lambda ds: flip(ds, 9 * rows * cols - 1), "read back differs")]  # the last bit of frame 9
        for change, reason in cases:
            for undefined in (False, True):  # as save_seg writes them (read from their bytes), or not (pydicom)
                bad = _corrupt(good, tmp_path / "bad.dcm", lambda ds: (change(ds), _lengths(ds, undefined)))
                with pytest.raises(SegCheckFailed, match=reason):
                    verify_seg(bad, source, labels, chunk=8)
        again = _corrupt(good, tmp_path / "undefined.dcm", lambda ds: _lengths(ds, True))
        assert again.read_bytes() != good.read_bytes()
        verify_seg(again, source, labels, chunk=8)  # the same SEG with undefined lengths passes


def _lengths(ds, undefined: bool) -> None:
    """Mark the per-frame groups, and every item below them, as of undefined length (pydicom then writes
    delimiters) or leave them defined."""
    def mark(elem):
        elem.is_undefined_length = undefined
        for item in elem.value:
            item.is_undefined_length_sequence_item = undefined
            for sub in item:
                if sub.VR == "SQ":
                    mark(sub)
    mark(ds["PerFrameFunctionalGroupsSequence"])


def test_remembered_iod_answers_are_highdicom_s_own():
    """The SEG writer remembers highdicom's answers to 'is this attribute in that SOP class's IOD'; each answer,
    first asked and remembered, equals the table walk's."""
    from highdicom import _standard_utils

    remembered = _standard_utils.is_attribute_in_iod
    walk = remembered.__wrapped__
    ct, enhanced, seg = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.66.4"
    asked = [("PerFrameFunctionalGroupsSequence", uid, None) for uid in (ct, enhanced, seg)]
    asked += [("NumberOfFrames", uid, None) for uid in (ct, enhanced)]
    asked += [("PixelData", uid, ["IconImageSequence"]) for uid in (ct, seg)]
    sr = "1.2.840.10008.5.1.4.1.1.88.11"  # pixel data only in an icon: the excluded path changes the answer
    asked += [("PixelData", sr, None), ("PixelData", sr, ["IconImageSequence"])]
    answers = [walk(*a) for a in asked]
    assert answers == [False, True, True, False, True, True, True, True, False]
    for _ in range(2):  # asked, then remembered
        assert [remembered(*a) for a in asked] == answers
