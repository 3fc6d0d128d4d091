"""The listeners: the C-STORE SCP and the watched folder, which put instances into the spool and the index and
do nothing else. The folder is scanned in its own thread, so a long study never delays taking files."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from livernode.config import DaemonConfig
from livernode.daemon.health import Liveness, work_loop
from livernode.daemon.ingest_folder import FolderIngest
from livernode.daemon.ingest_scp import StoreSCP, server_tls_context
from livernode.daemon.metrics import AuditLog, Metrics
from livernode.daemon.receivers import FINISH_S, ReceiverPool, ReceiverSpec, default_workers
from livernode.daemon.spool import Spool
from livernode.daemon.store import Store
from livernode.logs import current_format

log = logging.getLogger(__name__)
FOLDER = "folder"


class Listeners:
    def __init__(self, cfg: DaemonConfig, spool: Spool, store: Store, *, metrics: Metrics, audit: AuditLog,
                 liveness: Liveness, stop: threading.Event) -> None:
        self.liveness, self.stop = liveness, stop
        self.scp = None
        self.receivers_dir: Path | None = None  # the receiver processes' metrics files, when there are several
        if cfg.node.port is not None:
            node = cfg.node
            workers = node.workers or default_workers()
            # built here whatever the number of receivers, so a bad certificate or key stops the node at its start
            tls = server_tls_context(node.tls.cert_file, node.tls.key_file, node.tls.ca_file) if node.tls else None
            if workers > 1:
                self.receivers_dir = Path(cfg.paths.state) / "receivers-metrics"
                self.scp = ReceiverPool(workers, node.bind, node.port,
                                        _receiver_spec(cfg, spool, store, audit, self.receivers_dir),
                                        spool.threshold)
            else:
                self.scp = StoreSCP(node.ae_title, node.bind, node.port, spool, store, metrics=metrics, audit=audit,
                                    allowed_calling=node.allowed_calling_ae_titles,
                                    require_called=node.require_called_ae_title, tls=tls)
        self.folder = None
        if cfg.paths.watch is not None:
            self.folder = FolderIngest(cfg.paths.watch, spool, store, Path(cfg.paths.state) / "rejected",
                                       metrics=metrics, audit=audit)

    def start(self) -> None:
        """Bind the port and start watching the folder (the scanning thread is started by `run_folder`)."""
        if self.scp:
            self.scp.start()
        if self.folder:
            self.folder.start()

    def run_folder(self, poll_s: float) -> None:
        """Until `stop`: take settled files from the watched folder. The supervised folder thread."""
        beat = self.liveness.beat
        work_loop(FOLDER, self.liveness, self.stop, self.folder.wake, poll_s,
                  lambda: self.folder.scan(progress=lambda: beat(FOLDER, "taking files")), "scanning")

    def scan(self) -> None:
        if self.folder:
            self.folder.scan()

    def tend(self) -> None:
        """From the main thread: restart a receiver process that died."""
        if isinstance(self.scp, ReceiverPool):
            self.scp.tend()

    def close_port(self) -> None:
        """No new associations from now on (associations in progress finish)."""
        if self.scp:
            self.scp.stop()

    def stop_all(self) -> None:
        """Close the port and stop watching the folder. A receiver in this process lets the associations under
        way finish first (for at most receivers.FINISH_S), as receiver processes do."""
        self.close_port()
        if isinstance(self.scp, StoreSCP):
            self.scp.finish(FINISH_S)
        if self.folder:
            self.folder.stop()

    def check(self) -> str:
        """Health: the port is bound and accepting, the folder is watched. Raises naming what is not."""
        parts = []
        if self.scp is not None:
            if not self.scp.listening():
                dead = self.scp.dead() if isinstance(self.scp, ReceiverPool) and self.scp.socket else []
                why = f" (receiver process {', '.join(map(str, dead))} exited)" if dead else ""
                raise RuntimeError(f"C-STORE port {self.scp.host}:{self.scp.port} is not accepting associations{why}")
            parts.append(f"C-STORE on {self.scp.host}:{self.scp.port}" + (
                f" ({self.scp.workers} receiver processes)" if isinstance(self.scp, ReceiverPool) else ""))
        if self.folder is not None:
            if not self.folder.watching():
                raise RuntimeError(f"watched folder {self.folder.watch}: the observer has stopped")
            parts.append(f"watching {self.folder.watch}")
        return ", ".join(parts)


def _receiver_spec(cfg: DaemonConfig, spool: Spool, store: Store, audit: AuditLog, metrics_dir: Path) -> ReceiverSpec:
    node, root = cfg.node, logging.getLogger()
    tls = (str(node.tls.cert_file), str(node.tls.key_file), str(node.tls.ca_file) if node.tls.ca_file else None) \
        if node.tls else None
    return ReceiverSpec(node.ae_title, tuple(node.allowed_calling_ae_titles), node.require_called_ae_title, tls,
                        str(spool.root), str(store.path),
                        (str(audit.path), audit.max_bytes, audit.backups) if audit.path else None,
                        str(metrics_dir), current_format(), root.getEffectiveLevel())
