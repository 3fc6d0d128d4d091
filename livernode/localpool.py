"""The local engine of `livernode batch`: spawned worker processes, each holding one model (an ONNX Runtime session
on one thread) for the whole run. The Ray engine is `raycluster.py`."""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from livernode.batch import IN_FLIGHT_PER_WORKER, Job, Outcome, StudyWorker, lost

# One StudyWorker per worker process, made once by the pool's initializer: that is what the initializer is for.
_WORKER: StudyWorker | None = None


def _init_process(model: str, parent: int) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops the run
    _die_with(parent)
    _WORKER = StudyWorker(Path(model), providers="auto", threads=1)


def _die_with(parent: int) -> None:
    """End this worker when the batch process ends, even by SIGKILL: a worker holds both ends of the pool's task
    queue, so it would wait for work forever, holding its model in memory (Linux's parent-death signal)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a killed run leaves its workers behind
        return
    if os.getppid() != parent:  # the parent died before the signal was set up
        os._exit(1)


def _run_in_process(key: str, files: tuple[Path, ...]) -> Outcome:
    assert _WORKER is not None, "the pool's initializer did not run"
    return _WORKER.run(key, files)


def run_local(jobs: Iterable[Job], model: Path, workers: int, finish: Callable[[Job, Outcome], None]) -> None:
    """Run `jobs` on `workers` spawned processes, each with one ONNX Runtime session on one thread, at most
    IN_FLIGHT_PER_WORKER studies per process handed out at a time. A process that dies (out of memory, a crash in
    a native library) breaks the pool: its studies run again in a new one (`lost`)."""
    pending = deque(jobs)
    while pending:
        # spawned, not forked: threads of ONNX Runtime or of the caller must not be copied mid-flight
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_process,
                                   initargs=(str(model), os.getpid()))
        try:
            _drain(pool, pending, IN_FLIGHT_PER_WORKER * workers, finish)
        except BaseException:  # Ctrl-C or an error: do not wait for the studies in hand; the workers end with us
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()


def _drain(pool: ProcessPoolExecutor, pending: deque, limit: int, finish: Callable[[Job, Outcome], None]) -> None:
    """Hand `pending` jobs to `pool`, `limit` at a time, until none is left or the pool breaks (a worker died:
    the studies it held go back to `pending` or fail, by `lost`)."""
    inflight: dict = {}
    broken = False
    while (pending and not broken) or inflight:
        while pending and not broken and len(inflight) < limit:
            job = pending.popleft()
            try:
                inflight[pool.submit(_run_in_process, job.study.key, job.study.files)] = job
            except BrokenProcessPool:
                pending.appendleft(job)
                broken = True
        if not inflight:
            break
        done, _ = wait(inflight, return_when=FIRST_COMPLETED)
        for fut in done:
            job = inflight.pop(fut)
            try:
                outcome = fut.result()
            except BrokenProcessPool:
                broken = True
                lost(job, "its worker process died", pending.appendleft, finish)
                continue
            finish(job, outcome)
