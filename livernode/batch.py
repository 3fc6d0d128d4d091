"""`livernode batch`: the node's pipeline over an archive. The studies under a folder (DICOM files grouped by Study
Instance UID wherever they lie) each go through `process_all`, as `livernode infer` and the daemon run it, on local
worker processes or on Ray actors (`raycluster.py`), a bounded number at a time. This process is the only writer of
the output folder: each study's results are published as one folder with a marker (`batch.json`) naming the model's
weight digest and a digest of the study's input files, so `--resume` can tell what is complete and up to date, and
`studies.csv` holds a row per study, rewritten atomically as the run goes."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from livernode.errors import InputError, LivernodeError
from livernode.fsutil import atomic_write, publish_dir, replacing, write_json

log = logging.getLogger(__name__)

MARKER = "batch.json"
CSV_NAME, PARQUET_NAME = "studies.csv", "studies.parquet"
RESULT_FILES = ("seg.dcm", "sr.dcm", "summary.json", "preview.png")
COLUMNS = ("study", "status", "reason", "series", "series_description", "liver_ml", "tumour_ml", "burden_percent",
           "lesions", "slices", "select_s", "infer_s", "output_s", "total_s", "providers", "worker", "decoded_on",
           "attempts")
DONE, FAILED, UP_TO_DATE = "done", "failed", "skipped-up-to-date"
MAX_ATTEMPTS = 3  # a study whose worker (process, actor or machine) dies this many times is a failed row
IN_FLIGHT_PER_WORKER = 2  # one running, one waiting: a worker never idles while the next study is handed over
CSV_EVERY_S = 2.0  # the csv is rewritten after a study at most this often (rewriting 10,000 rows per study is not free)
STAGE_PREFIX = ".stage-"
LOCK = ".batch.lock"
# What a killed run can leave in the output folder: a study being staged or published (publish_dir's folders), a
# file being written (atomic_write's and replacing()'s temporary names).
LEFTOVERS = (f"{STAGE_PREFIX}*", ".*.tmp", ".*.old", ".tmp-*")
FAILED_DIR = "failed"  # out/failed/<study digest>.json: a study that failed for this model and these inputs


@dataclass(frozen=True)
class Study:
    """One study's DICOM files, by the digest of its Study Instance UID (`uid_key`; UIDs never name paths)."""

    key: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Job:
    study: Study
    inputs_sha256: str
    attempt: int = 1


@dataclass(frozen=True)
class Outcome:
    """What a worker made of one study: its result files (relative path -> bytes) or the reason it failed."""

    key: str
    ok: bool
    reason: str = ""
    summary: dict | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    worker: str = ""
    seconds: float = 0.0
    transient: bool = False  # a failure that may not recur (a lost worker, an unexpected error): run it again
    decoded_on: str = ""  # the process that read and decoded the files, when not `worker` (Ray's split)


@dataclass(frozen=True)
class BatchReport:
    studies: int
    processed: int  # studies run by this call (the rest were complete, or failed before on the same inputs)
    done: int
    failed: int
    up_to_date: int
    files_skipped: int  # not DICOM, unreadable, or without a valid Study Instance UID
    seconds: float
    csv_path: Path
    parquet_path: Path | None
    workers: tuple[dict, ...] = ()  # the Ray actors that ran, with their placement; empty for local processes
    peak_in_flight: int = 0  # the most studies between their decoding and their results at once (Ray)

    @property
    def studies_per_hour(self) -> float:
        """Studies run per hour of this call, model loading and the search for studies included."""
        return 3600.0 * self.processed / self.seconds if self.seconds > 0 else 0.0


def find_studies(root: Path, exclude: Path | None = None) -> tuple[list[Study], int]:
    """The studies under `root` (DICOM files grouped by Study Instance UID, wherever they lie; headers only) and how
    many files were skipped. Files under `exclude` (the output folder, whose SEG and SR carry the studies' UIDs)
    are not looked at."""
    from livernode.daemon.spool import uid_key
    from livernode.imaging.dicomio import read_dataset

    root = Path(root)
    skip = Path(exclude).resolve() if exclude is not None else None
    groups: dict[str, list[Path]] = {}
    skipped = 0
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if skip is None or (here / d).resolve() != skip)
        for name in sorted(names):
            path = here / name
            if not path.is_file():
                continue
            try:
                with path.open("rb") as fh:
                    if fh.read(132)[128:132] != b"DICM":
                        skipped += 1
                        continue
                key = uid_key(str(read_dataset(path, pixels=False).get("StudyInstanceUID", "")))
            except (InputError, OSError) as exc:
                log.debug("skipping %s: %s", path, exc)
                skipped += 1
                continue
            groups.setdefault(key, []).append(path)
    return [Study(k, tuple(groups[k])) for k in sorted(groups)], skipped


def inputs_digest(root: Path, files: Sequence[Path]) -> str:
    """sha256 over each input file's path below `root`, size and modification time: a changed, added or removed
    file makes a new digest."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class StudyWorker:
    """One loaded model that runs studies through the node's pipeline; what a worker process or a Ray actor holds.
    `run` never raises for a study: an expected failure or a bug is the outcome's reason."""

    def __init__(self, model: Path, providers: str = "auto", threads: int = 1, name: str = "") -> None:
        from livernode.inference.runner import Segmenter

        self.segmenter = Segmenter(model, providers=providers, threads=threads)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"

    def run(self, key: str, files: Sequence[Path]) -> Outcome:
        from livernode.daemon.pipeline import process_all

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="livernode-batch-") as tmp:
            out = Path(tmp) / "out"
            with study_failures(key, self.name, t0) as failed:
                results = process_all([Path(f) for f in files], self.segmenter, out)
            if failed:
                return failed[0]
            return outcome_of(key, out, results, self.name, time.perf_counter() - t0)


@contextmanager
def study_failures(key: str, worker: str, t0: float) -> Iterator[list[Outcome]]:
    """Turn an exception in the block into a failed study's Outcome, appended to the list it yields: an expected
    failure (its message says what and why) or a bug or environment fault (this study's failure, never the run's
    end; it may not recur, so it is transient)."""
    failed: list[Outcome] = []
    try:
        yield failed
    except LivernodeError as exc:
        failed.append(Outcome(key, False, str(exc), worker=worker, seconds=time.perf_counter() - t0))
    except Exception as exc:
        log.error("study %s: unexpected %s", key, type(exc).__name__, exc_info=True, extra={"study": key})
        failed.append(Outcome(key, False, f"{type(exc).__name__}: {exc}", worker=worker,
                              seconds=time.perf_counter() - t0, transient=True))


def outcome_of(key: str, out: Path, results: Sequence, worker: str, seconds: float) -> Outcome:
    """A finished study's Outcome: every file under `out`, and the first result's summary."""
    files_out = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    summary = json.loads(results[0].summary_path.read_text())
    return Outcome(key, True, summary=summary, files=files_out, worker=worker, seconds=seconds)


@contextmanager
def staged(payload: Sequence[bytes]) -> Iterator[list[Path]]:
    """Files handed over as bytes (to a machine that does not share the archive's disk), written to a temporary
    folder under neutral names, never under names from the sender."""
    with tempfile.TemporaryDirectory(prefix="livernode-input-") as tmp:
        paths = []
        for i, data in enumerate(payload):
            paths.append(Path(tmp) / f"{i:06d}.dcm")
            paths[-1].write_bytes(data)
        yield paths


# The split pipeline (`livernode batch --ray`): decode on CPU workers, the network on the model's actor, the
# results written on CPU workers again. These run in Ray's worker processes; they never raise for a study.
_COVERAGE_MODELS: dict[str, object] = {}  # model digest -> a CPU Segmenter for coverage passes, kept per process


def decode_payload(key: str, payload: Sequence[bytes], model: Sequence, model_sha256: str
                   ) -> tuple[Outcome | tuple[float, str], list | None]:
    """((seconds taken, this process's name), the study's decoded series) or (the failed Outcome, None). `model` is a one-item list holding the
    model's bytes as a reference, fetched only when a coverage pass has to choose between series."""
    from livernode.daemon.pipeline import decode_study
    from livernode.inference.runner import Segmenter

    def segmenter():
        if model_sha256 not in _COVERAGE_MODELS:
            import ray

            with tempfile.TemporaryDirectory(prefix="livernode-model-") as tmp:
                path = Path(tmp) / "model.onnx"
                path.write_bytes(ray.get(model[0]))
                _COVERAGE_MODELS[model_sha256] = Segmenter(path, providers="cpu", threads=1)
        return _COVERAGE_MODELS[model_sha256]

    t0 = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    with staged(payload) as paths, study_failures(key, worker, t0) as failed:
        decoded = decode_study(paths, segmenter)
        return (time.perf_counter() - t0, worker), decoded
    return failed[0], None


def write_payload(key: str, decoded: Sequence, labels: Sequence, model, infer_s: Sequence[float], worker: str,
                  seconds: float) -> Outcome:
    """The Outcome of a decoded study whose labels the model's actor made: post-processing, SEG, SR, preview and
    summary.json written as `livernode infer` writes them. `seconds`: the study's time in the earlier stages."""
    from livernode.daemon.pipeline import write_decoded

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="livernode-batch-") as tmp:
        out = Path(tmp) / "out"
        with study_failures(key, worker, t0) as failed:
            results = [write_decoded(d, lab, model, out, s) for d, lab, s in zip(decoded, labels, infer_s)]
        if failed:
            return replace(failed[0], seconds=seconds + failed[0].seconds)
        return outcome_of(key, out, results, worker, seconds + time.perf_counter() - t0)


def lost(job: Job, why: str, retry: Callable[[Job], None], finish: Callable[[Job, Outcome], None]) -> None:
    """A study whose worker died: run again elsewhere, or a failed row after MAX_ATTEMPTS."""
    if job.attempt < MAX_ATTEMPTS:
        log.warning("study %s: %s (attempt %d of %d); running it again", job.study.key, why, job.attempt,
                    MAX_ATTEMPTS, extra={"study": job.study.key})
        retry(replace(job, attempt=job.attempt + 1))
    else:
        finish(job, Outcome(job.study.key, False, f"{why}, on each of {MAX_ATTEMPTS} attempts", transient=True))


def row_of(key: str, outcome: Outcome, attempts: int) -> dict:
    """The csv row of a finished study."""
    row = dict.fromkeys(COLUMNS, "")
    row.update(study=key, status=DONE if outcome.ok else FAILED, reason=outcome.reason, worker=outcome.worker,
               decoded_on=outcome.decoded_on or outcome.worker, attempts=attempts, total_s=round(outcome.seconds, 3))
    s = outcome.summary
    if s is None:
        return row
    from livernode.daemon.select import short_key

    chosen = s["series"]["chosen"]
    t = s.get("timings_s", {})
    description = next((d.get("description", "") for d in s["series"]["decisions"]
                        if d["series_instance_uid"] == chosen), "")
    row.update(series=short_key(chosen), series_description=description, liver_ml=s["liver_volume_ml"],
               tumour_ml=s["tumour_volume_ml"], burden_percent=s["tumour_burden_percent"],
               lesions=s["lesion_count"], slices=s["volume"]["slices"],
               select_s=round(sum(t.get(k, 0.0) for k in ("coverage", "select", "load")), 3),
               infer_s=t.get("infer", ""),  # slices are decoded while the network runs: decoding is in here
               output_s=round(sum(t.get(k, 0.0) for k in ("postprocess", "seg", "sr", "preview")), 3),
               providers=",".join(s.get("providers", [])))
    return row


class Ledger:
    """The output folder: published study folders with their markers, the records of studies that failed on their
    input (`failed/<digest>.json`; a failure that may not recur leaves none), and the rows of this run."""

    def __init__(self, out: Path, model_sha256: str) -> None:
        self.out, self.model_sha256, self.run = Path(out), model_sha256, uuid.uuid4().hex
        self.rows: dict[str, dict] = {}
        self.written = 0.0
        for folder in (self.out, self.out / FAILED_DIR):  # the caller holds the folder's lock: nobody writes there
            for pattern in LEFTOVERS:
                for stale in folder.glob(pattern):
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)

    def _marker(self, path: Path, inputs_sha256: str) -> dict | None:
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        same = marker.get("model_sha256") == self.model_sha256 and marker.get("inputs_sha256") == inputs_sha256
        return marker if same else None

    def carried(self, key: str, inputs_sha256: str) -> dict | None:
        """For `--resume`: the row of a study whose published results are complete and were made by this model
        from these inputs (status skipped-up-to-date), or of one that failed on these inputs with this model
        (status failed, its reason); None for a study to process."""
        folder = self.out / key
        marker = self._marker(folder / MARKER, inputs_sha256)
        if marker is not None and all((folder / n).is_file() and (folder / n).stat().st_size > 0 for n in RESULT_FILES):
            return {**dict.fromkeys(COLUMNS, ""), **marker.get("row", {}), "status": UP_TO_DATE, "reason": ""}
        marker = self._marker(self.out / FAILED_DIR / f"{key}.json", inputs_sha256)
        if marker is not None:
            return {**dict.fromkeys(COLUMNS, ""), **marker.get("row", {}), "status": FAILED}
        return None

    def add(self, row: dict) -> None:
        self.rows[row["study"]] = row
        if time.monotonic() - self.written >= CSV_EVERY_S:
            self.write_csv()

    def record(self, job: Job, outcome: Outcome) -> dict:
        """Publish a finished study's results with their marker (a failure publishes nothing and keeps what an
        earlier run published), then add its row."""
        key = job.study.key
        row = row_of(key, outcome, job.attempt)
        failure = self.out / FAILED_DIR / f"{key}.json"
        if not outcome.ok and not outcome.transient:
            write_json(failure, self._record_of(job, row), indent=1)
        else:
            failure.unlink(missing_ok=True)
        if outcome.ok:
            stage = self.out / f"{STAGE_PREFIX}{key}"
            shutil.rmtree(stage, ignore_errors=True)
            for name, data in outcome.files.items():
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                (stage / name).write_bytes(data)
            write_json(stage / MARKER, self._record_of(job, row), indent=1)
            publish_dir(stage, self.out / key)  # readers see the old folder or the new one, never a mix
            shutil.rmtree(stage, ignore_errors=True)
        self.add(row)
        return row

    def _record_of(self, job: Job, row: dict) -> dict:
        return {"schema": 1, "study": job.study.key, "model_sha256": self.model_sha256,
                "inputs_sha256": job.inputs_sha256, "files": len(job.study.files), "run": self.run,
                "finished": datetime.now(timezone.utc).isoformat(), "row": row}

    def write_csv(self) -> Path:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for key in sorted(self.rows):
            writer.writerow(self.rows[key])
        path = self.out / CSV_NAME
        atomic_write(path, buf.getvalue().encode())
        self.written = time.monotonic()
        return path

    def write_parquet(self) -> Path | None:
        """studies.parquet beside the csv when pyarrow is installed (it is not a dependency); None otherwise."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return None
        path = self.out / PARQUET_NAME
        table = pa.Table.from_pylist([{c: str(self.rows[k][c]) for c in COLUMNS} for k in sorted(self.rows)])
        with replacing(path) as tmp:
            pq.write_table(table, str(tmp))
        return path


def run_batch(root: Path, model: Path, out: Path, *, workers: int = 1, ray_address: str | None = None,
              resume: bool = False, progress: bool = True) -> BatchReport:
    """Segment every study under `root` into `out/<study digest>/` and write `out/studies.csv` (and
    studies.parquet with pyarrow): on `workers` local processes, or on Ray (`ray_address` "local" or a cluster's
    address; one actor per GPU, else `workers` CPU actors). `resume` skips studies whose results are complete and
    up to date for this model and these input files. A failed study is a row with its reason."""
    from livernode.inference.runner import Segmenter

    if workers < 1:
        raise LivernodeError(f"--workers must be at least 1, not {workers}")
    root, out, model = Path(root), Path(out), Path(model)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    t0 = time.monotonic()
    sha = Segmenter(model, providers="cpu", threads=1).manifest.weights_sha256  # also refuses an unusable model
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run(root, model, out, sha, workers, ray_address, resume, progress, t0)


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold `out`'s lock: one batch at a time writes to an output folder."""
    with open(out / LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LivernodeError(f"{out}: another livernode batch is writing to this folder") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(root: Path, model: Path, out: Path, sha: str, workers: int, ray_address: str | None, resume: bool,
         progress: bool, t0: float) -> BatchReport:
    studies, files_skipped = find_studies(root, exclude=out)
    log.info("%d studies under %s; %d files skipped (not DICOM or without a Study Instance UID)", len(studies), root,
             files_skipped)
    ledger = Ledger(out, sha)
    jobs = []
    for study in studies:
        digest = inputs_digest(root, study.files)
        row = ledger.carried(study.key, digest) if resume else None
        if row is not None:
            ledger.rows[study.key] = row
        else:
            jobs.append(Job(study, digest))
    ledger.write_csv()
    log.info("%d studies to process; %d complete and up to date or failed before on the same files", len(jobs),
             len(studies) - len(jobs))
    ended: set[str] = set()
    placement: tuple[dict, ...] = ()
    peak = 0
    with ExitStack() as stack:
        if jobs and ray_address is not None:  # joined (or started) before the bar's clock starts
            from livernode import raycluster

            # a local Ray gets a slot for each CPU actor and one per core for decoding and writing
            stack.enter_context(raycluster.session(ray_address, workers + (os.cpu_count() or 1)))
        bar = stack.enter_context(tqdm(total=len(jobs), desc="batch", unit="study", disable=not progress or not jobs,
                                       bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"))
        started = time.monotonic()

        def finish(job: Job, outcome: Outcome) -> None:
            key = job.study.key
            assert key not in ended, f"study {key} finished twice"
            ended.add(key)
            row = ledger.record(job, outcome)
            if outcome.ok:
                log.info("study %s: done in %.1f s on %s (liver %s mL, %s lesion(s))", key, outcome.seconds,
                         outcome.worker, row["liver_ml"], row["lesions"], extra={"study": key})
            else:
                log.warning("study %s failed: %s", key, outcome.reason, extra={"study": key})
            bar.update(1)
            bar.set_postfix_str(f"{3600.0 * len(ended) / max(time.monotonic() - started, 1e-9):.0f} studies/h")

        try:
            if jobs and ray_address is None:
                from livernode.localpool import run_local

                run_local(jobs, model, min(workers, len(jobs)), finish)
            elif jobs:
                ran = raycluster.run_on_ray(jobs, model, workers, finish)
                placement, peak = ran.actors, ran.peak_in_flight
        finally:  # a run stopped by Ctrl-C or an error keeps the rows so far
            csv_path = ledger.write_csv()
            parquet_path = ledger.write_parquet()
    statuses = [r["status"] for r in ledger.rows.values()]
    report = BatchReport(len(studies), len(ended), statuses.count(DONE), statuses.count(FAILED),
                         statuses.count(UP_TO_DATE), files_skipped, time.monotonic() - t0, csv_path, parquet_path,
                         placement, peak)
    log.info("batch: %d processed; %d done, %d failed, %d up to date in %.1f s", report.processed, report.done,
             report.failed, report.up_to_date, report.seconds)
    return report
