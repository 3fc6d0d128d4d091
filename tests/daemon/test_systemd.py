"""The unit file's hardening score, and the sd_notify lifecycle against a real notify socket."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers import free_port, log_text, logged_popen, wait_for

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "livernode.service"


def test_unit_exposure_score_is_at_most_2_5():
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for livernode.service: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5
    text = UNIT.read_text()
    for directive in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=", "LogsDirectory=",
                      "ProtectSystem=strict", "CapabilityBoundingSet=\n", "DevicePolicy=closed",
                      "DeviceAllow=/dev/nvidiactl", "SystemCallFilter=@system-service", "ExecReload="):
        assert directive in text, directive


@pytest.mark.slow
def test_ready_watchdog_status_reload_and_stopping(tmp_path, exported):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    port = free_port()
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="2000000")
    proc = logged_popen([sys.executable, "-m", "livernode.cli", "serve", "--model", str(exported), "--providers",
                         "cpu", "--port", str(port), "--bind", "127.0.0.1", "--state", str(tmp_path / "st"),
                         "--metrics-port", "0"], tmp_path / "node.log", env)
    try:
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1"), first
        with socket.socket() as c:  # READY only once the listener is bound
            assert c.connect_ex(("127.0.0.1", port)) == 0
        seen = set()
        end = time.monotonic() + 30
        while not {"WATCHDOG=1", "STATUS"} <= seen and time.monotonic() < end:
            msg = sock.recv(4096).decode()
            seen.add("WATCHDOG=1" if msg == "WATCHDOG=1" else msg.split("=")[0])
            if msg.startswith("STATUS="):
                assert "studies waiting" in msg
        assert {"WATCHDOG=1", "STATUS"} <= seen
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in log_text(proc), 30, "the reload")
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 30
        msg = ""
        while msg != "STOPPING=1" and time.monotonic() < end:
            msg = sock.recv(4096).decode()
        assert msg == "STOPPING=1"
        code = proc.wait(timeout=30)
        err = log_text(proc)
        assert code == 0, err[-3000:]
        assert "configuration reloaded" in err and "stopped cleanly" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
