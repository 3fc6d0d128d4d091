"""Receiver processes (`node.workers` > 1): C-STORE beyond one interpreter lock.

The node binds its listening socket once and hands it to N receiver processes, each a StoreSCP accepting on that
same socket; the kernel gives every connection to exactly one of them, so an association is served whole by one
process. They write into the same spool and index as a single receiver would (SQLite in WAL mode takes writers
from several processes; the spool never replaces a file, so two processes storing one SOP Instance UID store it
once), and answer 0x0000 only after the instance is fsynced and indexed, as before. Their counters go to
prometheus-client's multiprocess files, which the node's /metrics adds to its own.

The node keeps everything else: it recovers the spool and the index before any receiver starts, runs the worker
and the sender, restarts a receiver that dies, and on stop shuts the socket down (no new associations anywhere),
then lets each receiver finish the associations it is serving. A receiver dies with the node (PR_SET_PDEATHSIG),
so a node killed with SIGKILL leaves nothing that holds its port.

Receivers are started with the "spawn" method: a forked copy of a node that already runs ONNX Runtime and
several threads is not safe."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
# A receiver asked to stop finishes the associations it is serving for at most this long.
FINISH_S = 30.0


@dataclass(frozen=True)
class ReceiverSpec:
    """What a receiver process needs, in a form that crosses the process boundary."""

    ae_title: str
    allowed_calling: tuple[str, ...]
    require_called: bool
    tls: tuple[str, str, str | None] | None  # cert, key, CA files
    spool: str
    index: str
    audit: tuple[str, int, int] | None  # path, max bytes, backups
    metrics_dir: str
    log_format: str
    log_level: int


def default_workers() -> int:
    """The number of cores this process may run on, at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's stop and the ppid check below remain
        pass


def _receiver(spec: ReceiverSpec, listener: socket.socket, min_free, parent: int) -> None:
    """A receiver process: serve C-STORE on `listener` until SIGTERM or the parent is gone."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = spec.metrics_dir
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # before any metric of this process exists
    from livernode.cli import configure_logging
    from livernode.daemon.ingest_scp import StoreSCP, server_tls_context
    from livernode.daemon.metrics import AuditLog, Metrics
    from livernode.daemon.spool import Spool
    from livernode.daemon.store import Store

    configure_logging(spec.log_format, spec.log_level)
    spool = Spool(Path(spec.spool))
    spool.share_threshold(min_free, owner=False)
    audit = AuditLog(Path(spec.audit[0]), spec.audit[1], spec.audit[2]) if spec.audit else AuditLog(None)
    tls = server_tls_context(*spec.tls) if spec.tls else None
    host, port = listener.getsockname()[:2]
    scp = StoreSCP(spec.ae_title, host, port, spool, Store(Path(spec.index)), metrics=Metrics(), audit=audit,
                   allowed_calling=spec.allowed_calling, require_called=spec.require_called, tls=tls,
                   listen_socket=listener)
    scp.start()
    while not stop.wait(0.5):
        if os.getppid() != parent:
            break
    scp.stop()  # this process stops accepting; the socket stays open in the others
    deadline = time.monotonic() + FINISH_S
    while scp.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    left = len(scp.ae.active_associations)
    if left:
        log.error("receiver %d: %d association(s) still open after %.0f s; stopping without them", os.getpid(),
                  left, FINISH_S)


class ReceiverPool:
    """N receiver processes on one listening socket; the same face as a StoreSCP to the rest of the node
    (`start`, `stop`, `listening`, `host`, `port`)."""

    def __init__(self, workers: int, host: str, port: int, spec: ReceiverSpec, min_free_bytes: int) -> None:
        self.workers, self.host, self.port, self.spec = workers, host, port, spec
        self._ctx = mp.get_context("spawn")
        self.min_free = self._ctx.Value("q", min_free_bytes, lock=False)
        self.socket: socket.socket | None = None
        self.processes: list[mp.process.BaseProcess] = []
        self.restarts = 0
        self._stopping = False
        self._lock = threading.Lock()

    def start(self) -> None:
        metrics_dir = Path(self.spec.metrics_dir)
        shutil.rmtree(metrics_dir, ignore_errors=True)  # counts of an earlier run (the node's own start over)
        metrics_dir.mkdir(parents=True)
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        # Every receiver waits on the socket; one takes each connection and the others' accept() returns at once
        # instead of blocking until the next one (the flag belongs to the socket, so all receivers share it).
        sock.setblocking(False)
        self.socket, self.port = sock, sock.getsockname()[1]
        self.processes = [self._spawn(i) for i in range(self.workers)]
        log.info("C-STORE on %s:%d served by %d receiver processes (%s)%s", self.host, self.port, self.workers,
                 ", ".join(str(p.pid) for p in self.processes), " (TLS)" if self.spec.tls else "")

    def _spawn(self, i: int) -> mp.process.BaseProcess:
        p = self._ctx.Process(target=_receiver, name=f"livernode-receiver-{i}",
                              args=(self.spec, self.socket, self.min_free, os.getpid()), daemon=True)
        p.start()
        return p

    def tend(self) -> None:
        """From the node's main thread: start again a receiver that died (its associations in progress were never
        acknowledged further than what is on disk and in the index)."""
        with self._lock:
            if self._stopping or self.socket is None:
                return
            for i, p in enumerate(self.processes):
                if not p.is_alive():
                    log.error("receiver process %d exited with status %s; starting another", p.pid, p.exitcode)
                    p.join(0)
                    self.processes[i] = self._spawn(i)
                    self.restarts += 1

    def listening(self) -> bool:
        sock = self.socket
        return sock is not None and sock.fileno() >= 0 and all(p.is_alive() for p in self.processes)

    def dead(self) -> list[int]:
        return [p.pid for p in self.processes if not p.is_alive()]

    def stop(self, timeout: float = FINISH_S + 5) -> None:
        """No new associations from now on; the receivers finish the ones they are serving, then exit."""
        with self._lock:
            self._stopping = True
            sock, self.socket = self.socket, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # every receiver's accept ends: new connections are refused
        except OSError:
            pass
        sock.close()
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("receiver process %d did not stop; killing it", p.pid)
                p.kill()
                p.join(5)
