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

from livernode.daemon.upper_layer import listening_socket
from livernode.errors import LivernodeError

log = logging.getLogger(__name__)
# A receiver asked to stop finishes the associations it is serving for at most this long.
FINISH_S = 30.0
# A receiver that dies sooner than this after its start died "quickly": those are restarted with a growing delay.
RESTART_GRACE_S = 10.0


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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def die_with_parent(parent: int) -> bool:
    """Ask for SIGKILL when the node dies; False when it already has."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's stop and the ppid check below remain
        pass
    return os.getppid() == parent


def _receiver(spec: ReceiverSpec, listener: socket.socket, threshold, parent: int, ready) -> None:
    """A receiver process: serve C-STORE on `listener` until SIGTERM or the parent is gone."""
    if not die_with_parent(parent):
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))  # only a flag: the loop below acts on it
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = spec.metrics_dir
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # before any metric of this process exists
    from livernode.daemon.ingest_scp import StoreSCP, server_tls_context
    from livernode.daemon.metrics import AuditLog, Metrics
    from livernode.daemon.spool import Spool
    from livernode.daemon.store import Store
    from livernode.logs import configure_logging

    configure_logging(spec.log_format, spec.log_level)
    spool = Spool(Path(spec.spool), threshold=threshold)  # the node's, shared: a reload reaches this process
    audit = AuditLog(Path(spec.audit[0]), spec.audit[1], spec.audit[2]) if spec.audit else AuditLog(None)
    tls = server_tls_context(*spec.tls) if spec.tls else None
    host, port = listener.getsockname()[:2]
    scp = StoreSCP(spec.ae_title, host, port, spool, Store(Path(spec.index)), metrics=Metrics(), audit=audit,
                   allowed_calling=spec.allowed_calling, require_called=spec.require_called, tls=tls,
                   listen_socket=listener)
    scp.start()
    ready.value = 1
    while not stopping and os.getppid() == parent and scp.listening():  # the node restarts one that stopped
        time.sleep(0.2)
    scp.stop()  # this process stops accepting; the socket stays open in the others
    # Associations under way finish (for at most FINISH_S); a connection that has not asked for one yet is simply
    # dropped when this process exits, as is anything never acknowledged.
    scp.finish(FINISH_S)
    logging.shutdown()
    os._exit(0)  # nothing left to wait for: associations still open were aborted above


@dataclass(eq=False)
class _Slot:
    """One receiver's place in the pool: the process now in it (None while a restart is due) and its start flag,
    kept referenced here (a flag collected before its process has read it would be gone)."""

    process: mp.process.BaseProcess | None = None
    ready: object = None  # a shared byte, set by the receiver once it accepts
    started_at: float = 0.0
    due: float = 0.0  # when a receiver that died is started again
    quick_deaths: int = 0  # deaths in a row within RESTART_GRACE_S of a start


class ReceiverPool:
    """N receiver processes on one listening socket; the same face as a StoreSCP to the rest of the node
    (`start`, `stop`, `listening`, `host`, `port`)."""

    def __init__(self, workers: int, host: str, port: int, spec: ReceiverSpec, threshold) -> None:
        """`threshold`: the node's Spool.threshold, read by every receiver."""
        self.workers, self.host, self.port, self.spec, self.threshold = workers, host, port, spec, threshold
        self._ctx = mp.get_context("spawn")
        self.socket: socket.socket | None = None
        self.slots = [_Slot() for _ in range(workers)]
        self.restarts = 0
        self._stopping = False
        self._lock = threading.Lock()

    @property
    def processes(self) -> list[mp.process.BaseProcess | None]:
        return [slot.process for slot in self.slots]

    def start(self, timeout: float = 60.0) -> None:
        """Bind the port and start the receivers; returns once every one accepts, or raises naming the one that
        could not start (its reason is in the log above)."""
        metrics_dir = Path(self.spec.metrics_dir)
        shutil.rmtree(metrics_dir, ignore_errors=True)  # counts of an earlier run (the node's own start over)
        metrics_dir.mkdir(parents=True)
        sock = listening_socket(self.host, self.port)
        # Every receiver waits on the socket; one takes each connection and the others' accept() returns at once
        # instead of blocking until the next one (the flag belongs to the socket, so all receivers share it).
        sock.setblocking(False)
        self.socket, self.port = sock, sock.getsockname()[1]
        for i, slot in enumerate(self.slots):
            self._spawn(i, slot, time.monotonic())
        end = time.monotonic() + timeout
        for slot in self.slots:
            while not slot.ready.value:
                time.sleep(0.05)
                p = slot.process
                if not p.is_alive() or time.monotonic() > end:
                    self.stop()
                    raise LivernodeError(f"receiver process {p.pid} did not start (exit status {p.exitcode}); "
                                         "its log lines above say why")
        log.info("C-STORE on %s:%d served by %d receiver processes (%s)%s", self.host, self.port, self.workers,
                 ", ".join(str(p.pid) for p in self.processes), " (TLS)" if self.spec.tls else "")

    def _spawn(self, i: int, slot: _Slot, now: float) -> None:
        slot.ready = self._ctx.Value("b", 0, lock=False)
        slot.process = self._ctx.Process(target=_receiver, name=f"livernode-receiver-{i}",
                                         args=(self.spec, self.socket, self.threshold, os.getpid(), slot.ready),
                                         daemon=True)
        slot.process.start()
        slot.started_at = now

    def tend(self) -> None:
        """From the node's main thread: start again a receiver that died (what it had answered 0x0000 is on disk
        and indexed; the rest of its associations was never acknowledged). One that keeps dying soon after its
        start is started again less and less often: after 1 s, 2 s, ... up to a minute."""
        with self._lock:
            if self._stopping or self.socket is None:
                return
            now = time.monotonic()
            for i, slot in enumerate(self.slots):
                p = slot.process
                if p is not None and p.is_alive():
                    continue
                if p is not None:  # it has just died
                    quick = now - slot.started_at < RESTART_GRACE_S
                    slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
                    delay = min(60.0, 2.0 ** (slot.quick_deaths - 1)) if slot.quick_deaths else 0.0
                    log.error("receiver process %d exited with status %s; starting another%s", p.pid, p.exitcode,
                              f" in {delay:.0f} s" if delay else "")
                    p.join(0)
                    p.close()
                    slot.process, slot.due = None, now + delay
                if now >= slot.due:
                    self._spawn(i, slot, now)
                    self.restarts += 1

    def listening(self) -> bool:
        sock = self.socket
        return sock is not None and sock.fileno() >= 0 and all(p is not None and p.is_alive()
                                                               for p in self.processes)

    def dead(self) -> list[str]:
        return ["(waiting to restart)" if p is None else str(p.pid) for p in self.processes
                if p is None or not p.is_alive()]

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
        started = [p for p in self.processes if p is not None]
        for p in started:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in started:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("receiver process %d did not stop; killing it", p.pid)
                p.kill()
                p.join(5)
