"""Watched folder: DICOM files dropped in at any depth are taken once complete (size unchanged for a settle
time) and moved into the spool; anything else goes to `rejected/` with a `.reason` file beside it."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from livernode.daemon.ingest_scp import STORAGE_CLASSES
from livernode.daemon.metrics import AuditLog, Metrics
from livernode.daemon.spool import Spool, check_uid
from livernode.daemon.store import Store
from livernode.errors import InputError
from livernode.fsutil import atomic_write
from livernode.imaging.dicomio import read_dataset
from livernode.imaging.headers import header_facts

log = logging.getLogger(__name__)
SETTLE_SECONDS = 1.0


class FolderIngest:
    def __init__(self, watch: Path, spool: Spool, store: Store, rejected: Path, metrics: Metrics | None = None,
                 audit: AuditLog | None = None) -> None:
        self.metrics, self.audit = metrics or Metrics(), audit or AuditLog(None)
        self.watch, self.spool, self.store, self.rejected = Path(watch), spool, store, Path(rejected)
        self.watch.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(parents=True, exist_ok=True)
        self.wake = threading.Event()
        self._sizes: dict[Path, tuple[int, float]] = {}
        self._observer = None

    def start(self) -> None:
        """watchdog wakes the scan early; the worker also scans on its own period, so no event is needed."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        wake = self.wake

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                wake.set()

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.watch), recursive=True)
        self._observer.start()

    def watching(self) -> bool:
        """True while the file-system observer runs (the scan also runs on its own period without it)."""
        return self._observer is not None and self._observer.is_alive()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    def scan(self, now: float | None = None, progress: Callable[[], None] = lambda: None) -> list[str]:
        """Ingest every settled file; returns the StudyInstanceUIDs that received new instances. `progress()` is
        called for every file. A file that fails for a reason of its own (it vanished, it cannot be moved) is
        logged and skipped; the next scan sees it again."""
        now = time.monotonic() if now is None else now
        studies = []
        for path in sorted(p for p in self.watch.rglob("*") if p.is_file() and not p.name.startswith(".")):
            progress()
            try:
                study = self._settled(path, now)
            except OSError as exc:
                log.warning("watched folder: skipping %s for now: %s", path.name, exc)
                self._sizes.pop(path, None)
                continue
            if study:
                studies.append(study)
        return studies

    def _settled(self, path: Path, now: float) -> str | None:
        """Take `path` if its size has not changed for SETTLE_SECONDS; the study it added to, if any."""
        size = path.stat().st_size
        seen = self._sizes.get(path)
        if seen is None or seen[0] != size:
            self._sizes[path] = (size, now)
            return None
        if now - seen[1] < SETTLE_SECONDS:
            return None
        del self._sizes[path]
        return self._take(path)

    def _take(self, path: Path) -> str | None:
        try:
            ds = read_dataset(path)
            if str(ds.get("SOPClassUID", "")) not in STORAGE_CLASSES:
                raise InputError(f"{path}: SOP class {ds.get('SOPClassUID', 'missing')} is not CT, Enhanced CT, a "
                                 "secondary capture or a dose report")
            study, series, sop = (check_uid(str(ds.get(k, "")), k) for k in
                                  ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        except InputError as exc:
            self._reject(path, str(exc))
            return None
        data = path.read_bytes()
        if not self.spool.has_room(len(data)):
            self._waiting(path, "free space below the threshold")
            return None
        try:
            stored, new = self.spool.store(study, series, sop, data)
        except OSError as exc:  # the file stays where it is and is taken once the disk has room again
            self._waiting(path, f"cannot store it ({exc})")
            return None
        self.store.add_instance(sop, study, series, str(ds.SOPClassUID), str(stored), header=header_facts(ds))
        path.unlink()
        if new:
            self.metrics.instances_received.labels("folder").inc()
            self.audit.write("instance_received", sop_instance_uid=sop, study_instance_uid=study, source="folder")
        return study if new else None

    def _waiting(self, path: Path, reason: str) -> None:
        """Leave the file in place; the next scans see it as new and take it once it has settled again."""
        log.error("leaving %s in the watched folder for now: %s", path.name, reason)

    def _reject(self, path: Path, reason: str) -> None:
        target = self.rejected / f"{int(time.time())}-{os.getpid()}-{path.name}"
        shutil.move(str(path), target)
        atomic_write(target.with_name(target.name + ".reason"), (reason + "\n").encode())
        log.warning("rejected %s: %s", path.name, reason)
        self.metrics.instances_rejected.labels("folder file").inc()
        self.audit.write("file_rejected", file=path.name, reason=reason)
