"""The worker: takes due studies one at a time, runs the pipeline on each, and queues the results to send.

A study's failure is that study's: any exception fails its job with the reason and the worker goes on. A study
whose processing a crash cut short `study.max_attempts` times fails at the next start instead of taking the node
down again. Progress (each file, inference batch and stage) is the worker's heartbeat, and a stop request ends a
study between two such steps, leaving it due for the next start."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import asdict
from collections.abc import Callable
from pathlib import Path

from livernode.config import DaemonConfig
from livernode.daemon.health import Liveness, work_loop
from livernode.daemon.metrics import AuditLog, Metrics
from livernode.daemon.pipeline import STUDY_STAGES, StudyResult, process_all
from livernode.daemon.select import NoUsableSeries
from livernode.daemon.spool import uid_key
from livernode.daemon.store import Store
from livernode.errors import LivernodeError, StudyInterrupted
from livernode.fsutil import publish_dir
from livernode.inference.runner import Segmenter

log = logging.getLogger(__name__)
NAME = "worker"


class Worker:
    def __init__(self, settings: Callable[[], DaemonConfig], store: Store, segmenter: Segmenter, results: Path, *,
                 destinations: Callable[[], list[str]], metrics: Metrics, audit: AuditLog, liveness: Liveness,
                 stop: threading.Event, on_result: Callable[[], None] = lambda: None) -> None:
        self.settings, self.store, self.segmenter, self.results = settings, store, segmenter, Path(results)
        self.destinations, self.metrics, self.audit, self.liveness = destinations, metrics, audit, liveness
        self.stop, self.on_result = stop, on_result
        self.wake = threading.Event()
        self.doing = "idle"
        self.current: str | None = None  # the Study Instance UID being processed

    def recover(self) -> None:
        """At start, before any work: jobs a crash left running become interrupted; a study interrupted
        `study.max_attempts` times becomes failed."""
        limit = self.settings().study.max_attempts
        interrupted, failed = self.store.recover(limit)
        if interrupted:
            log.warning("%d job(s) were cut short by a crash or kill; their studies are processed again",
                        interrupted)
        for study, attempts in failed:
            key = uid_key(study)
            log.error("study %s failed: interrupted %d times (limit study.max_attempts = %d); not retried until "
                      "`livernode retry`", key, attempts, limit, extra={"study": key})
            self.metrics.study_failures.labels("interrupted").inc()
            self.audit.write("study_failed", study_instance_uid=study, reason=f"interrupted {attempts} times")

    def run(self, poll_s: float) -> None:
        """Until `stop`: process due studies, then wait for new ones. Runs in the supervised worker thread."""
        work_loop(NAME, self.liveness, self.stop, self.wake, poll_s, self.run_once, "looking for due studies")

    def run_once(self) -> int:
        """Process every study due now, one after the other; returns how many were started."""
        cfg = self.settings()
        n = 0
        for study in self.store.due_studies(cfg.study.quiet_seconds, cfg.study.max_wait_seconds):
            if self.stop.is_set():  # shutting down: what is left stays due for the next start
                break
            self.process(study)
            n += 1
        return n

    def process(self, study: str) -> str:
        """Run the pipeline on one study; returns the job's end state: done, failed or stopped."""
        self.current = study
        try:
            return self._process(study)
        finally:
            self.doing, self.current = "idle", None
            self.metrics.study_slices.labels("inferred").set(0)
            self.metrics.study_slices.labels("total").set(0)

    def _process(self, study: str) -> str:
        row = self.store.start_processing(study)
        key, job = uid_key(study), row.generation + 1
        extra = {"study": key, "job": job}
        out = self.results / key / f"gen-{job}"
        if row.generation:
            log.info("study %s: reprocessing (generation %d) because %d instance(s) arrived after the last result; "
                     "the new SEG and SR supersede the earlier series", key, job,
                     row.instances - row.processed_instances, extra=extra)
        try:
            shutil.rmtree(out, ignore_errors=True)  # a crash may have left a half-written attempt
            results = process_all([Path(p) for p in self.store.instance_paths(study)], self.segmenter, out,
                                  series_number_offset=row.generation, progress=self._progress(key),
                                  rules=self.settings().selection)
            output = self.settings().paths.output
            if output is not None:
                publish_dir(out, Path(output) / key / out.name)
        except StudyInterrupted as exc:
            self.store.stop_processing(study, str(exc))
            log.info("study %s: stopped mid-way (%s); it is processed again at the next start", key, exc,
                     extra=extra)
            return "stopped"
        except NoUsableSeries as exc:  # every series' reason goes to the index, for `livernode status --study`
            return self._fail(study, row.instances, str(exc), "input", extra,
                              series=_series_json(tuple(asdict(d) for d in exc.decisions)))
        except LivernodeError as exc:  # an expected failure: its message says what and why
            return self._fail(study, row.instances, str(exc), "input", extra)
        except Exception as exc:  # a bug or an environment fault: this study's failure, never the worker's end
            log.error("study %s: unexpected %s while processing", key, type(exc).__name__, exc_info=True,
                      extra=extra)
            return self._fail(study, row.instances, f"{type(exc).__name__}: {exc}", "exception", extra)
        for i, result in enumerate(results):
            self._record(result, study_stages=i == 0)
        outbox = [(dest, str(path)) for dest in self.destinations() for r in results for path in (r.seg_path, r.sr_path)]
        self.store.finish(study, row.instances, outbox=outbox, series=_series_json(results[0].decisions))
        self.audit.write("study_done", study_instance_uid=study, generation=job, series=len(results),
                         slices=sum(r.slices for r in results), destinations=len(self.destinations()))
        if outbox:
            self.on_result()
        return "done"

    def _progress(self, key: str):
        beat, stop, slices = self.liveness.beat, self.stop, self.metrics.study_slices

        def progress(stage: str, done: int, total: int) -> None:
            self.doing = f"study {key[:12]}: {stage} {done}/{total}" if total else f"study {key[:12]}: {stage}"
            beat(NAME, self.doing)
            if stage == "infer":
                slices.labels("inferred").set(done)
                slices.labels("total").set(total)
            if stop.is_set():
                raise StudyInterrupted(f"the node is stopping ({self.doing})")
        return progress

    def _fail(self, study: str, instances: int, reason: str, cause: str, extra: dict, series: str = "") -> str:
        log.error("study %s failed: %s", extra["study"], reason, extra=extra)
        self.store.finish(study, instances, failed_reason=reason, series=series)
        self.metrics.study_failures.labels(cause).inc()
        self.audit.write("study_failed", study_instance_uid=study, generation=extra["job"], reason=reason)
        return "failed"

    def _record(self, result: StudyResult, study_stages: bool) -> None:
        """Stage durations into the histogram; the study's own stages (reading, selection) once per study."""
        for stage, seconds in result.timings.items():
            if study_stages or stage not in STUDY_STAGES:
                self.metrics.stage_seconds.labels(stage).observe(seconds)
        if result.timings.get("infer"):
            self.metrics.slices_per_second.set(result.slices / result.timings["infer"])


def _series_json(decisions: tuple[dict, ...]) -> str:
    """What `livernode status --study` shows of each series: description, images, chosen, reason."""
    keep = ("description", "images", "chosen", "accepted", "reason", "slice_thickness_mm", "liver_share")
    return json.dumps([{k: d.get(k) for k in keep} for d in decisions])
