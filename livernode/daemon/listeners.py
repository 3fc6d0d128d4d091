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
from livernode.daemon.spool import Spool
from livernode.daemon.store import Store

log = logging.getLogger(__name__)
FOLDER = "folder"


class Listeners:
    def __init__(self, cfg: DaemonConfig, spool: Spool, store: Store, *, metrics: Metrics, audit: AuditLog,
                 liveness: Liveness, stop: threading.Event) -> None:
        self.liveness, self.stop = liveness, stop
        self.scp = None
        if cfg.node.port is not None:
            node = cfg.node
            tls = server_tls_context(node.tls.cert_file, node.tls.key_file, node.tls.ca_file) if node.tls else None
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

    def close_port(self) -> None:
        """No new associations from now on (associations in progress finish)."""
        if self.scp:
            self.scp.stop()

    def stop_all(self) -> None:
        self.close_port()
        if self.folder:
            self.folder.stop()

    def check(self) -> str:
        """Health: the port is bound and accepting, the folder is watched. Raises naming what is not."""
        parts = []
        if self.scp is not None:
            if not self.scp.listening():
                raise RuntimeError(f"C-STORE port {self.scp.host}:{self.scp.port} is not accepting associations")
            parts.append(f"C-STORE on {self.scp.host}:{self.scp.port}")
        if self.folder is not None:
            if not self.folder.watching():
                raise RuntimeError(f"watched folder {self.folder.watch}: the observer has stopped")
            parts.append(f"watching {self.folder.watch}")
        return ", ".join(parts)
