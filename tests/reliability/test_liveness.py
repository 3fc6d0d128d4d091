"""Liveness from progress: a backlog worked off with systemd's watchdog fed on time over a real notify socket, and
SIGTERM in the middle of a study: the node exits between two inference batches and the study is delivered once
after the restart."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from livernode.imaging.synth import synthesize
from tests.peers import (at_pacs, free_port, log_text, metric, restamp, scrape, start_node, stop_node, storescu,
                         wait_for, wait_port)
from tests.reliability.conftest import db_rows, settled

pytestmark = pytest.mark.slow
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "livernode.service"
WATCHDOG_USEC = 10_000_000
BACKLOG = 8


class NotifySocket:
    """A datagram socket standing in for systemd's: every message with its arrival time (monotonic)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.5)
        self.messages: list[tuple[float, str]] = []
        self._open = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, line: str) -> list[float]:
        return [t for t, m in self.messages if line in m.split("\n")]

    def close(self) -> None:
        self._open = False
        self._thread.join(5)
        self.sock.close()


def _at_pacs(out, n):
    return at_pacs(out, n)


def test_backlog_keeps_the_watchdog_fed(tmp_path, exported, pacs, figure):
    pacs_port, pacs_out = pacs
    synthesize(tmp_path / "src", cases=1, slices=100, size=128, seed=41, layout="dicom")
    template = sorted((tmp_path / "src" / "case_000" / "ct").glob("*.dcm"))
    studies = [restamp(template, tmp_path / "studies" / str(i)) for i in range(BACKLOG)]
    port, state = free_port(), tmp_path / "state"
    dest = ("--port", str(port), "--destination", f"PACS@127.0.0.1:{pacs_port}")
    # Receive the whole backlog first, with a quiet period that does not end during the test ...
    node = start_node(state, exported, *dest, "--study-timeout", "3600")
    try:
        wait_port(port, node)
        storescu(port, [f for s in studies for f in s])
    finally:
        stop_node(node)
    assert db_rows(state, "SELECT count(*) FROM instances") == [(BACKLOG * len(template),)]
    # ... then start under a watchdog with every study due at once: PACS auto-routing at 7 a.m.
    notify = NotifySocket(tmp_path / "notify.sock")
    node = start_node(state, exported, *dest, "--study-timeout", "0.5",
                      env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        wait_for(lambda: notify.times("READY=1"), 120, "READY=1")
        t_ready = notify.times("READY=1")[0]
        wait_for(lambda: _at_pacs(pacs_out, 2 * BACKLOG) and settled(state), 900, "the backlog delivered")
        # The backlog ended when its last job finished (the index's clock), not when this loop noticed.
        [(finished,)] = db_rows(state, "SELECT max(finished_at) FROM jobs")
        t_done = time.monotonic() - (time.time() - finished)
    finally:
        log = stop_node(node)
        notify.close()
    pings = [t for t in notify.times("WATCHDOG=1") if t_ready <= t <= t_done]
    marks = [t_ready, *pings, t_done]
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    half = WATCHDOG_USEC / 2e6
    assert len(_at_pacs(pacs_out, 2 * BACKLOG)) == 2 * BACKLOG  # every study delivered, once
    assert db_rows(state, "SELECT count(*), min(state), max(state) FROM jobs") == [(BACKLOG, "done", "done")]
    assert pings, "no WATCHDOG=1 while the backlog was worked off"
    assert max(gaps) <= half, f"largest gap {max(gaps):.2f} s > {half} s: {[round(g, 2) for g in gaps]}"
    assert "Traceback" not in log, log[-3000:]
    figure("jobs_done", db_rows(state, "SELECT count(*) FROM jobs WHERE state = 'done'")[0][0])
    figure("backlog_seconds", round(t_done - t_ready, 1))
    figure("watchdog_pings", len(pings))
    figure("largest_gap_s", round(max(gaps), 2))


def test_sigterm_mid_study_exits_in_time_and_the_study_is_delivered_once(tmp_path, exported, pacs, figure):
    pacs_port, pacs_out = pacs
    synthesize(tmp_path / "src", cases=1, slices=200, size=128, seed=43, layout="dicom")
    files = sorted((tmp_path / "src" / "case_000" / "ct").glob("*.dcm"))
    port, metrics_port, state = free_port(), free_port(), tmp_path / "state"
    args = ("--port", str(port), "--destination", f"PACS@127.0.0.1:{pacs_port}", "--study-timeout", "0.5",
            "--metrics-port", str(metrics_port))
    # Each batch of 2 slices takes 50 ms longer: the study runs for at least 5 s on a machine of any speed.
    node = start_node(state, exported, *args, faults={"LIVERNODE_TEST_BATCH_DELAY": "0.05"})
    wait_port(port, node)
    storescu(port, files)

    def mid_study():
        value = metric(scrape(metrics_port)[1], 'livernode_study_slices{kind="inferred"}')
        return value if value and len(files) * 0.2 <= value < len(files) else None
    inferred = wait_for(mid_study, 120, "the study a fifth inferred", 0.05)
    t0 = time.monotonic()
    node.send_signal(signal.SIGTERM)
    code = node.wait(timeout=120)
    exit_s = time.monotonic() - t0
    log = log_text(node)
    assert code == 0 and "stopped cleanly" in log, log[-3000:]
    assert re.search(r"stopped mid-way \(the node is stopping \(study \w+: infer \d+/200\)\)", log), log[-3000:]
    assert db_rows(state, "SELECT generation, state FROM jobs") == [(1, "stopped")]
    assert not _at_pacs(pacs_out, 1)
    node = start_node(state, exported, *args)  # the next start takes the study up again
    try:
        got = wait_for(lambda: _at_pacs(pacs_out, 2), 180, "SEG and SR at the PACS")
        wait_for(lambda: settled(state), 60, "the study settled")
    finally:
        stop_node(node)
    assert len(got) == 2 and len(_at_pacs(pacs_out, 2)) == 2  # delivered once
    assert db_rows(state, "SELECT generation, state FROM jobs ORDER BY id") == [(1, "stopped"), (1, "done")]
    timeout_stop = float(re.search(r"^TimeoutStopSec=(\d+)", UNIT.read_text(), re.M).group(1))
    assert exit_s < timeout_stop / 2, f"{exit_s:.1f} s to exit"
    figure("slices_inferred_at_sigterm", int(inferred))
    figure("seconds_to_exit", round(exit_s, 2))


def test_a_dead_sender_under_the_watchdog_stops_the_node_for_a_restart(tmp_path, exported, figure):
    """Under systemd, a part that died makes the node stop cleanly with status 1 (Restart=on-failure starts it
    again) instead of waiting for the watchdog to abort it; meanwhile WATCHDOG=1 is withheld."""
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    node = start_node(tmp_path / "state", exported, "--port", str(port), faults={"LIVERNODE_TEST_BREAK_SENDER": "1"},
                      env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        code = node.wait(timeout=120)
    finally:
        if node.poll() is None:
            node.kill()
        notify.close()
    log = log_text(node)
    assert code == 1, log[-3000:]
    assert "stopping so that systemd restarts the node: sender: thread died: RuntimeError: injected" in log
    assert notify.times("READY=1") and notify.times("STOPPING=1")
    died = re.search(r"the sender thread stopped", log)
    assert died, log[-3000:]
    figure("exit_status", code)
