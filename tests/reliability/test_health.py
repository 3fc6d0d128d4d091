"""/healthz tells the truth: 200 with every check named while the node works; 503 naming the failing check when
the spool is under its free-space threshold (a real ballast file), when the index cannot be written, when the
sender thread has died and when the port is closed."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import pytest

from tests.peers import scrape, wait_for

pytestmark = pytest.mark.slow
MARGIN = 1 << 30  # the threshold sits this far below the free space at the start
CHECKS = ["index", "listener", "model", "retention", "sender", "spool", "worker"]


def _health(node) -> tuple[int, dict]:
    code, body = scrape(node.http.server_address[1], "/healthz")
    return code, json.loads(body)


def _failing(node, *names: str):
    code, body = _health(node)
    return body if code == 503 and body["failing"] == list(names) else None


def test_healthz_names_each_failing_check(running_node, tmp_path, figure):
    threshold_mb = (shutil.disk_usage(tmp_path).free - MARGIN) / 1e6
    node = running_node(study__min_free_mb=threshold_mb)
    code, body = wait_for(lambda: (r := _health(node))[0] == 200 and r, 30, "a healthy node")
    assert sorted(body["checks"]) == CHECKS and body["failing"] == []
    assert all(c["ok"] and c["detail"] for c in body["checks"].values())
    seen = {"healthy": code}

    fd = os.open(tmp_path / "ballast", os.O_CREAT | os.O_WRONLY, 0o600)  # real disk pressure ...
    try:
        os.posix_fallocate(fd, 0, 2 * MARGIN)
    finally:
        os.close(fd)
    try:
        spool = wait_for(lambda: _failing(node, "spool"), 10, "503 naming the spool")
    finally:
        (tmp_path / "ballast").unlink()
    assert "MB free, threshold" in spool["checks"]["spool"]["detail"]
    seen["spool below threshold"] = 503
    wait_for(lambda: _health(node)[0] == 200, 10, "200 once the space is back")  # ... and its end

    lock = sqlite3.connect(tmp_path / "state" / "index.sqlite", timeout=1, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # a writer that holds the index and never lets go
    try:
        index = wait_for(lambda: _failing(node, "index"), 10, "503 naming the index")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert "locked" in index["checks"]["index"]["detail"]
    seen["index locked"] = 503
    wait_for(lambda: _health(node)[0] == 200, 10, "200 once the index is free")

    def broken():
        raise RuntimeError("injected: the sender hit a bug outside any one item")
    node.sender.send_due = broken  # the next pass of the sender thread raises at its top
    node.sender.wake.set()
    sender = wait_for(lambda: _failing(node, "sender"), 10, "503 naming the sender")
    assert sender["checks"]["sender"]["detail"] == "thread died: RuntimeError: injected: the sender hit a bug " \
                                                   "outside any one item"
    assert "sender" in node.liveness.problems()  # so the watchdog is withheld too
    seen["sender thread died"] = 503

    node.listeners.close_port()
    listener = wait_for(lambda: _failing(node, "listener", "sender"), 10, "503 naming the listener")
    assert "is not accepting associations" in listener["checks"]["listener"]["detail"]
    seen["port closed"] = 503
    figure("statuses", seen)
