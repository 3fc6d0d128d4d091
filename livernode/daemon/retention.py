"""Retention: patient data and results leave the node once they are no longer owed to anyone.

The policy (`[retention]`): a study whose results were all delivered is kept `keep_delivered_hours` after its
last activity, a failed one `keep_failed_hours`; above `max_spool_gb` of spool and results the oldest delivered
studies go first. A study that is receiving, processing or still owes results (pending or dead outbox items) is
never touched. A purged study keeps a tombstone row in the index (UIDs, dates, outcome), so `livernode status` and
the audit still tell what happened. The index goes first, in one transaction that also checks nothing arrived
meanwhile; then exactly the files it named are deleted, so an instance that arrives during a purge is never lost.
A crash in between leaves files of a purged study, which the next start recognises by their age and removes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from livernode.config import RetentionConfig
from livernode.daemon.metrics import AuditLog
from livernode.daemon.spool import uid_key
from livernode.daemon.store import Store

log = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    """What one purge did (or, dry, would do)."""

    studies: list[tuple[str, str]] = field(default_factory=list)  # (Study Instance UID, why)
    files: int = 0
    bytes: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would purge" if self.dry_run else "purged"
        return f"{verb} {len(self.studies)} studies, {self.files} files, {self.bytes / 1e6:.1f} MB"


def _size(folder: Path) -> tuple[int, int]:
    """(files, bytes) under `folder`."""
    files = size = 0
    for root, _, names in os.walk(folder):
        for n in names:
            try:
                size += os.stat(os.path.join(root, n)).st_size
                files += 1
            except FileNotFoundError:
                pass
    return files, size


class Retention:
    def __init__(self, policy: RetentionConfig, store: Store, state: Path, audit: AuditLog) -> None:
        self.policy, self.store, self.audit = policy, store, audit
        self.spool = Path(state) / "spool" / "instances"
        self.results = Path(state) / "results"
        self.last_run = 0.0

    def folders(self, study: str) -> list[Path]:
        key = uid_key(study)
        return [self.spool / key, self.results / key]

    def due(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return now - self.last_run >= self.policy.interval_seconds

    def purge(self, now: float | None = None, dry_run: bool = False,
              progress: Callable[[], None] = lambda: None) -> PurgeReport:
        """Apply the policy once; returns what was (or would be) removed. `progress()` is called per study."""
        now = time.time() if now is None else now
        self.last_run = now
        p = self.policy
        report = PurgeReport(dry_run=dry_run)
        candidates = self.store.purgeable()
        chosen: dict[str, tuple[str, tuple[int, float]]] = {}
        for study, state, last, instances, received in candidates:
            age_h = (now - last) / 3600
            limit = p.keep_delivered_hours if state == "done" else p.keep_failed_hours
            if age_h >= limit:
                what = "delivered" if state == "done" else "failed"
                chosen[study] = (f"{what} {age_h:.1f} h ago (limit {limit:g} h)", (instances, received))
        if p.max_spool_gb is not None:  # above the cap the oldest delivered studies go, whatever their age
            used = sum(_size(f)[1] for f in (self.spool, self.results) if f.exists())
            freed = sum(self._bytes(s) for s in chosen)
            for study, state, _, instances, received in candidates:
                if used - freed <= p.max_spool_gb * 1e9:
                    break
                if state == "done" and study not in chosen:
                    freed += self._bytes(study)
                    chosen[study] = (f"spool above max_spool_gb {p.max_spool_gb:g}", (instances, received))
        for study, (why, seen) in chosen.items():
            progress()
            if dry_run:
                files = [Path(f) for f in self.store.instance_paths(study)]
            else:  # the index first: a study that changed meanwhile (an instance arrived) is left alone
                listed = self.store.tombstone(study, why, now, *seen)
                if listed is None:
                    continue
                files = [Path(f) for f in listed]
            n, b = self._remove(study, files, dry_run)
            report.files, report.bytes = report.files + n, report.bytes + b
            report.studies.append((study, why))
        if report.studies and not dry_run:
            log.info("retention: %s", report.summary())
            self.audit.write("purge", studies=len(report.studies), files=report.files, bytes=report.bytes,
                             study_instance_uids=[s for s, _ in report.studies])
        return report

    def _bytes(self, study: str) -> int:
        return sum(_size(f)[1] for f in self.folders(study))

    def _remove(self, study: str, files: list[Path], dry_run: bool) -> tuple[int, int]:
        """Delete the study's spool files the index named (never a file that arrived since) and its results;
        returns (files, bytes)."""
        n = b = 0
        for f in files:
            try:
                b += f.stat().st_size
                n += 1
                if not dry_run:
                    f.unlink()
            except FileNotFoundError:
                pass
        results = self.results / uid_key(study)
        if results.exists():
            rn, rb = _size(results)
            n, b = n + rn, b + rb
            if not dry_run:
                shutil.rmtree(results, ignore_errors=True)
        if not dry_run:
            for folder in sorted({f.parent for f in files}, reverse=True):
                for d in (folder, folder.parent):
                    try:
                        d.rmdir()  # only when empty: a file that arrived meanwhile keeps its folder
                    except OSError:
                        pass
        return n, b
