"""Hostile and broken input at the C-STORE SCP and in the watched folder: aborted associations, pydicom's invalid
test files, truncation, wrong and huge declared lengths, fuzzed datasets and UID abuse. Each gets a clear status
or reason; the node keeps serving; nothing is written outside the spool."""

from __future__ import annotations

import tracemalloc
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from livernode.daemon.ingest_folder import FolderIngest
from livernode.daemon.spool import Spool
from livernode.daemon.store import Store
from tests.peers import ENV, RawClient, encoded
from tests.reliability.conftest import audit_events, files_outside

REFUSALS = {0xA700, 0xA900, 0xC000}


def _ct_files(synth_dirs, case="case_000"):
    return sorted((synth_dirs["dicom"] / case / "ct").glob("*.dcm"))


def _stored(scp) -> list:
    return sorted(p for p in scp.spool.instances.rglob("*") if p.is_file())


def _echo_ok(port: int) -> bool:
    r = subprocess.run(["/usr/bin/echoscu", "-aec", "LIVERNODE", "127.0.0.1", str(port)], capture_output=True,
                       env=ENV, timeout=30)
    return r.returncode == 0


def test_association_aborted_mid_dataset_keeps_earlier_instances_only(scp, synth_dirs, figure):
    files = _ct_files(synth_dirs)
    datasets = [pydicom.dcmread(f) for f in files[:3]]
    client = RawClient(scp.port)
    for ds in datasets[:2]:
        assert client.store(encoded(ds), str(ds.SOPInstanceUID)) == 0x0000
    client.store_partially_then_abort(encoded(datasets[2]), str(datasets[2].SOPInstanceUID))
    assert _echo_ok(scp.port)  # still serving
    stored = _stored(scp)
    assert len(stored) == 2 and not [p for p in stored if p.name.endswith(".tmp")]
    kept = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in stored}
    for ds in datasets[:2]:
        assert kept[str(ds.SOPInstanceUID)].PixelData == ds.PixelData
    assert scp.store.study(str(datasets[0].StudyInstanceUID)).instances == 2
    figure("instances_kept", len(kept))
    figure("partial_instances_on_disk", len([p for p in scp.spool.root.rglob("*") if p.name.endswith(".tmp")]))


INVALID_TEST_FILES = ["rtplan_truncated.dcm", "MR_truncated.dcm", "no_meta.dcm", "badVR.dcm",
                      "meta_missing_tsyntax.dcm", "ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm",
                      "JPEG2000-embedded-sequence-delimiter.dcm", "UN_sequence.dcm", "zipMR.gz", "rtplan.dump",
                      "test1.json", "liver_1frame.dcm", "MR_small.dcm", "CT_small.dcm"]


def _hostile_files(tmp_path, synth_dirs) -> dict[str, bytes]:
    """pydicom's broken and non-CT test files, and our own damaged CT instances."""
    out = {name: open(get_testdata_file(name), "rb").read() for name in INVALID_TEST_FILES}
    good = _ct_files(synth_dirs)[0].read_bytes()
    out["empty.dcm"] = b""
    out["preamble-only.dcm"] = good[:132]
    out["truncated-header.dcm"] = good[:400]
    out["truncated-pixels.dcm"] = good[:-1000]
    out["random.bin"] = bytes(range(256)) * 40
    # Pixel Data declaring 2 GiB: the reader must refuse it without trying to allocate 2 GiB.
    i = good.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    out["huge-length.dcm"] = good[:i + 8] + struct.pack("<I", 0x7FFFFFF0) + good[i + 12:]
    return out


def test_watched_folder_rejects_broken_files_with_a_reason(tmp_path, synth_dirs, figure):
    watch, rejected = tmp_path / "inbox", tmp_path / "state" / "rejected"
    spool = Spool(tmp_path / "state" / "spool")
    folder = FolderIngest(watch, spool, Store(tmp_path / "state" / "index.sqlite"), rejected)
    hostile = _hostile_files(tmp_path, synth_dirs)
    for name, data in hostile.items():
        (watch / name).write_bytes(data)
    tracemalloc.start()
    folder.scan(now=0)
    folder.scan(now=10)  # settled: every file is judged
    growth_mb = tracemalloc.get_traced_memory()[1] / 2**20  # the peak of everything allocated meanwhile
    tracemalloc.stop()
    assert not list(watch.iterdir())
    accepted = [p for p in spool.instances.rglob("*.dcm")]
    reasons = {p.name.split("-", 2)[2].removesuffix(".reason"): p.read_text() for p in rejected.glob("*.reason")}
    # CT_small.dcm is a valid CT instance, and the JPEG 2000 file a valid secondary capture (stored, as PACS routing
    # sends such screens along; series selection says why it is not segmented); everything else is refused
    taken = {"CT_small.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"}
    assert len(accepted) == len(taken)
    assert set(reasons) == set(hostile) - taken
    for name, reason in reasons.items():
        assert name in reason and len(reason) > len(name) + 10, (name, reason)
    assert "missing" in reasons["UN_sequence.dcm"]
    assert "not CT" in reasons["MR_small.dcm"] and "not CT" in reasons["liver_1frame.dcm"]
    assert "truncated" in reasons["truncated-pixels.dcm"] or "ends" in reasons["truncated-pixels.dcm"]
    assert growth_mb < 64, f"peak allocation {growth_mb:.0f} MiB"
    figure("files_rejected_with_reason", len(reasons))
    figure("peak_allocated_mib", round(growth_mb, 1))


def test_scp_answers_broken_datasets_with_a_status(scp, tmp_path, synth_dirs, caplog, figure):
    hostile = _hostile_files(tmp_path, synth_dirs)
    good = pydicom.dcmread(_ct_files(synth_dirs)[0])
    payload = encoded(good)
    # Declared lengths that lie: an element longer than the data, and one claiming nearly 4 GiB.
    i = payload.find(b"\x20\x00\x0d\x00UI")  # Study Instance UID
    length = struct.unpack("<H", payload[i + 6:i + 8])[0]
    hostile_payloads = {
        "long-declared": payload[:i + 6] + struct.pack("<H", 0xFFF0) + payload[i + 8:],
        "short-declared": payload[:i + 6] + struct.pack("<H", length - 7) + payload[i + 8:],
        "huge-pixel-length": payload[:payload.rfind(b"\xe0\x7f\x10\x00OW") + 8] + struct.pack("<I", 0xFFFFFFF0),
        "truncated": payload[: len(payload) // 3],
        "one-byte": b"\x00",
    }
    request_uid = {name: str(good.SOPInstanceUID) for name in hostile_payloads}
    for name, data in hostile.items():
        if name == "CT_small.dcm":  # a valid CT instance: it would rightly be stored
            continue
        hostile_payloads[name], request_uid[name] = _dataset_bytes(data), _sop_uid(data) or str(good.SOPInstanceUID)
    tracemalloc.start()
    statuses, retried = {}, []
    for name, data in hostile_payloads.items():
        for attempt in range(2):
            seen = len(caplog.records)
            client = RawClient(scp.port)
            try:
                statuses[name] = client.store(data, request_uid[name])
            finally:
                client.close()
            # No answer (None) because the association's idle timer ran out while this process stood still (CI
            # once saw a stall of 87 s here): an SCU would send again on a new association, and so does this test,
            # once. Any other missing answer fails below.
            stalled = any("network timeout" in r.getMessage() for r in caplog.records[seen:])
            if statuses[name] is not None or not stalled:
                break
            retried.append(name)
    growth_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert set(statuses.values()) <= REFUSALS, {k: v if v is None else hex(v) for k, v in statuses.items()}
    assert not _stored(scp)
    assert _echo_ok(scp.port)
    refused = [e for e in audit_events(tmp_path / "audit.jsonl") if e["event"] == "instance_refused"]
    # an unanswered first attempt may or may not have been judged (and audited) before its association ended
    assert len(retried) <= 1, retried
    assert len(hostile_payloads) <= len(refused) <= len(hostile_payloads) + len(retried), (len(refused), retried)
    assert all(e["reason"] for e in refused)
    figure("payloads_sent_twice", len(retried))
    assert growth_mb < 64, f"peak allocation {growth_mb:.0f} MiB"
    figure("datasets_refused", len(statuses))
    figure("statuses", sorted({f"0x{v:04X}" for v in statuses.values()}))
    figure("peak_allocated_mib", round(growth_mb, 1))


def _dataset_bytes(data: bytes) -> bytes:
    """The file's dataset bytes exactly as written (lengths that lie included), without preamble and file meta."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = pydicom.filebase.DicomBytesIO(data)
    try:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        body = data[fp.tell():]
    except Exception:
        body = data
    return body or b"\x00"  # an empty dataset would not be sent at all


def _sop_uid(data: bytes) -> str | None:
    try:
        return str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), force=True).SOPInstanceUID) or None
    except Exception:
        return None


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory, synth_dirs):
    from livernode.daemon.ingest_scp import StoreSCP

    root = tmp_path_factory.mktemp("fuzz")
    server = StoreSCP("LIVERNODE", "127.0.0.1", 0, Spool(root / "spool"), Store(root / "index.sqlite"))
    server.start()
    ds = pydicom.dcmread(_ct_files(synth_dirs, "case_001")[0])
    yield server, ds, encoded(ds)
    server.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(data=st.data())
def test_fuzzed_datasets_get_a_status_and_never_stop_the_node(fuzz_target, data):
    """Byte flips, truncations, insertions and length-field corruption of a real CT dataset."""
    from livernode.imaging.dicomio import read_dataset

    server, ds, payload = fuzz_target
    buf = bytearray(payload)
    header_end = payload.find(b"\xe0\x7f\x10\x00")  # mutate the header region, where the parser is exercised
    for _ in range(data.draw(st.integers(1, 8), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "length"]), label="kind")
        pos = data.draw(st.integers(0, max(0, min(len(buf), header_end) - 1)), label="pos")
        if kind == "flip":
            buf[pos] ^= data.draw(st.integers(1, 255), label="mask")
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        elif pos + 2 <= len(buf):
            buf[pos:pos + 2] = data.draw(st.sampled_from([b"\xff\xff", b"\x00\x00", b"\xfe\xff"]), label="len")
        if not buf:
            break
    client = RawClient(server.port)
    try:
        status = client.store(bytes(buf) or b"\x00", str(ds.SOPInstanceUID))  # b"": no dataset would be sent
    finally:
        client.close()
    assert status in REFUSALS | {0x0000}, hex(status)
    if status == 0x0000:  # acknowledged: the instance is on disk, indexed and readable
        path = Path(_indexed(server)[str(ds.SOPInstanceUID)])
        assert server.spool.instances in path.parents
        read_dataset(path)


def _indexed(server) -> list:
    with server.store.transaction() as db:
        return dict(db.execute("SELECT sop_instance_uid, path FROM instances").fetchall())


LONG_UID = "1." + "2" * 64
BAD_UIDS = ["..", "a/b", "1.2.3/../../../tmp/x", LONG_UID, "1.2.3\x00.4", "/etc/passwd", "1.2.03",
            "1..2", ".", "1.2.3.", "1.2.a"]


@pytest.mark.parametrize("where", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_uid_abuse_is_refused_and_nothing_lands_outside_the_spool(scp, tmp_path, synth_dirs, where, figure):
    src = pydicom.dcmread(_ct_files(synth_dirs)[0])
    statuses = []
    for bad in BAD_UIDS:
        ds = src.copy()
        setattr(ds, where, bad)
        client = RawClient(scp.port)
        try:
            statuses.append(client.store(encoded(ds), bad if where == "SOPInstanceUID" else src.SOPInstanceUID))
        finally:
            client.close()
    if where == "SOPInstanceUID":  # in the C-STORE request itself, one over 64 characters is not valid DIMSE:
        assert statuses[BAD_UIDS.index(LONG_UID)] is None  # the association is aborted, and that is audited
        del statuses[BAD_UIDS.index(LONG_UID)]
        assert "association_aborted" in [e["event"] for e in audit_events(tmp_path / "audit.jsonl")]
    assert set(statuses) == {0xC000}, statuses
    # through the watched folder as well
    watch, rejected = tmp_path / "inbox", tmp_path / "rejected"
    folder = FolderIngest(watch, scp.spool, scp.store, rejected)
    for n, bad in enumerate(BAD_UIDS):
        ds = src.copy()
        setattr(ds, where, bad)
        ds.save_as(watch / f"bad{n}.dcm", enforce_file_format=False)
    folder.scan(now=0)
    folder.scan(now=10)
    assert len(list(rejected.glob("*.reason"))) == len(BAD_UIDS)
    assert all("not a valid DICOM UID" in p.read_text() for p in rejected.glob("*.reason"))
    assert not _stored(scp)
    expected = {tmp_path / "audit.jsonl", tmp_path / ".audit.jsonl.lock", tmp_path / "index.sqlite", tmp_path / "index.sqlite-wal",
                tmp_path / "index.sqlite-shm"}
    assert set(files_outside(tmp_path, scp.spool.root, rejected)) <= expected
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "b").exists()
    figure("uids_refused", len(statuses) * 2)
