"""The sender: works off the outbox, one association per study and destination, in its own thread.

Every failure of one item is that item's failure: retried with exponential backoff, then a dead letter. A result
file that is missing or unreadable is not retried: its study is processed again. Nothing that happens while
sending ends the thread; each attempt is a heartbeat."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom

from livernode.config import DaemonConfig
from livernode.daemon.health import Liveness, work_loop
from livernode.daemon.metrics import AuditLog, Metrics
from livernode.daemon.send import NOT_ATTEMPTED, Destination, Outcome, send_datasets
from livernode.daemon.spool import uid_key
from livernode.daemon.store import Store
from livernode.imaging.dicomio import check_dataset

log = logging.getLogger(__name__)
NAME = "sender"


class ResultLost(Exception):
    """A result file to send is missing or cannot be read."""


class Sender:
    def __init__(self, settings: Callable[[], DaemonConfig], store: Store, *,
                 destinations: Callable[[], dict[str, Destination]], metrics: Metrics, audit: AuditLog,
                 liveness: Liveness, stop: threading.Event, on_requeue: Callable[[], None] = lambda: None) -> None:
        self.settings, self.store, self.destinations = settings, store, destinations
        self.metrics, self.audit, self.liveness, self.stop = metrics, audit, liveness, stop
        self.on_requeue = on_requeue
        self.wake = threading.Event()
        self._lock = threading.Lock()

    def run(self, poll_s: float) -> None:
        """Until `stop`: send what is due, then wait for new results or the next retry. The supervised thread."""
        # send_due is looked up on each pass, so a test can make the thread's top level fail
        work_loop(NAME, self.liveness, self.stop, self.wake, poll_s, lambda: self.send_due(),
                  "looking for due results")

    def send_due(self) -> None:
        """One pass over the due outbox items, grouped by study and destination."""
        with self._lock:
            groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
            for item_id, study, dest, path, _ in self.store.due_outbox():
                groups.setdefault((study, dest), []).append((item_id, path))
            for (study, dest), items in groups.items():
                if self.stop.is_set():
                    return  # what is left stays pending for the next start
                self._send_group(study, dest, items)

    def _send_group(self, study: str, dest: str, items: list[tuple[int, str]]) -> None:
        key = uid_key(study)
        beat = lambda: self.liveness.beat(NAME, f"sending study {key[:12]} to {dest}")  # noqa: E731
        beat()
        self.metrics.send_attempts.labels(dest).inc()
        target = self.destinations().get(dest)  # one look: a reload may swap the table meanwhile
        if target is None:
            self._record(study, dest, items, [Outcome(False, f"{dest} is no longer a configured destination "
                                                             "(removed from send.destinations)")] * len(items))
            return
        try:
            datasets = [_read(Path(path)) for _, path in items]
        except ResultLost as exc:
            self._lost(study, dest, str(exc))
            return
        except OSError as exc:
            self._record(study, dest, items, [Outcome(False, f"cannot read the results: {exc}")] * len(items))
            return
        cfg = self.settings().send
        try:
            outcomes = send_datasets(datasets, [Path(p).name for _, p in items], target, cfg.calling_ae_title,
                                     cfg.timeout_seconds, progress=beat, stopping=self.stop.is_set,
                                     files=[Path(p) for _, p in items])
        except Exception as exc:  # noqa: BLE001 - whatever sending raises fails this attempt only
            log.debug("send of study %s to %s raised", key, dest, exc_info=True)
            outcomes = [Outcome(False, f"{dest}: {type(exc).__name__}: {exc}")] * len(items)
        self._record(study, dest, items, outcomes)

    def _record(self, study: str, dest: str, items: list[tuple[int, str]], outcomes: list[Outcome]) -> None:
        key = uid_key(study)
        sent = [i for (i, _), o in zip(items, outcomes) if o.stored]
        failed: dict[str, list[int]] = {}
        for (i, _), o in zip(items, outcomes):
            if not o.stored and o is not NOT_ATTEMPTED and o.error:
                failed.setdefault(o.error, []).append(i)
        if sent:
            self.store.mark_sent(sent)
            self.audit.write("result_sent", study_instance_uid=study, destination=dest, instances=len(sent))
            log.info("study %s delivered to %s (%d instance(s))", key, dest, len(sent), extra={"study": key})
        cfg = self.settings().send
        for error, ids in failed.items():
            dead = self.store.mark_failed(ids, error, backoff_s=cfg.backoff_seconds, max_attempts=cfg.max_attempts)
            log.error("send of %d instance(s) of study %s to %s failed%s: %s", len(ids), key, dest,
                      " (dead letter)" if dead else ", will retry", error, extra={"study": key})
            self.metrics.send_failures.labels(dest).inc()
            self.audit.write("send_failed", study_instance_uid=study, destination=dest, error=error,
                             dead_letter=dead, instances=len(ids))

    def _lost(self, study: str, dest: str, why: str) -> None:
        """A result file cannot be read: resending cannot help, so every unsent result of the study is
        superseded and the study is processed again (new SEG and SR for every destination)."""
        key = uid_key(study)
        reason = f"result lost before sending ({why}); the study is processed again"
        self.store.reprocess_lost(study, reason)
        log.error("study %s: %s", key, reason, extra={"study": key})
        self.audit.write("result_lost", study_instance_uid=study, destination=dest, error=why)
        self.on_requeue()


def _read(path: Path) -> pydicom.Dataset:
    """The result file as a dataset ready to send. ResultLost when it is gone or its content is damaged; any
    other OSError (no file descriptors left, an I/O error, permissions) is raised as it is: a failed attempt,
    tried again later, not a reason to produce the results anew."""
    try:
        ds = check_dataset(pydicom.dcmread(path), path.name, pixels=False)
    except FileNotFoundError:
        raise ResultLost(f"{path.name}: missing") from None
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for damaged content
        raise ResultLost(f"{path.name}: unreadable: {exc}") from None
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID") if k not in ds]
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        missing.append("TransferSyntaxUID")
    if missing:
        raise ResultLost(f"{path.name}: damaged: no {', '.join(missing)}")
    return ds
