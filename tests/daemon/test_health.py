"""Heartbeats, the watchdog period from systemd's environment, the watchdog loop against a real notify socket, and
the configuration that ties them together."""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from livernode.config import load_daemon_config
from livernode.daemon.health import STEP_RETRIES, Health, Liveness, supervised, watchdog_loop, work_loop
from livernode.daemon.sdnotify import Notifier, watchdog_period
from livernode.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_watchdog_period_is_read_from_systemd_and_honours_its_pid():
    assert watchdog_period({}) is None
    assert watchdog_period({"WATCHDOG_USEC": "120000000"}) == 120.0
    assert watchdog_period({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_period({"WATCHDOG_USEC": "x"}) is None
    assert watchdog_period({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}) == 10.0
    # inherited by a child: meant for another process
    assert watchdog_period({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, pid=4242) is None


def test_liveness_tells_stuck_from_dead_from_working():
    now = [100.0]
    live = Liveness(stall_s=30, clock=lambda: now[0])
    live.watch("worker")
    live.watch("sender")
    now[0] += 29
    live.beat("worker", "study abc: infer 40/200")
    assert live.problems() == {}
    now[0] += 2  # the sender has been silent for 31 s
    assert live.problems() == {"sender": "no progress for 31 s (bound 30 s), last: starting"}
    live.beat("sender", "idle")
    live.died("worker", "ValueError: boom")
    assert live.problems() == {"worker": "thread died: ValueError: boom"}
    now[0] += 1000  # dead stays dead, whatever the clock says
    assert live.problem("worker") == "thread died: ValueError: boom"


def test_supervised_thread_that_raises_or_returns_is_marked_dead(caplog):
    live, stop = Liveness(stall_s=60), threading.Event()

    def boom():
        raise KeyError("destination")
    supervised("sender", live, stop, boom).join(5)
    supervised("worker", live, stop, lambda: None).join(5)
    assert live.problems() == {"sender": "thread died: KeyError: 'destination'",
                               "worker": "thread died: returned while the node was running"}
    assert "the sender thread stopped: KeyError" in caplog.text
    stop.set()
    supervised("folder", live, stop, lambda: None).join(5)  # returning after a stop request is the normal end
    assert "folder" not in live.problems()


def test_health_report_names_every_check_and_each_failure():
    def spool():
        raise RuntimeError("12 MB free, threshold 1024 MB")
    ok, body = Health({"model": lambda: "m.onnx on CPU", "spool": spool}).report()
    assert not ok and body["failing"] == ["spool"]
    assert body["checks"] == {"model": {"ok": True, "detail": "m.onnx on CPU"},
                              "spool": {"ok": False, "detail": "12 MB free, threshold 1024 MB"}}
    assert Health({"model": lambda: "fine"}).report()[0]


def test_watchdog_pings_only_while_every_thread_makes_progress(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    now = [0.0]
    live = Liveness(stall_s=10, clock=lambda: now[0])
    live.watch("worker")
    stop = threading.Event()
    t = threading.Thread(target=watchdog_loop, args=(Notifier(str(path)), live, 0.25, stop, lambda: "2 waiting"))
    t.start()
    try:
        def messages(seconds: float) -> list[str]:
            out, end = [], time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    out.append(sock.recv(4096).decode())
                except TimeoutError:
                    break
            return out
        first = messages(0.5)
        assert first.count("WATCHDOG=1") >= 3 and "STATUS=2 waiting" in first  # every 0.1 s: 0.4 of the period
        now[0] = 11  # the worker is stuck past its bound: no more pings, and the status says why
        messages(0.2)
        stuck = messages(0.5)
        assert "WATCHDOG=1" not in stuck and any(m.startswith("STATUS=UNHEALTHY: worker: no progress") for m in stuck)
        live.beat("worker", "infer 2/4")  # progress again: pings resume
        messages(0.2)
        assert "WATCHDOG=1" in messages(0.5)
    finally:
        stop.set()
        t.join(5)
        sock.close()


def test_config_keys_for_liveness_and_poison_studies(tmp_path):
    cfg = load_daemon_config(REPO / "config" / "livernode.toml")
    assert cfg.study.max_attempts == 3 and cfg.stall_seconds() == 120
    # unset, the bound grows with a long send timeout, so an existing config keeps working
    assert load_daemon_config(None, {"send.timeout_seconds": 90}).stall_seconds() == 210
    assert load_daemon_config(None, {"observability.stall_seconds": 300}).stall_seconds() == 300
    with pytest.raises(ConfigError, match=r"stall_seconds \(50\) must exceed twice send.timeout_seconds \(30\)"):
        load_daemon_config(None, {"observability.stall_seconds": 50})
    with pytest.raises(ConfigError, match="study.max_attempts"):
        load_daemon_config(None, {"study.max_attempts": 0})
    folder = tmp_path / "a-folder.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="a-folder.toml: cannot be read"):
        load_daemon_config(folder)


def test_work_loop_retries_a_failing_step_then_gives_up(caplog):
    live, stop, wake = Liveness(stall_s=60), threading.Event(), threading.Event()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) in (1, 2):
            raise sqlite3.OperationalError("database is locked")
        if len(calls) == 3:
            return
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        work_loop("sender", live, stop, wake, 0.001, flaky, "sending")
    # two failures, one success (which resets the count), then 1 + STEP_RETRIES failures in a row
    assert len(calls) == 3 + 1 + STEP_RETRIES
    assert caplog.text.count("trying again") == 2 + STEP_RETRIES
