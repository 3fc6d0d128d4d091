"""Disk pressure: below the free-space threshold C-STORE answers 0xA700 and writes nothing, the watched folder
leaves files where they are; once space returns both take instances again, without a restart.

The pressure is real: a ballast file is allocated on the spool's own filesystem until free space is under the
threshold, and deleted again."""

from __future__ import annotations

import os
import shutil

from livernode.daemon.ingest_folder import FolderIngest
from livernode.daemon.ingest_scp import StoreSCP
from livernode.daemon.metrics import AuditLog
from livernode.daemon.spool import Spool
from livernode.daemon.store import Store
from tests.peers import storescu
from tests.reliability.conftest import audit_events

MARGIN = 256 << 20  # the threshold sits this far below the free space at the start


def _ballast(path, size: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def test_disk_pressure_refuses_then_recovers_without_restart(tmp_path, synth_dirs, figure):
    files = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))
    threshold = shutil.disk_usage(tmp_path).free - MARGIN
    spool = Spool(tmp_path / "spool", min_free_bytes=threshold)
    store = Store(tmp_path / "index.sqlite")
    scp = StoreSCP("LIVERNODE", "127.0.0.1", 0, spool, store, audit=AuditLog(tmp_path / "audit.jsonl"))
    folder = FolderIngest(tmp_path / "inbox", spool, store, tmp_path / "rejected")
    scp.start()
    try:
        storescu(scp.port, files[:2])  # room: stored
        _ballast(tmp_path / "ballast", 2 * MARGIN)
        free_under = shutil.disk_usage(tmp_path).free
        assert free_under < threshold
        r = storescu(scp.port, files[2:4], "--no-halt", check=False)
        assert r.stderr.count("Refused: OutOfResources") == 2, r.stderr[-2000:]
        shutil.copy(files[4], tmp_path / "inbox" / "a.dcm")
        folder.scan(now=0)
        folder.scan(now=10)
        assert (tmp_path / "inbox" / "a.dcm").exists()  # kept for later, not rejected
        stored = [p for p in spool.instances.rglob("*") if p.is_file()]
        assert len(stored) == 2 and not [p for p in stored if p.name.endswith(".tmp")]
        (tmp_path / "ballast").unlink()  # space returns ...
        storescu(scp.port, files[2:4])  # ... and the same running SCP takes instances again
        folder.scan(now=20)
        folder.scan(now=30)
        assert not (tmp_path / "inbox" / "a.dcm").exists()
        after = len([p for p in spool.instances.rglob("*.dcm")])
        assert after == 5
    finally:
        scp.stop()
        (tmp_path / "ballast").unlink(missing_ok=True)
    refused = [e for e in audit_events(tmp_path / "audit.jsonl") if e["event"] == "instance_refused"]
    assert [e["status"] for e in refused] == ["0xA700", "0xA700"]
    figure("free_under_pressure_mb_and_threshold_mb", [round(free_under / 2**20), round(threshold / 2**20)])
    figure("refused_a700", len(refused))
    figure("stored_after_space_returned", after - 2)
