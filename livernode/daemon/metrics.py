"""Prometheus metrics (served with /healthz by `health.serve_http`) and the append-only audit log (JSON lines)."""

from __future__ import annotations

import fcntl
import json
import logging
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)


class Metrics:
    """One registry per node (no globals), so tests and several nodes in one process do not collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.instances_received = Counter("livernode_instances_received", "Instances stored and acknowledged",
                                          ["source"], registry=r)
        self.instances_rejected = Counter("livernode_instances_rejected", "Instances refused or rejected",
                                          ["reason"], registry=r)
        self.associations_rejected = Counter("livernode_associations_rejected",
                                             "Associations or connections refused", ["reason"], registry=r)
        self.studies = Gauge("livernode_studies", "Studies by state", ["state"], registry=r)
        self.stage_seconds = Histogram("livernode_stage_seconds", "Pipeline stage duration", ["stage"],
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.slices_per_second = Gauge("livernode_inference_slices_per_second", "Slices per second, last study",
                                       registry=r)
        self.send_attempts = Counter("livernode_send_attempts", "Send attempts", ["destination"], registry=r)
        self.send_failures = Counter("livernode_send_failures", "Failed send attempts", ["destination"], registry=r)
        self.outbox_depth = Gauge("livernode_outbox_pending", "Outbox items waiting to be sent", registry=r)
        self.dead_letters = Gauge("livernode_outbox_dead", "Outbox items given up after max attempts", registry=r)
        self.info = Gauge("livernode_model_info", "Model and providers in use (value 1)",
                          ["model_sha256", "livernode_version", "providers"], registry=r)
        self.study_slices = Gauge("livernode_study_slices", "Slices of the study being processed: total, and "
                                  "inferred so far (0 when idle)", ["kind"], registry=r)
        self.study_failures = Counter("livernode_study_failures", "Studies that failed, by cause", ["cause"],
                                      registry=r)

    def exposition(self, receivers_dir: Path | None = None) -> CollectorRegistry:
        """What /metrics serves: this registry, plus the counters of receiver processes (receivers.py) read from
        prometheus-client's multiprocess files in `receivers_dir`, added to this process' own."""
        if receivers_dir is None:
            return self.registry
        out = CollectorRegistry(auto_describe=False)
        out.register(_Merged(self.registry, Path(receivers_dir)))
        return out


class _Merged:
    """A collector: the node's own metrics with the receivers' counters summed in, sample by sample."""

    def __init__(self, own: CollectorRegistry, receivers_dir: Path) -> None:
        self.own, self.receivers_dir = own, receivers_dir

    def collect(self):
        from prometheus_client.multiprocess import MultiProcessCollector

        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple, list]] = {}
        sources = [self.own.collect()]
        if self.receivers_dir.is_dir():  # receivers count; their gauges are the node's to report
            sources.append(f for f in MultiProcessCollector(None, str(self.receivers_dir)).collect()
                           if f.type == "counter")
        for source in sources:
            for fam in source:
                if fam.name not in families:
                    families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                    values[fam.name] = {}
                for smp in fam.samples:
                    key = (smp.name, tuple(sorted(smp.labels.items())))
                    have = values[fam.name].get(key)
                    if have is None:
                        values[fam.name][key] = [smp.name, dict(smp.labels), smp.value]
                    elif not smp.name.endswith("_created"):  # counts add up; the creation time is the first
                        have[2] += smp.value
        for name, fam in families.items():
            for sample_name, labels, value in values[name].values():
                fam.add_sample(sample_name, labels, value)
            yield fam


class AuditLog:
    """Append-only JSON lines: associations accepted and rejected, instances received, results sent, security
    rejections, purges. UIDs and AE titles only; no patient names or IDs. Rotated by size under the same lock as
    the writes, so no line is lost or split: audit.jsonl.1 is the newest rotated file, .N the oldest kept."""

    def __init__(self, path: Path | None, max_bytes: int = 64 << 20, backups: int = 8) -> None:
        self.path = Path(path) if path else None
        self.max_bytes, self.backups = max_bytes, backups
        self._lock = threading.Lock()
        self._lock_file = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # receiver processes (receivers.py) append to the same log: rotation and writes take this file's lock
            self._lock_file = open(self.path.with_name(f".{self.path.name}.lock"), "a")

    def write(self, event: str, **fields) -> None:
        if self.path is None:
            return
        line = (json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}, default=str)
                + "\n").encode()
        try:
            with self._lock:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)
                try:
                    size = self.path.stat().st_size if self.path.exists() else 0
                    if size and size + len(line) > self.max_bytes:
                        self._rotate()
                    with open(self.path, "ab") as fh:
                        fh.write(line)
                finally:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        except OSError as exc:  # a full disk must not end the thread that reports the event
            log.error("audit log %s: cannot write %s event: %s", self.path, event, exc)

    def _rotate(self) -> None:
        for k in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{k}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{k + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
