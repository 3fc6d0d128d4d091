"""The running node: listeners, the study worker and the sender, in one process, state on disk."""

from __future__ import annotations

import logging
import shutil
import ssl
import threading
from pathlib import Path

from livernode.config import DaemonConfig
from livernode.daemon.ingest_folder import FolderIngest
from livernode.daemon.ingest_scp import StoreSCP, server_tls_context
from livernode.daemon.metrics import AuditLog, Metrics
from livernode.daemon.pipeline import process_files
from livernode.daemon.sdnotify import Notifier
from livernode.daemon.send import Destination, SendError, send_files
from livernode.daemon.spool import Spool, fsync_dir, uid_key
from livernode.daemon.store import Store
from livernode.errors import ConfigError, LivernodeError
from livernode.imaging.dicomio import read_dataset
from livernode.inference.runner import Segmenter

log = logging.getLogger(__name__)


class Service:
    def __init__(self, cfg: DaemonConfig) -> None:
        if cfg.inference.model is None:
            raise ConfigError("no model: set inference.model in the config or pass --model")
        if cfg.node.port is None and cfg.paths.watch is None:
            raise ConfigError("nothing to listen on: set node.port and/or paths.watch")
        self.cfg = cfg
        self.destinations = {str(d): d for d in map(Destination.from_config, cfg.send.destinations)}
        state = Path(cfg.paths.state)
        self.spool = Spool(state / "spool", min_free_bytes=int(cfg.study.min_free_mb * 1e6))
        self.store = Store(state / "index.sqlite")
        self.results = state / "results"
        self.segmenter = Segmenter(cfg.inference.model, providers=cfg.inference.providers)
        self.metrics = Metrics()
        obs = cfg.observability
        self.audit = AuditLog(state / obs.audit_log if obs.audit_log is not None else None)
        m = self.segmenter.manifest
        self.metrics.info.labels(m.weights_sha256[:16], m.livernode_version,
                                 ",".join(self.segmenter.providers_used)).set(1)
        self.http = None
        self.scp = None
        if cfg.node.port is not None:
            node = cfg.node
            tls = server_tls_context(node.tls.cert_file, node.tls.key_file, node.tls.ca_file) if node.tls else None
            self.scp = StoreSCP(node.ae_title, node.bind, node.port, self.spool, self.store, metrics=self.metrics,
                                audit=self.audit, allowed_calling=node.allowed_calling_ae_titles,
                                require_called=node.require_called_ae_title, tls=tls)
        self.folder = None
        if cfg.paths.watch is not None:
            self.folder = FolderIngest(cfg.paths.watch, self.spool, self.store, state / "rejected",
                                       metrics=self.metrics, audit=self.audit)
        self.stop_event = threading.Event()
        self.send_wake = threading.Event()
        self._send_lock = threading.Lock()

    def start(self) -> None:
        cleaned = self.spool.clean_partials()
        if cleaned:
            log.info("removed %d partial files left by an earlier crash (never acknowledged)", cleaned)
        restored = self.store.reconcile(self.spool.instances, lambda p: read_dataset(p, pixels=False))
        if restored:
            log.warning("re-indexed %d spooled instance(s) missing from the index (power loss?)", restored)
        if self.cfg.observability.metrics_port is not None:
            self.http = self.metrics.serve(self.cfg.observability.metrics_bind, self.cfg.observability.metrics_port)
        if self.scp:
            self.scp.start()
        if self.folder:
            self.folder.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.scp:
            self.scp.stop()
        if self.folder:
            self.folder.stop()

    def run_once(self, send: bool = True) -> None:
        """One pass of the worker: take settled folder files, process due studies and, unless a sender thread
        does it (`run_forever`), send what is owed."""
        if self.folder:
            self.folder.scan()
        for study in self.store.due_studies(self.cfg.study.quiet_seconds, self.cfg.study.max_wait_seconds):
            if self.stop_event.is_set():  # shutting down: what is left stays due for the next start
                break
            self.process(study)
            self.send_wake.set()
        if send:
            self.send_due()
        self.update_gauges()

    def _sender(self, poll_s: float) -> None:
        """Sends in its own thread, so the next study's inference overlaps the last study's C-STOREs to the PACS
        (and a slow or hanging PACS never holds the worker up)."""
        while not self.stop_event.is_set():
            self.send_due()
            self.send_wake.wait(poll_s)
            self.send_wake.clear()

    def update_gauges(self) -> None:
        with self.store.transaction() as db:
            states = dict(db.execute("SELECT state, count(*) FROM studies GROUP BY state").fetchall())
            outbox = dict(db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
        for st in ("receiving", "processing", "done", "failed"):
            self.metrics.studies.labels(st).set(states.get(st, 0))
        self.metrics.outbox_depth.set(outbox.get("pending", 0))
        self.metrics.dead_letters.set(outbox.get("dead", 0))

    def run_forever(self, poll_s: float = 0.5, notifier: Notifier | None = None) -> None:
        notifier = notifier or Notifier("")
        sender = threading.Thread(target=self._sender, args=(poll_s,), name="sender", daemon=True)
        sender.start()
        try:
            self._work(poll_s, notifier)
        finally:
            self.stop_event.set()
            self.send_wake.set()
            sender.join()  # a send in progress completes (or times out) before the process exits

    def _work(self, poll_s: float, notifier: Notifier) -> None:
        while not self.stop_event.is_set():
            self.run_once(send=False)
            notifier.watchdog()  # from the worker loop: a hung worker stops these and systemd restarts us
            pending = len(self.store.due_outbox())
            notifier.status(f"{self.queue_depth()} studies waiting, {pending} results to send")
            if self.folder:
                self.folder.wake.wait(poll_s)
                self.folder.wake.clear()
            else:
                self.stop_event.wait(poll_s)

    def queue_depth(self) -> int:
        with self.store.transaction() as db:
            return db.execute("SELECT count(*) FROM studies WHERE instances > processed_instances").fetchone()[0]

    def reload(self, cfg: DaemonConfig) -> None:
        """SIGHUP: take new destinations, study timing and send settings; listeners and model stay as they are."""
        self.destinations = {str(d): d for d in map(Destination.from_config, cfg.send.destinations)}
        self.cfg = self.cfg.model_copy(update={"study": cfg.study, "send": cfg.send})
        log.info("configuration reloaded: %d destination(s), quiet period %.0f s", len(self.destinations),
                 cfg.study.quiet_seconds)

    def process(self, study: str) -> None:
        row = self.store.start_processing(study)
        key = uid_key(study)
        out = self.results / key / f"gen-{row.generation + 1}"
        if row.generation:
            log.info("study %s: reprocessing (generation %d) because %d instance(s) arrived after the last result; "
                     "the new SEG and SR supersede the earlier series", key, row.generation + 1,
                     row.instances - row.processed_instances, extra={"study": key, "job": row.generation + 1})
        try:
            shutil.rmtree(out, ignore_errors=True)  # a crash may have left a half-written attempt
            result = process_files([Path(p) for p in self.store.instance_paths(study)], self.segmenter, out,
                                   series_number_offset=row.generation)
        except LivernodeError as exc:
            log.error("study %s failed: %s", key, exc, extra={"study": key, "job": row.generation + 1})
            self.store.finish(study, row.instances, failed_reason=str(exc))
            return
        for stage, seconds in result.timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        if result.timings.get("infer"):
            self.metrics.slices_per_second.set(result.slices / result.timings["infer"])
        if self.cfg.paths.output is not None:
            self._publish(out, Path(self.cfg.paths.output) / key / out.name)
        for dest in self.destinations.values():
            self.store.enqueue(study, str(dest), [str(result.seg_path), str(result.sr_path)])
        self.store.finish(study, row.instances)

    def _publish(self, src: Path, dst: Path) -> None:
        """Copy a finished result folder into the output folder atomically (readers never see half of it)."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
        fsync_dir(dst.parent)

    def send_due(self) -> None:
        with self._send_lock:
            self._send_due()

    def _send_due(self) -> None:
        groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for item_id, study, dest, path, _ in self.store.due_outbox():
            groups.setdefault((study, dest), []).append((item_id, path))
        for (study, dest), items in groups.items():
            ids = [i for i, _ in items]
            self.metrics.send_attempts.labels(dest).inc()
            try:
                if dest not in self.destinations:
                    raise SendError(f"{dest} is no longer a configured destination")
                send_files([Path(p) for _, p in items], self.destinations[dest], self.cfg.send.calling_ae_title,
                           timeout=self.cfg.send.timeout_seconds)
            except (SendError, OSError, RuntimeError, ssl.SSLError) as exc:
                dead = self.store.mark_failed(ids, str(exc), backoff_s=self.cfg.send.backoff_seconds,
                                              max_attempts=self.cfg.send.max_attempts)
                log.error("send of study %s to %s failed%s: %s", uid_key(study), dest,
                          " (dead letter)" if dead else ", will retry", exc, extra={"study": uid_key(study)})
                self.metrics.send_failures.labels(dest).inc()
                self.audit.write("send_failed", study_instance_uid=study, destination=dest, error=str(exc),
                                 dead_letter=dead)
                continue
            self.store.mark_sent(ids)
            self.audit.write("result_sent", study_instance_uid=study, destination=dest, instances=len(ids))
            log.info("study %s delivered to %s (%d instances)", uid_key(study), dest, len(ids),
                     extra={"study": uid_key(study)})


def serve(cfg: DaemonConfig, reload_config=None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the configuration through `reload_config()`.

    Signal handlers only set flags; the worker loop acts on them between studies, so a running job finishes."""
    import signal

    notifier = Notifier()
    service = Service(cfg)  # loads the model
    service.start()  # binds the listeners
    notifier.ready(f"listening on port {service.scp.port if service.scp else '-'}, model {cfg.inference.model}")
    hup = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: service.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: service.stop_event.set())
    signal.signal(signal.SIGHUP, lambda *_: hup.set())

    def reloader() -> None:
        while not service.stop_event.is_set():
            if hup.wait(0.5):
                hup.clear()
                if reload_config is not None:
                    try:
                        service.reload(reload_config())
                    except LivernodeError as exc:
                        log.error("reload refused, keeping the running configuration: %s", exc)

    def stop_listeners() -> None:
        service.stop_event.wait()
        if service.scp:  # no new associations from the moment SIGTERM arrives; the running study finishes
            service.scp.stop()

    threading.Thread(target=reloader, name="reload", daemon=True).start()
    threading.Thread(target=stop_listeners, name="stop-listeners", daemon=True).start()
    try:
        service.run_forever(notifier=notifier)
    finally:
        notifier.stopping()
        service.stop()
    log.info("stopped cleanly")
    return 0
