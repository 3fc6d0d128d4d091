"""A real dcmtk storescu talks to the livernode SCP on loopback."""

import os
import subprocess
import time

import pydicom
import pytest

from livernode.daemon.ingest_scp import StoreSCP
from livernode.daemon.spool import Spool
from livernode.daemon.store import Store
from livernode.imaging.headers import light_header
from tests.peers import RawClient, encoded

ENV = dict(os.environ, TCP_NODELAY="1")


@pytest.fixture()
def scp(tmp_path):
    server = StoreSCP("LIVERNODE", "127.0.0.1", 0, Spool(tmp_path / "spool"), Store(tmp_path / "index.sqlite"))
    server.start()
    yield server
    server.stop()


def _storescu(port, files, *extra):
    return subprocess.run(["/usr/bin/storescu", "-v", "-aec", "LIVERNODE", *extra, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, env=ENV, timeout=120)


def test_storescu_study_is_stored_and_indexed_once(scp, synth_dirs):
    files = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))
    r = _storescu(scp.port, files)
    assert r.returncode == 0, r.stderr
    r = _storescu(scp.port, files[:3])  # a repeat is acknowledged, stored once
    assert r.returncode == 0, r.stderr
    ds0 = pydicom.dcmread(files[0])
    row = scp.store.study(ds0.StudyInstanceUID)
    assert row.instances == len(files)
    stored = sorted(scp.spool.instances.rglob("*.dcm"))
    assert len(stored) == len(files)
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in stored}
    for f in files:
        src = pydicom.dcmread(f)
        assert by_uid[src.SOPInstanceUID].PixelData == src.PixelData
    # the index keeps what series selection reads, so a study's files are not parsed again to choose its series
    indexed = scp.store.instance_headers(ds0.StudyInstanceUID)
    assert len(indexed) == len(files) and all(h for _, h in indexed)
    for path, facts in indexed:
        light, full = light_header(facts), pydicom.dcmread(path, stop_before_pixels=True)
        assert len(light) >= 15 and "PatientName" not in light
        assert all(light[k].value == full[k].value for k in light.keys())


def test_echo_and_refused_sop_class(scp, synth_dirs, tmp_path):
    r = subprocess.run(["/usr/bin/echoscu", "-aec", "LIVERNODE", "127.0.0.1", str(scp.port)], capture_output=True,
                       text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    ds = pydicom.dcmread(sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    mr = tmp_path / "mr.dcm"
    ds.save_as(mr, enforce_file_format=True)
    r = _storescu(scp.port, [mr])
    assert "No presentation context" in r.stderr or "no acceptable presentation context" in r.stderr.lower(), r.stderr
    assert not list(scp.spool.instances.rglob("*.dcm"))


def test_out_of_space_answers_a700_and_writes_nothing(tmp_path, synth_dirs):
    server = StoreSCP("LIVERNODE", "127.0.0.1", 0, Spool(tmp_path / "spool", min_free_bytes=1 << 62),
                      Store(tmp_path / "index.sqlite"))
    server.start()
    try:
        f = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[0]
        r = _storescu(server.port, [f])
        assert "Refused: OutOfResources" in r.stderr, r.stderr
        assert not [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
    finally:
        server.stop()


def _send_raw(port, payload: bytes, sop_instance_uid: str) -> int | None:
    client = RawClient(port)
    try:
        return client.store(payload, sop_instance_uid)
    finally:
        client.close()


def test_dataset_not_matching_the_request_gets_a900(scp, synth_dirs, tmp_path, caplog):
    ds = pydicom.dcmread(sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[0])
    assert _send_raw(scp.port, encoded(ds), "1.2.3.4.5.6.7") == 0xA900
    assert "do not match the C-STORE request" in caplog.text and "1.2.3.4.5.6.7" in caplog.text
    assert not list(scp.spool.instances.rglob("*.dcm"))


def test_unparseable_dataset_and_invalid_uid_get_c000(scp, synth_dirs, tmp_path, caplog):
    src = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = "1.2.3/../../etc"
    assert _send_raw(scp.port, encoded(ds), str(ds.SOPInstanceUID)) == 0xC000
    assert "not a valid DICOM UID" in caplog.text
    garbage = b"\x08\x00\x16\x00UI\xff\xff" + b"\xff" * 64  # an element whose length runs past the end
    assert _send_raw(scp.port, garbage, "1.2.3.4.5.6.8") == 0xC000
    assert "declares 65535 bytes but the file ends after 64" in caplog.text
    assert not list(scp.spool.instances.rglob("*.dcm"))
    # and the node keeps serving
    r = _storescu(scp.port, [src])
    assert r.returncode == 0 and len(list(scp.spool.instances.rglob("*.dcm"))) == 1


@pytest.mark.parametrize("sop_uid, syntax", [("1.2.3.44", "1.2.840.10008.1.2.1"), ("1.2.3.4", "1.2.840.10008.1.2"),
                                             ("1.2.826.0.1.3680043.8.498.1", "1.2.840.10008.1.2.4.70")])
def test_part10_header_is_what_pydicom_writes(sop_uid, syntax):
    """The hand-built file meta (odd and even UID lengths) is byte for byte pydicom's, with the same values."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from livernode.imaging.dicomio import part10_header

    ct = "1.2.840.10008.5.1.4.1.1.2"
    ours = part10_header(ct, sop_uid, syntax, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION)
    theirs = b"\0" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid=ct, sop_instance_uid=sop_uid, transfer_syntax=syntax))
    assert ours == theirs


def _as_received(ds, implicit=False):
    """`ds` as a receiver decodes it from P-DATA: every element still raw."""
    import io

    from pynetdicom.dsutils import decode, encode

    return decode(io.BytesIO(encode(ds, implicit, True)), implicit, True)


@pytest.mark.parametrize("implicit", [False, True])
def test_values_decoded_before_are_not_decoded_again_and_bad_ones_still_fail(synth_dirs, implicit):
    """check_dataset leaves a value raw only where the same bytes under the same tag decoded without error before:
    the next slice of a series is checked by its values that differ, and a malformed value is refused however
    many good slices came before it. Private values, sequences and VRs that depend on other elements are decoded
    every time, and what is left raw reads back as a full decode gives it."""
    from pydicom.dataelem import RawDataElement
    from pydicom.sequence import Sequence

    from livernode.errors import InputError
    from livernode.imaging import dicomio

    files = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[:2]
    first, second = (pydicom.dcmread(f) for f in files)
    for ds in (first, second):
        ds.add_new(0x00091010, "LO", "creator")  # a private creator and its value
        ds.add_new(0x00091001, "LO", "private")
        ds.ReferencedImageSequence = Sequence([pydicom.Dataset()])
        ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
        ds.add_new(0x00280106, "US", 0)  # Smallest Image Pixel Value, US or SS in the dictionary
    syntax = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    dicomio._DECODED.clear()
    dicomio.check_dataset(_as_received(first, implicit), "first", transfer_syntax=syntax)
    ds = dicomio.check_dataset(_as_received(second, implicit), "second", transfer_syntax=syntax)
    raw = {tag for tag in ds.keys() if isinstance(ds.get_item(tag), RawDataElement)}
    names = {pydicom.datadict.keyword_for_tag(t) for t in raw}
    assert {"Modality", "SeriesInstanceUID", "StudyInstanceUID", "PixelSpacing"} <= names  # the same in both
    assert not names & {"SOPInstanceUID", "ImagePositionPatient", "InstanceNumber", "PixelData",
                        "ReferencedImageSequence", "SmallestImagePixelValue"}
    assert not any(t.is_private for t in raw)
    full = _as_received(second, implicit)
    for tag in full.keys():
        assert ds[tag].value == full[tag].value and ds[tag].VR == full[tag].VR, tag

    third = _as_received(pydicom.dcmread(files[1]), implicit)  # Rows, decoded in both slices, now one byte long
    rows = third.get_item(0x00280010)
    third[0x00280010] = RawDataElement(rows.tag, rows.VR, 1, b"\x01", rows.value_tell, implicit, True)
    for _ in range(2):  # a value that failed is never remembered as decoded
        with pytest.raises(InputError, match="third: not readable DICOM.*0028,0010"):
            dicomio.check_dataset(third, "third", transfer_syntax=syntax)


def _body(path):
    """The bytes of a DICOM file after its File Meta Information."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return path.read_bytes()[132 + 12 + meta.FileMetaInformationGroupLength:]


def test_stored_file_is_the_peers_bytes_behind_the_header(scp, synth_dirs):
    """The spool file holds the dataset exactly as it was sent (no decode and re-encode), behind file meta that
    names its transfer syntax and SOP instance."""
    f = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[0]
    assert _storescu(scp.port, [f]).returncode == 0
    stored = next(scp.spool.instances.rglob("*.dcm"))
    src, got = pydicom.dcmread(f), pydicom.dcmread(stored)
    assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    assert got.file_meta.MediaStorageSOPInstanceUID == src.SOPInstanceUID
    assert _body(stored) == _body(f) and len(_body(f)) > src.Rows * src.Columns * 2


def test_a_wall_clock_step_does_not_abort_an_association(scp, synth_dirs, monkeypatch):
    """NTP stepping the clock an hour forward mid-association is not an hour of silence: an idle timer on the wall
    clock (IDLE_S, 60 s) would abort the association and leave the next instance unanswered."""
    files = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[:2]
    first, second = (pydicom.dcmread(f) for f in files)
    client = RawClient(scp.port)
    try:
        assert client.store(encoded(first), str(first.SOPInstanceUID)) == 0x0000
        wall = time.time
        monkeypatch.setattr(time, "time", lambda: wall() + 3600)
        time.sleep(0.5)
        assert client.store(encoded(second), str(second.SOPInstanceUID)) == 0x0000
        assert client.assoc.is_established
    finally:
        monkeypatch.undo()
        client.close()
    assert scp.store.study(str(first.StudyInstanceUID)).instances == 2


def test_a_deflated_dataset_is_inflated_whole_or_refused(synth_dirs):
    """Deflated Explicit VR Little Endian: the dataset decodes as sent; one cut short is refused, not read in part."""
    import zlib

    from livernode.daemon.ingest_scp import decode_dataset
    from livernode.errors import InputError

    ds = pydicom.dcmread(sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[0])
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(encoded(ds)) + deflater.flush()
    got = decode_dataset(deflated, "1.2.840.10008.1.2.1.99")
    assert got.SOPInstanceUID == ds.SOPInstanceUID and got.PixelData == ds.PixelData
    with pytest.raises(InputError, match="ends before its deflate stream does"):
        decode_dataset(deflated[: len(deflated) // 2], "1.2.840.10008.1.2.1.99")
