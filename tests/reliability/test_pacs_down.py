"""The PACS is down, refuses, hangs or fails half-way: results wait in the outbox with exponential backoff,
survive a restart, become dead letters after max_attempts, and `livernode retry` delivers them later. An instance
is marked delivered only when the PACS answered its own C-STORE with success."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pydicom
import pytest
from pynetdicom.sop_class import Comprehensive3DSRStorage

from livernode.config import load_daemon_config
from livernode.daemon.service import Service
from tests.peers import ENV, RECEIVERS, PacsStandIn, free_port, start_storescp, stop_process, storescu

pytestmark = pytest.mark.slow
BACKOFF_S, MAX_ATTEMPTS, TIMEOUT_S = 0.5, 4, 2.0


@pytest.fixture()
def make_service(tmp_path, exported):
    made = []

    def make(dest_port: int) -> Service:
        cfg = load_daemon_config(None, {
            "inference.model": exported, "inference.providers": "cpu", "node.port": 0, "node.bind": "127.0.0.1",
            "paths.state": tmp_path / "state", "study.quiet_seconds": 0, "observability.metrics_port": 0,
            "send.destinations": [f"PACS@127.0.0.1:{dest_port}"], "send.backoff_seconds": BACKOFF_S,
            "send.max_attempts": MAX_ATTEMPTS, "send.timeout_seconds": TIMEOUT_S, "node.workers": int(RECEIVERS)})
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
    node.run_once(send=False)  # processes the study
    t0 = time.time()
    node.sender.send_due()  # the send is refused
    t1 = time.time()
    items = _outbox(node)
    assert [(s, a) for s, a, _, _ in items] == [("pending", 1), ("pending", 1)]
    assert "association failed" in items[0][3]
    assert t0 + BACKOFF_S <= items[0][2] <= t1 + BACKOFF_S  # the next attempt waits one backoff
    delays = [round(items[0][2] - (t0 + t1) / 2, 2)]  # measured: from the attempt to the next one it allows
    assert not node.store.due_outbox(now=items[0][2] - 0.01)  # not due before the backoff ends ...
    assert len(node.store.due_outbox(now=items[0][2])) == 2  # ... and due from then on
    _wait_due(node)
    t0 = time.time()
    node.sender.send_due()
    t1 = time.time()
    second = _outbox(node)
    assert [a for _, a, _, _ in second] == [2, 2]
    assert t0 + 2 * BACKOFF_S <= second[0][2] <= t1 + 2 * BACKOFF_S  # the delay doubles
    delays.append(round(second[0][2] - (t0 + t1) / 2, 2))

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
    dead_after = max(a for _, a, _, _ in _outbox(node))

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
    figure("attempts_before_dead_letter", dead_after)
    figure("backoff_s", delays)
    figure("hung_pacs_attempt_s", round(hung_s, 2))
    figure("delivered_after_retry", len(list(pacs_out.iterdir())))


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
    figure("states_after_abort", [s for s, _, _, _ in items])


def test_one_instance_refused_means_not_delivered(make_service, trained_run, figure):
    files, study = _study(trained_run, "case_002")
    server = PacsStandIn(status=lambda event: 0xA700 if event.request.AffectedSOPClassUID ==
                         Comprehensive3DSRStorage else 0x0000)
    try:
        node = make_service(server.port)
        storescu(node.scp.port, files)
        node.run_once()
    finally:
        server.shutdown()
    got = server.received
    items = {pydicom.dcmread(r[3], stop_before_pixels=True).Modality: (r[4], r[7]) for r in node.store.outbox()}
    assert len(got) == 2  # the SEG was stored, the SR refused ...
    assert items["SEG"] == ("sent", "")  # ... so the SEG is delivered and the SR waits for its next attempt
    assert items["SR"][0] == "pending" and "sr.dcm refused with status 0xA700" in items["SR"][1], items
    figure("pacs_received", len(got))
    figure("states_after", {k: v[0] for k, v in items.items()})
