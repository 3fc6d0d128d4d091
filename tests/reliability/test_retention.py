"""Retention: delivered and failed studies leave the node after their time, nothing that is still owed or still
arriving is touched, a tombstone keeps the story, and the audit log rotates without losing a line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom

from livernode.config import RetentionConfig
from livernode.daemon.metrics import AuditLog
from livernode.daemon.retention import Retention
from livernode.daemon.spool import Spool, uid_key
from livernode.daemon.store import Store
from tests.peers import ENV
from tests.reliability.conftest import audit_events

HOUR = 3600.0


def _restamped(f: Path, study: str, series: str, sop: str) -> bytes:
    """The file's bytes with the study's UIDs, as the SCP would have stored an instance of it."""
    import io

    ds = pydicom.dcmread(f)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _node_state(tmp_path, synth_dirs, delivered_hours: float = 100):
    """A state folder with five studies, each three slices in the spool and a results folder:
    delivered 100 h ago, delivered but still owing a destination, still receiving, failed 800 h ago, failed 10 h
    ago."""
    spool, store = Spool(tmp_path / "spool"), Store(tmp_path / "index.sqlite")
    files = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[:3]
    now = time.time()
    studies = {}
    for k, name in enumerate(["delivered", "owing", "receiving", "failed_old", "failed_new"]):
        study, series = f"1.2.3.{k + 1}", f"1.2.3.{k + 1}.1"
        for i, f in enumerate(files):
            sop = f"1.2.3.{k + 1}.1.{i + 1}"
            path, _ = spool.store(study, series, sop, _restamped(f, study, series, sop))
            ct = str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID)
            store.add_instance(sop, study, series, ct, str(path), now=now - 1000 * HOUR)
        result = tmp_path / "results" / uid_key(study) / "gen-1"
        result.mkdir(parents=True)
        (result / "seg.dcm").write_bytes(b"x" * 1000)
        studies[name] = study
    age = {"delivered": delivered_hours, "owing": 100, "failed_old": 800, "failed_new": 10}
    for name, hours in age.items():  # each job ended that long ago
        store.start_processing(studies[name])
        store.finish(studies[name], 3, failed_reason="no usable CT series" if name.startswith("failed") else "",
                     outbox=[] if name.startswith("failed") else [("PACS@127.0.0.1:1", "seg.dcm")],
                     now=now - hours * HOUR)
    ids = [r[0] for r in store.outbox() if r[1] == studies["delivered"]]
    store.mark_sent(ids)
    return store, studies, now


def test_purge_removes_what_is_no_longer_owed_and_keeps_a_tombstone(tmp_path, synth_dirs, figure):
    store, studies, now = _node_state(tmp_path, synth_dirs)
    audit = AuditLog(tmp_path / "audit.jsonl")
    retention = Retention(RetentionConfig(keep_delivered_hours=72, keep_failed_hours=720), store, tmp_path, audit)
    dry = retention.purge(now, dry_run=True)
    assert sorted(s for s, _ in dry.studies) == sorted([studies["delivered"], studies["failed_old"]])
    assert all((tmp_path / "spool" / "instances" / uid_key(s)).exists() for s in studies.values())  # dry: nothing
    report = retention.purge(now)
    kept = sorted(name for name, s in studies.items() if store.study(s).state != "purged")
    gone = {studies["delivered"], studies["failed_old"]}
    for name, study in studies.items():
        here = (tmp_path / "spool" / "instances" / uid_key(study)).exists()
        assert here == (study not in gone), name
        assert (tmp_path / "results" / uid_key(study)).exists() == (study not in gone), name
    assert report.files == 2 * (3 + 1) and report.bytes > 0
    row = store.study(studies["delivered"])
    assert row.state == "purged" and "delivered 100.0 h ago (limit 72 h)" in row.reason
    assert store.instance_paths(studies["delivered"]) == []
    status = subprocess.run([sys.executable, "-m", "livernode.cli", "status", "--state", str(tmp_path)],
                            capture_output=True, text=True, env=ENV, timeout=60)
    assert studies["delivered"] in status.stdout and "purged" in status.stdout, status.stdout
    [event] = [e for e in audit_events(tmp_path / "audit.jsonl") if e["event"] == "purge"]
    assert event["studies"] == 2 and event["files"] == report.files
    # a purged study that is sent again starts afresh
    assert store.add_instance("1.2.3.1.1.9", studies["delivered"], "1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.2", "p")
    row = store.study(studies["delivered"])
    assert (row.state, row.instances, row.processed_instances) == ("receiving", 1, 0)
    figure("purged", len(report.studies))
    figure("kept", kept)
    figure("files_and_bytes_removed", [report.files, report.bytes])


def test_above_max_spool_gb_the_oldest_delivered_go_first(tmp_path, synth_dirs):
    store, studies, now = _node_state(tmp_path, synth_dirs, delivered_hours=1)  # young: only the cap can take it
    retention = Retention(RetentionConfig(keep_delivered_hours=72, keep_failed_hours=10000, max_spool_gb=1e-9),
                          store, tmp_path, AuditLog(None))
    report = retention.purge(now)
    assert [s for s, _ in report.studies] == [studies["delivered"]]  # the only one that is delivered
    assert "above max_spool_gb" in report.studies[0][1]


def test_audit_log_rotates_by_size_without_losing_a_line(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=4000, backups=50)
    threads = [threading.Thread(target=lambda k=k: [audit.write("instance_received", n=k * 1000 + i)
                                                    for i in range(200)]) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted(tmp_path.glob("audit.jsonl*"))
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(files) > 5 and all(f.stat().st_size <= 4000 for f in files)
    assert sorted(e["n"] for e in lines) == sorted(k * 1000 + i for k in range(4) for i in range(200))


def test_an_instance_arriving_during_a_purge_is_never_lost(tmp_path, synth_dirs):
    """Between retention choosing a study and removing it, a new instance of it arrives: the study stays. And
    after a crash mid-purge, the next start removes the purged study's old files but indexes a new one."""
    from livernode.imaging.dicomio import read_dataset

    store, studies, now = _node_state(tmp_path, synth_dirs)
    study = studies["delivered"]
    [seen] = [(n, r) for s, _, _, n, r in store.purgeable() if s == study]
    spool = Spool(tmp_path / "spool")
    late = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[5]
    path, _ = spool.store(study, "1.2.3.1.1", "1.2.3.1.1.8", _restamped(late, study, "1.2.3.1.1", "1.2.3.1.1.8"))
    store.add_instance("1.2.3.1.1.8", study, "1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.2", str(path))
    assert store.tombstone(study, "test", now, *seen) is None  # it changed: left alone
    assert len(store.instance_paths(study)) == 4 and all(Path(p).exists() for p in store.instance_paths(study))

    old = studies["failed_old"]  # a purge that crashed after the index and before the files
    [seen] = [(n, r) for s, _, _, n, r in store.purgeable() if s == old]
    leftover = store.tombstone(old, "test", time.time(), *seen)
    assert len(leftover) == 3 and all(Path(p).exists() for p in leftover)
    newer, _ = spool.store(old, "1.2.3.4.1", "1.2.3.4.1.9", _restamped(late, old, "1.2.3.4.1", "1.2.3.4.1.9"))
    import os
    os.utime(newer, (time.time() + 60, time.time() + 60))
    added = store.reconcile(spool.instances, lambda p: read_dataset(p, pixels=False))
    assert added == 1 and not any(Path(p).exists() for p in leftover)
    assert store.instance_paths(old) == [str(newer)] and store.study(old).state == "receiving"
