"""The node's health: heartbeats of its long-lived threads, the checks behind /healthz, the HTTP endpoint that
serves them beside prometheus-client's /metrics, and a systemd watchdog fed only while the node makes progress."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from livernode.daemon.sdnotify import Notifier

log = logging.getLogger(__name__)


@dataclass
class _Beat:
    at: float  # time.monotonic() of the last progress
    doing: str
    died: str = ""


class Liveness:
    """Heartbeats of the long-lived threads. A thread beats whenever it makes progress (a file read, an inference
    batch, a stage, a send attempt) and whenever it finds nothing to do; one that has not beaten for `stall_s`
    is stuck, and one that died says why. Thread-safe: a beat is one assignment."""

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s, self._clock = stall_s, clock
        self._beats: dict[str, _Beat] = {}

    def watch(self, name: str) -> None:
        self._beats[name] = _Beat(self._clock(), "starting")

    def beat(self, name: str, doing: str = "") -> None:
        self._beats[name] = _Beat(self._clock(), doing)

    def died(self, name: str, reason: str) -> None:
        old = self._beats.get(name)
        self._beats[name] = _Beat(old.at if old else self._clock(), old.doing if old else "", reason)

    def problem(self, name: str) -> str:
        """Why `name` is not live, or '' when it is."""
        b = self._beats[name]
        if b.died:
            return f"thread died: {b.died}"
        idle = self._clock() - b.at
        if idle > self.stall_s:
            return f"no progress for {idle:.0f} s (bound {self.stall_s:g} s), last: {b.doing or '-'}"
        return ""

    def problems(self) -> dict[str, str]:
        return {name: p for name in list(self._beats) if (p := self.problem(name))}

    def describe(self, name: str) -> str:
        b = self._beats[name]
        return f"progress {self._clock() - b.at:.1f} s ago: {b.doing or '-'}"

    def names(self) -> list[str]:
        return list(self._beats)


# A step that raises (the index locked past its timeout, a full disk) is tried again this many times, with a
# doubling pause, before the thread gives up and the node turns unhealthy.
STEP_RETRIES = 3


def work_loop(name: str, liveness: Liveness, stop: threading.Event, wake: threading.Event, poll_s: float,
              step: Callable[[], object], what: str, next_in: Callable[[], float | None] | None = None) -> None:
    """Until `stop`: `step()`, then wait for `wake` or `poll_s`, or less when `next_in()` says work falls due
    sooner (seconds). Beats before and after each step: finding nothing to do is progress too, and the step itself
    beats as it works. A step that keeps raising ends the loop with its exception after STEP_RETRIES further
    tries."""
    failures = 0
    while not stop.is_set():
        liveness.beat(name, what)
        try:
            step()
            failures = 0
        except Exception as exc:
            failures += 1
            if failures > STEP_RETRIES:
                raise
            pause = poll_s * 2 ** failures
            log.error("the %s thread: %s: %s; trying again in %.1f s (%d of %d)", name, type(exc).__name__, exc,
                      pause, failures, STEP_RETRIES, exc_info=True)
            liveness.beat(name, f"retrying after {type(exc).__name__}")
            stop.wait(pause)
            continue
        liveness.beat(name, "idle")
        soon = next_in() if next_in is not None else None
        wake.wait(poll_s if soon is None else min(poll_s, max(0.005, soon)))
        wake.clear()


def supervised(name: str, liveness: Liveness, stop: threading.Event, target: Callable[[], None]) -> threading.Thread:
    """A started daemon thread running `target`, watched by `liveness`. Whatever ends it before `stop` is set (an
    exception, or returning) is logged with the reason and marks it dead, so the node is unhealthy at once."""
    liveness.watch(name)

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - the top of a thread: nothing above us would log it
            log.critical("the %s thread stopped: %s: %s", name, type(exc).__name__, exc, exc_info=True)
            liveness.died(name, f"{type(exc).__name__}: {exc}")
            return
        if not stop.is_set():
            log.critical("the %s thread returned while the node was running", name)
            liveness.died(name, "returned while the node was running")

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


class Health:
    """Named checks. Each returns a short detail when it passes and raises with the reason when it fails."""

    def __init__(self, checks: dict[str, Callable[[], str]]) -> None:
        self.checks = checks

    def report(self) -> tuple[bool, dict]:
        results = {}
        for name, check in self.checks.items():
            try:
                results[name] = {"ok": True, "detail": check()}
            except Exception as exc:  # noqa: BLE001 - a failing check is a result, not an error of ours
                results[name] = {"ok": False, "detail": str(exc) or type(exc).__name__}
        ok = all(r["ok"] for r in results.values())
        failing = [n for n, r in results.items() if not r["ok"]]
        return ok, {"status": "ok" if ok else "failing", "failing": failing, "checks": results}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
        pass


def serve_http(host: str, port: int, registry: CollectorRegistry, health: Health,
               before_scrape: Callable[[], None] = lambda: None) -> WSGIServer:
    """/metrics from prometheus-client's own WSGI app (after `before_scrape()` refreshes the gauges that are read
    from the index), /healthz (200 or 503, JSON naming every check) beside it, on a thread per request; returns
    the running server (`.shutdown()` stops it)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            try:
                before_scrape()
            except Exception as exc:  # noqa: BLE001 - stale gauges are better than no metrics
                log.warning("gauges not refreshed for this scrape: %s", exc)
            return metrics_app(environ, start_response)
        if path == "/healthz":
            ok, body = health.report()
            data = (json.dumps(body, indent=1) + "\n").encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, health on /healthz", host, server.server_address[1])
    return server


# Pings go out a little more often than every half period, so scheduling jitter never stretches a gap past the half
# that systemd documents as the interval to keep.
PING_SHARE = 0.4
STATUS_PERIOD_S = 5.0


def watchdog_loop(notifier: Notifier, liveness: Liveness, period: float | None, stop: threading.Event,
                  status: Callable[[], str]) -> None:
    """Feed systemd's watchdog (WATCHDOG=1) while every watched thread is live, and say what the node is doing
    (STATUS=). A stuck or dead thread withholds the ping, so systemd restarts the node; only such a node."""
    interval = period * PING_SHARE if period else STATUS_PERIOD_S
    withheld: set[str] = set()
    while True:
        problems = liveness.problems()
        if not problems and period:
            notifier.watchdog()
        if set(problems) != withheld:
            if problems:
                log.error("withholding WATCHDOG=1: %s", "; ".join(f"{n}: {p}" for n, p in problems.items()))
            else:
                log.warning("every thread makes progress again; WATCHDOG=1 resumed")
            withheld = set(problems)
        try:
            notifier.status(status() if not problems else
                            "UNHEALTHY: " + "; ".join(f"{n}: {p}" for n, p in problems.items()))
        except Exception as exc:  # noqa: BLE001 - a status line must never stop the pings
            log.debug("status line failed: %s", exc)
        if stop.wait(interval):
            return
