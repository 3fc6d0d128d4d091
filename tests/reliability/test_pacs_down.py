"""The PACS is down, refuses, hangs or fails half-way: results wait in the outbox with exponential backoff,
survive a restart, become dead letters after max_attempts, and `livernode retry` delivers them later. A send that
fails part-way is never marked delivered."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage

from livernode.config import load_daemon_config
from livernode.daemon.service import Service
from tests.peers import ENV, free_port, start_storescp, stop_process, storescu

pytestmark = pytest.mark.slow
BACKOFF_S, MAX_ATTEMPTS, TIMEOUT_S = 0.5, 4, 2.0


@pytest.fixture()
def make_service(tmp_path, exported):
    made = []

    def make(dest_port: int) -> Service:
        cfg = load_daemon_config(None, {
            "inference.model": exported, "inference.providers": "cpu", "node.port": 0, "node.bind": "127.0.0.1",
            "paths.state": tmp_path / "state", "study.quiet_seconds": 0, "observability.metrics_port": None,
            "send.destinations": [f"PACS@127.0.0.1:{dest_port}"], "send.backoff_seconds": BACKOFF_S,
            "send.max_attempts": MAX_ATTEMPTS, "send.timeout_seconds": TIMEOUT_S})
        s = Service(cfg)
        s.start()
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def _outbox(service) -> list[tuple]:
    """(state, attempts, next_attempt_at, last_error) per item."""
    return [(r[4], r[5], r[6], r[7]) for r in service.store.outbox()]


def _wait_due(service) -> None:
    due = min(r[2] for r in _outbox(service))
    time.sleep(max(0.0, due - time.time()) + 0.05)


def _study(trained_run, case: str):
    root, _ = trained_run
    files = sorted((root / "data" / case / "ct").glob("*.dcm"))
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_pacs_down_backoff_restart_dead_letter_and_retry(make_service, trained_run, tmp_path, figure):
    files, study = _study(trained_run, "case_000")
    pacs_port = free_port()  # nothing listens yet: connection refused
    node = make_service(pacs_port)
    storescu(node.scp.port, files)
    node.run_once()  # processes the study, the send is refused
    items = _outbox(node)
    assert [(s, a) for s, a, _, _ in items] == [("pending", 1), ("pending", 1)]
    assert "association failed" in items[0][3]
    assert items[0][2] - time.time() == pytest.approx(BACKOFF_S, abs=0.3)
    node.run_once()  # not due yet: no new attempt
    assert [a for _, a, _, _ in _outbox(node)] == [1, 1]
    _wait_due(node)
    node.run_once()
    second = _outbox(node)
    assert [a for _, a, _, _ in second] == [2, 2]
    assert second[0][2] - time.time() == pytest.approx(2 * BACKOFF_S, abs=0.3)  # the delay doubles

    # Now the PACS accepts the connection and never answers: the attempt ends after the configured timeout.
    hang = socket.socket()
    hang.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hang.bind(("127.0.0.1", pacs_port))
    hang.listen(8)
    _wait_due(node)
    t = time.monotonic()
    node.run_once()
    hung_s = time.monotonic() - t
    assert [a for _, a, _, _ in _outbox(node)] == [3, 3]
    assert hung_s < TIMEOUT_S * 3
    hang.close()

    # Restart: the outbox is on disk.
    node.stop()
    node = make_service(pacs_port)
    assert [(s, a) for s, a, _, _ in _outbox(node)] == [("pending", 3), ("pending", 3)]
    _wait_due(node)
    node.run_once()  # the 4th attempt fails too: dead letters
    assert [(s, a) for s, a, _, _ in _outbox(node)] == [("dead", 4), ("dead", 4)]

    # The PACS comes back; dead letters wait for an operator ...
    pacs_out = tmp_path / "pacs"
    pacs = start_storescp(pacs_port, pacs_out)
    try:
        node.run_once()
        assert not list(pacs_out.iterdir())
        r = subprocess.run([sys.executable, "-m", "livernode.cli", "retry", study, "--state", str(tmp_path / "state")],
                           capture_output=True, text=True, env=ENV, timeout=60)
        assert r.returncode == 0 and "2 outbox item(s) queued" in r.stdout, r.stderr
        node.run_once()  # ... and `livernode retry` delivers them
    finally:
        stop_process(pacs)
    assert [s for s, _, _, _ in _outbox(node)] == ["sent", "sent"]
    assert sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in pacs_out.iterdir()) == ["SEG", "SR"]
    assert node.store.study(study).generation == 1  # never reprocessed, only resent
    figure("attempts_before_dead_letter", MAX_ATTEMPTS)
    figure("backoff_s", [BACKOFF_S, 2 * BACKOFF_S])
    figure("hung_pacs_attempt_s", round(hung_s, 2))
    figure("delivered_after_retry", 2)


def test_pacs_aborting_mid_send_is_not_delivered(make_service, trained_run, tmp_path, figure):
    files, study = _study(trained_run, "case_001")
    pacs_port, pacs_out = free_port(), tmp_path / "pacs"
    pacs = start_storescp(pacs_port, pacs_out, "--abort-after")  # aborts after receiving the first C-STORE
    try:
        node = make_service(pacs_port)
        storescu(node.scp.port, files)
        node.run_once()
    finally:
        stop_process(pacs)
    items = _outbox(node)
    assert [s for s, _, _, _ in items] == ["pending", "pending"], items
    assert "no response" in items[0][3] or "connection lost" in items[0][3], items[0][3]
    pacs = start_storescp(pacs_port, pacs_out)  # a healthy PACS: the next attempt delivers
    try:
        _wait_due(node)
        node.run_once()
    finally:
        stop_process(pacs)
    assert [s for s, _, _, _ in _outbox(node)] == ["sent", "sent"]
    figure("state_after_abort", "pending")


def test_one_instance_refused_means_not_delivered(make_service, trained_run, figure):
    files, study = _study(trained_run, "case_002")
    got = []

    def on_store(event):
        got.append(str(event.request.AffectedSOPClassUID))
        return 0xA700 if event.request.AffectedSOPClassUID == Comprehensive3DSRStorage else 0x0000
    ae = AE(ae_title="PACS")
    for sop_class in (SegmentationStorage, Comprehensive3DSRStorage):
        ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node = make_service(server.server_address[1])
        storescu(node.scp.port, files)
        node.run_once()
    finally:
        server.shutdown()
    items = _outbox(node)
    assert len(got) == 2  # the SEG was stored, the SR refused ...
    assert [s for s, _, _, _ in items] == ["pending", "pending"]  # ... so the study is not delivered
    assert any("refused with status 0xA700" in e for _, _, _, e in items)
    figure("pacs_statuses", ["0x0000 (SEG)", "0xA700 (SR)"])
    figure("state_after", "pending")
