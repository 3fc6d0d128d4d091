"""The running node: four parts over one state folder, each with one job.

- listeners (`listeners.py`): C-STORE and the watched folder into the spool and the index;
- worker (`worker.py`): due studies through the pipeline, results into the outbox;
- sender (`sender.py`): the outbox to the destinations;
- health (`health.py`): heartbeats, /healthz beside /metrics, and the systemd watchdog.

This module builds them, runs the worker, the sender and the folder scan in supervised threads, and stops them in
order on SIGTERM."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from livernode.config import DaemonConfig
from livernode.daemon import sender as sender_mod
from livernode.daemon import worker as worker_mod
from livernode.daemon.health import Health, Liveness, serve_http, supervised, watchdog_loop, work_loop
from livernode.daemon.listeners import FOLDER, Listeners
from livernode.daemon.metrics import AuditLog, Metrics
from livernode.daemon.pipeline import ModelFacts, warm_up
from livernode.daemon.retention import Retention
from livernode.daemon.sdnotify import Notifier, watchdog_period
from livernode.daemon.send import Destination
from livernode.daemon.sender import Sender
from livernode.daemon.spool import Spool
from livernode.daemon.sr_process import SrProcess, sr_beside
from livernode.daemon.store import Store
from livernode.daemon.worker import Worker
from livernode.errors import ConfigError
from livernode.imaging.dicomio import read_dataset
from livernode.inference.runner import Segmenter

log = logging.getLogger(__name__)
RETENTION = "retention"
# Stopping takes at most this long (systemd's TimeoutStopSec in systemd/livernode.service is 90 s).
STOP_BUDGET_S = 60.0


class Service:
    def __init__(self, cfg: DaemonConfig) -> None:
        if cfg.inference.model is None:
            raise ConfigError("no model: set inference.model in the config or pass --model")
        if cfg.node.port is None and cfg.paths.watch is None:
            raise ConfigError("nothing to listen on: set node.port and/or paths.watch")
        self.cfg = cfg
        self.destinations = _destinations(cfg)
        state = Path(cfg.paths.state)
        self.spool = Spool(state / "spool", min_free_bytes=int(cfg.study.min_free_mb * 1e6))
        self.store = Store(state / "index.sqlite")
        # TensorRT, where it is installed, keeps the engines it builds in a folder only the node can write
        self.segmenter = Segmenter(cfg.inference.model, providers=cfg.inference.providers,
                                   tensorrt_cache=state / "tensorrt")
        self.ray = None
        if cfg.inference.backend == "ray":  # the actors have loaded the model when this returns
            from livernode.daemon.ray_backend import RayStudies

            self.ray = RayStudies(cfg.inference, cfg.inference.model)
        self.metrics = Metrics()
        obs = cfg.observability
        self.audit = AuditLog(state / obs.audit_log if obs.audit_log is not None else None,
                              max_bytes=int(obs.audit_max_mb * 1e6), backups=obs.audit_backups)
        m = self.segmenter.manifest
        if m.research_use:
            log.warning("model %s: %s; its SEG, SR and summary say so", cfg.inference.model.name, m.research_use)
        self.metrics.info.labels(m.weights_sha256[:16], m.livernode_version,
                                 ",".join(self.segmenter.providers_used)).set(1)
        self.stop_event = threading.Event()
        self.liveness = Liveness(cfg.stall_seconds())
        parts = dict(metrics=self.metrics, audit=self.audit, liveness=self.liveness, stop=self.stop_event)
        self.listeners = Listeners(cfg, self.spool, self.store, **parts)
        # on Ray the actors write the results; here a helper process may build each SR beside its SEG
        self.sr_process = SrProcess() if self.ray is None and sr_beside(cfg.inference.sr_process) else None
        self.worker = Worker(lambda: self.cfg, self.store, self.segmenter, state / "results",
                             destinations=lambda: list(self.destinations), on_result=lambda: self.sender.wake.set(),
                             ray=self.ray, sr_process=self.sr_process, **parts)
        self.sender = Sender(lambda: self.cfg, self.store, destinations=lambda: self.destinations,
                             on_requeue=self.worker.wake.set, **parts)
        self.retention = Retention(cfg.retention, self.store, state, self.audit)
        self.health = Health({"listener": self.listeners.check, "worker": self._thread_check(worker_mod.NAME),
                              "sender": self._thread_check(sender_mod.NAME), "index": self.store.probe_writable,
                              "spool": self._spool_check, "model": self._model_check})
        self.health.checks[RETENTION] = self._thread_check(RETENTION)
        if self.listeners.folder is not None:
            self.health.checks["folder"] = self._thread_check(FOLDER)
        self.http = None
        self._stop_requested = self._reload_requested = False

    @property
    def scp(self):
        return self.listeners.scp

    @property
    def folder(self):
        return self.listeners.folder

    def start(self) -> None:
        """Recover from an earlier crash, then bind /metrics and the listeners."""
        cleaned = self.spool.clean_partials()
        if cleaned:
            log.info("removed %d partial files left by an earlier crash (never acknowledged)", cleaned)
        restored = self.store.reconcile(self.spool.instances, lambda p: read_dataset(p, pixels=False))
        if restored:
            log.warning("re-indexed %d spooled instance(s) missing from the index (power loss?)", restored)
        self.worker.recover()
        if self.worker.ray is None:  # on Ray the results are written by the actors
            try:
                log.info("result writers warmed up in %.2f s",
                         warm_up(ModelFacts.of(self.segmenter), self.sr_process))
            except Exception as exc:  # noqa: BLE001 - only a head start: the first study pays for it instead
                log.warning("warming up the result writers failed (%s: %s); the first study will be slower",
                            type(exc).__name__, exc)
        obs = self.cfg.observability
        if obs.metrics_port is not None:
            self.http = serve_http(obs.metrics_bind, obs.metrics_port,
                                   self.metrics.exposition(self.listeners.receivers_dir), self.health,
                                   before_scrape=self.update_gauges)
        self.listeners.start()

    def run_once(self, send: bool = True) -> None:
        """One pass of every part in the calling thread (tests and tools): take settled folder files, process
        the due studies and, unless `send` is false, send what is owed."""
        self.listeners.scan()
        self.worker.run_once()
        if send:
            self.sender.send_due()
        self.update_gauges()

    def run_forever(self, poll_s: float = 0.5, notifier: Notifier | None = None,
                    reload_config: Callable[[], DaemonConfig] | None = None) -> int:
        """Run the worker, the sender, the folder scan and the watchdog in supervised threads until `stop()` or
        `request_stop()`, then stop them within STOP_BUDGET_S. Returns the exit status: 0, or 1 when the node
        stopped itself because a part failed (under systemd's watchdog only; see `_part_failed`)."""
        notifier = notifier or Notifier("")
        stop, period = self.stop_event, watchdog_period()
        threads = {worker_mod.NAME: supervised(worker_mod.NAME, self.liveness, stop, lambda: self.worker.run(poll_s)),
                   sender_mod.NAME: supervised(sender_mod.NAME, self.liveness, stop, lambda: self.sender.run(poll_s))}
        if self.listeners.folder is not None:
            threads[FOLDER] = supervised(FOLDER, self.liveness, stop, lambda: self.listeners.run_folder(poll_s))
        threads[RETENTION] = supervised(RETENTION, self.liveness, stop, lambda: self._retain(poll_s))
        threading.Thread(target=watchdog_loop, name="watchdog", daemon=True,
                         args=(notifier, self.liveness, period, stop, self.status_line)).start()
        code = 0
        try:
            while not stop.is_set():
                if self._stop_requested:
                    break
                if self._reload_requested:
                    self._reload_requested = False
                    self._reload(reload_config)
                if period is not None and self._part_failed():
                    code = 1
                    break
                self.listeners.tend()  # from this thread: a receiver process dies with the thread that made it
                time.sleep(0.1)
        finally:
            self._stop_parts(threads, notifier)
        return code

    def _part_failed(self) -> bool:
        """Under systemd, a dead part, or a stuck part other than the worker, stops the node cleanly with status 1,
        and Restart=on-failure starts it again: the study in progress stops between two steps and is not counted
        as interrupted. A stuck worker is left to the watchdog: what it is stuck on may be the study itself, and
        the kill counts against that study."""
        problems = {name: p for name, p in self.liveness.problems().items()
                    if name != worker_mod.NAME or p.startswith("thread died")}
        if problems:
            log.critical("stopping so that systemd restarts the node: %s",
                         "; ".join(f"{n}: {p}" for n, p in problems.items()))
        return bool(problems)

    def _stop_parts(self, threads: dict[str, threading.Thread], notifier: Notifier) -> None:
        """Close the port, then give the worker (which stops at its next file, batch or stage) and the sender
        (whose C-STORE in progress gets its timeout) one shared deadline. A worker still busy at the deadline has
        its job closed as stopped, so the study is taken up again at the next start without counting as a crash."""
        t0 = time.monotonic()
        deadline = t0 + STOP_BUDGET_S
        self.stop_event.set()
        notifier.stopping()
        self.listeners.close_port()  # no new associations from the moment we stop
        for part in (self.worker, self.sender):
            part.wake.set()
        for name, thread in threads.items():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error("the %s thread did not stop within %.0f s; exiting without it", name, STOP_BUDGET_S)
        busy = self.worker.current
        if threads[worker_mod.NAME].is_alive() and busy is not None:
            self.store.stop_processing(busy, "the node stopped before the step in progress ended")
        log.info("worker and sender stopped %.1f s after the stop request", time.monotonic() - t0)
        if self.ray is not None:
            self.ray.close()

    def _retain(self, poll_s: float) -> None:
        """The retention thread: apply the policy every `retention.interval_seconds`; a heartbeat per study."""
        beat = lambda: self.liveness.beat(RETENTION, "purging")  # noqa: E731
        work_loop(RETENTION, self.liveness, self.stop_event, threading.Event(), poll_s,
                  lambda: self.retention.purge(progress=beat) if self.retention.due() else None, "waiting")

    def request_stop(self) -> None:
        """From a signal handler: only a flag; `run_forever` acts on it."""
        self._stop_requested = True

    def request_reload(self) -> None:
        """From a signal handler: only a flag; `run_forever` acts on it."""
        self._reload_requested = True

    def stop(self) -> None:
        self.stop_event.set()
        self.listeners.stop_all()
        if self.sr_process is not None:
            self.sr_process.stop()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()

    def _reload(self, reload_config: Callable[[], DaemonConfig] | None) -> None:
        if reload_config is None:
            return
        try:
            self.reload(reload_config())
        except Exception as exc:  # noqa: BLE001 - a bad reload must never stop a running node
            log.error("reload refused, keeping the running configuration: %s", exc)

    def reload(self, cfg: DaemonConfig) -> None:
        """SIGHUP: take new destinations, study timing, free-space threshold, selection rules, retention and send
        settings; listeners, model and observability stay as they are. The merged configuration is validated as a whole before any of it is
        used; the destination table is replaced in one assignment (the sender reads it once per send)."""
        merged = self.cfg.model_dump()
        merged.update(study=cfg.study.model_dump(), send=cfg.send.model_dump(), selection=cfg.selection.model_dump(),
                      retention=cfg.retention.model_dump())
        try:
            new = DaemonConfig.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(f"reloaded configuration: {exc.errors()[0]['msg']}") from None
        self.destinations = _destinations(new)
        self.cfg = new
        self.spool.min_free_bytes = int(new.study.min_free_mb * 1e6)
        self.retention.policy = new.retention
        log.info("configuration reloaded: %d destination(s), quiet period %.0f s", len(self.destinations),
                 cfg.study.quiet_seconds)

    def update_gauges(self) -> tuple[int, int]:
        """Refresh the study and outbox gauges; returns (studies waiting, results to send)."""
        studies, outbox, waiting = self.store.counts()
        for st in ("receiving", "processing", "done", "failed"):
            self.metrics.studies.labels(st).set(studies.get(st, 0))
        self.metrics.outbox_depth.set(outbox.get("pending", 0))
        self.metrics.dead_letters.set(outbox.get("dead", 0))
        return waiting, outbox.get("pending", 0)

    def status_line(self) -> str:
        waiting, pending = self.update_gauges()
        return f"{waiting} studies waiting, {pending} results to send; {self.worker.doing}"

    # -- health checks: each returns a detail or raises with the reason
    def _thread_check(self, name: str) -> Callable[[], str]:
        def check() -> str:
            if name not in self.liveness.names():
                raise RuntimeError("not running")
            problem = self.liveness.problem(name)
            if problem:
                raise RuntimeError(problem)
            return self.liveness.describe(name)
        return check

    def _spool_check(self) -> str:
        free = shutil.disk_usage(self.spool.root).free
        need = self.spool.min_free_bytes
        text = f"{free / 1e6:.0f} MB free, threshold {need / 1e6:.0f} MB (study.min_free_mb)"
        if free < need:
            raise RuntimeError(f"{text}: C-STORE answers 0xA700")
        return text

    def _model_check(self) -> str:
        session = self.segmenter.session
        if session is None:
            raise RuntimeError("no ONNX Runtime session")
        return f"{self.segmenter.path.name} on {','.join(session.get_providers())}"


def _destinations(cfg: DaemonConfig) -> dict[str, Destination]:
    return {str(d): d for d in map(Destination.from_config, cfg.send.destinations)}


def serve(cfg: DaemonConfig, reload_config=None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the configuration through `reload_config()`. Signal handlers
    only set flags; the main thread acts on them."""
    import signal

    notifier = Notifier()
    service = Service(cfg)  # loads the model
    service.start()  # binds the listeners
    notifier.ready(f"listening on port {service.scp.port if service.scp else '-'}, model {cfg.inference.model}")
    signal.signal(signal.SIGTERM, lambda *_: service.request_stop())
    signal.signal(signal.SIGINT, lambda *_: service.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: service.request_reload())
    try:
        code = service.run_forever(notifier=notifier, reload_config=reload_config)
    finally:
        service.stop()
    if code == 0:
        log.info("stopped cleanly")
    else:
        log.error("stopped because a part failed (exit status %d)", code)
    return code
