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
from livernode.daemon.sr_process import SrProcess
from livernode.daemon.store import Store
from livernode.errors import LivernodeError, StudyInterrupted
from livernode.fsutil import atomic_write, publish_dir
from livernode.inference.runner import Segmenter

log = logging.getLogger(__name__)
NAME = "worker"


class Worker:
    def __init__(self, settings: Callable[[], DaemonConfig], store: Store, segmenter: Segmenter, results: Path, *,
                 destinations: Callable[[], list[str]], metrics: Metrics, audit: AuditLog, liveness: Liveness,
                 stop: threading.Event, on_result: Callable[[], None] = lambda: None, ray=None,
                 sr_process: SrProcess | None = None) -> None:
        self.settings, self.store, self.segmenter, self.results = settings, store, segmenter, Path(results)
        self.destinations, self.metrics, self.audit, self.liveness = destinations, metrics, audit, liveness
        self.stop, self.on_result = stop, on_result
        self.ray = ray  # a ray_backend.RayStudies when [inference] backend = "ray"
        self.sr_process = sr_process  # builds each SR beside its SEG (pipeline.py)
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
        def next_in():  # a study falls due at the end of its quiet period, not at the next poll after it
            study = self.settings().study
            return self.store.next_due_in(study.quiet_seconds, study.max_wait_seconds)
        work_loop(NAME, self.liveness, self.stop, self.wake, poll_s, self.run_once, "looking for due studies",
                  next_in)

    def run_once(self) -> int:
        """Process every study due now, one after the other (on Ray: several at once); returns how many were
        started."""
        if self.ray is not None:
            return self._run_once_ray()
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

    def _begin(self, study: str):
        """Open the study's job; (row before, key, log extra, result folder)."""
        row = self.store.start_processing(study)
        key, job = uid_key(study), row.generation + 1
        extra = {"study": key, "job": job}
        out = self.results / key / f"gen-{job}"
        if row.generation:
            log.info("study %s: reprocessing (generation %d) because %d instance(s) arrived after the last result; "
                     "the new SEG and SR supersede the earlier series", key, job,
                     row.instances - row.processed_instances, extra=extra)
        shutil.rmtree(out, ignore_errors=True)  # a crash may have left a half-written attempt
        return row, key, extra, out

    def _process(self, study: str) -> str:
        row, key, extra, out = self._begin(study)

        def compute():
            indexed = self.store.instance_headers(study)  # selection reads the index's header facts, not the files
            return process_all([Path(p) for p, _ in indexed], self.segmenter, out,
                               series_number_offset=row.generation, progress=self._progress(key),
                               rules=self.settings().selection, known={p: h for p, h in indexed if h},
                               sr_process=self.sr_process)
        return self._conclude(study, row, extra, out, compute)

    def _conclude(self, study: str, row, extra: dict, out: Path, compute) -> str:
        """Run `compute` (the results of the study, written into `out`) and record what came of it."""
        key = extra["study"]
        try:
            results = compute()
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
        self.audit.write("study_done", study_instance_uid=study, generation=extra["job"], series=len(results),
                         slices=sum(r.slices for r in results), destinations=len(self.destinations()))
        if outbox:
            self.on_result()
        return "done"

    def _run_once_ray(self) -> int:
        """Every study due now on the Ray actors, as many at once as there are actors. The index still decides
        what is due and what is done; an actor or machine lost mid-study makes that study due again, its attempt
        counted as a crash's (study.max_attempts)."""
        from collections import deque

        inflight: dict = {}  # Ray reference -> (study, row, extra, out, actor index)
        queued: deque[str] = deque()
        started = 0

        def refill() -> None:
            cfg = self.settings()
            busy = {v[0] for v in inflight.values()} | set(queued)
            queued.extend(s for s in self.store.due_studies(cfg.study.quiet_seconds, cfg.study.max_wait_seconds)
                          if s not in busy)

        refill()
        while queued or inflight:
            while queued and self.ray.free() and not self.stop.is_set():
                study = queued.popleft()
                row, key, extra, out = self._begin(study)
                started += 1
                try:
                    ref, k = self.ray.submit([Path(p) for p in self.store.instance_paths(study)], row.generation,
                                             self.settings().selection)
                except Exception as exc:  # a spool file gone or unreadable: this study's failure
                    self._conclude(study, row, extra, out, _raising(exc))
                    continue
                inflight[ref] = (study, row, extra, out, k)
            self.doing = (f"{len(inflight)} studies on Ray actors" if inflight else
                          f"{len(queued)} studies waiting for a Ray actor that answers")
            self.liveness.beat(NAME, self.doing)
            if self.stop.is_set():  # what is in flight stays due for the next start
                for ref, (study, _, extra, _, _) in inflight.items():
                    self.ray.cancel(ref)
                    self.store.stop_processing(study, "the node is stopping")
                    log.info("study %s: stopped mid-way (the node is stopping); it is processed again at the next "
                             "start", extra["study"], extra=extra)
                return started
            if not inflight:  # every actor lost: wait for Ray to bring one back
                self.stop.wait(1.0)
            for ref in self.ray.wait(list(inflight), timeout=1.0) if inflight else []:
                study, row, extra, out, k = inflight.pop(ref)
                try:
                    answer = self.ray.result(ref)
                    compute = lambda: _write_remote(answer, out)  # noqa: E731
                except self.ray.lost_errors as exc:
                    self.ray.lost(k)
                    self._lost(study, extra, f"its Ray actor was lost ({type(exc).__name__})")
                    continue
                except Exception as exc:  # the study's own failure, raised in the actor: mapped as locally
                    compute = _raising(exc)
                finally:
                    self.ray.done(k)
                self.current = study
                try:
                    self._conclude(study, row, extra, out, compute)
                finally:
                    self.current = None
            if not queued:
                refill()
        return started

    def _lost(self, study: str, extra: dict, reason: str) -> None:
        limit = self.settings().study.max_attempts
        attempts = self.store.interrupt_processing(study, reason, limit)
        if attempts is None:
            log.warning("study %s: %s; it is processed again", extra["study"], reason, extra=extra)
            return
        log.error("study %s failed: %s, %d times (limit study.max_attempts = %d)", extra["study"], reason, attempts,
                  limit, extra=extra)
        self.metrics.study_failures.labels("interrupted").inc()
        self.audit.write("study_failed", study_instance_uid=study, reason=f"{reason}, {attempts} times")

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


def _raising(exc: BaseException):
    def compute():
        raise exc
    return compute


def _write_remote(answer, out: Path) -> list[StudyResult]:
    """An actor's answer (its results and the bytes of its result folder) written into `out`; the results as the
    local pipeline returns them (the parts the worker reads)."""
    remote, blobs = answer
    for rel, data in blobs.items():
        atomic_write(out / rel, data)
    folders = [out / Path(r.seg).parent for r in remote]
    return [StudyResult(d, out / r.seg, out / r.sr, d / "summary.json", d / "preview.png", None, r.timings,
                        r.slices, r.decisions) for d, r in zip(folders, remote)]


def _series_json(decisions: tuple[dict, ...]) -> str:
    """What `livernode status --study` shows of each series: description, images, chosen, reason."""
    keep = ("description", "images", "chosen", "accepted", "reason", "slice_thickness_mm", "liver_share")
    return json.dumps([{k: d.get(k) for k in keep} for d in decisions])
