"""The SR built in a process of its own while the node writes the SEG (#17: what is independent runs beside the
SEG, not after it).

Building the SR is pure Python (highdicom and pydicom), as is most of writing the SEG: in threads of one process
they would take turns at the interpreter lock. The node therefore keeps one helper process (spawned, so it
shares no threads or locks with the node) and hands it an `SrJob`: the SEG's and the source slices' few
attributes the SR reads, and the findings without their label volume (some tens of kilobytes, pickled by the
caller). The helper writes the SR file itself and returns the seconds it took.

A job that fails there (the helper died, hung past `WAIT_S`, or the job raised) is built again in the caller's
process, as without a helper, and the helper is replaced; the warning names the series and the reason. Only the
daemon starts one (`Service.start`, where `sr_beside` holds); `livernode infer` and the Ray actors build the SR
after the SEG as before."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from livernode.daemon.receivers import die_with_parent
from livernode.daemon.sr import SrJob

log = logging.getLogger(__name__)
# A 600-slice SR with 20 lesions takes well under a second: past this the helper is stuck. Far inside the
# worker's stall bound and the node's stop budget, which a wait for the helper must not overrun.
WAIT_S = 20.0
STOP_S = 5.0  # at the node's stop, the helper finishes its job for at most this long, then is killed
# The fewest cores on which a helper is started by default: with one, nothing can run beside the SEG. On this
# project's 2-core machine the SR built beside the SEG shortened the tail by 0.14 s on average in `make bench-sr`
# (12 node runs each way, five sets of six in its favour), by nothing in make bench's pair of runs at f120070 and
# in 3 alternating runs each way, and the SEG itself took longer beside it (0.43 s against 0.34 s): the SEG, the
# SR and the preview are mostly Python and share the two cores.
MIN_CORES = 2


def sr_beside(setting: bool | None) -> bool:
    """Whether the node starts a helper: `inference.sr_process`, or where unset, whether this process may run on
    MIN_CORES or more cores."""
    if setting is not None:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores >= MIN_CORES


def _run(payload: bytes) -> float:
    """In the helper: the job, unpickled here so that the caller pickles it at once (see `SrProcess.submit`)."""
    job: SrJob = pickle.loads(payload)
    return job.run()


def _pid() -> int:
    return os.getpid()


NAME = b"livernode-sr"  # the helper's name in ps and /proc/PID/comm


def _init(parent: int) -> None:
    """The helper's start: it dies with the node (a node killed with SIGKILL leaves no helper behind), leaves
    Ctrl-C, which reaches the whole process group, to the node, and names itself."""
    if not die_with_parent(parent):
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(15, NAME)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: only the name is missing
        pass


class SrProcess:
    """One helper process that builds and writes SRs, started on first use (or by `pid`) and after a failure."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def _running(self) -> ProcessPoolExecutor:
        """The helper's pool, started where there is none (under the lock). Its process is spawned by the thread
        that first submits to it, and dies with that thread (PR_SET_PDEATHSIG): the node's main or worker thread,
        both as long-lived as the node."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_init,
                                             initargs=(os.getpid(),))
        return self._pool

    def pid(self) -> int:
        """The helper's process ID, starting it where none runs (RuntimeError after `stop`)."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the SR process was stopped")
            pool = self._running()
        return pool.submit(_pid).result(timeout=WAIT_S)

    def submit(self, job: SrJob, what: str) -> Future | None:
        """Hand `job` (the SR of `what`: the series, in log lines) to the helper; None where it cannot take it
        (with a warning naming `what`) or after `stop`: the caller then builds the SR itself. The job is pickled
        here, before this returns: the pool's own feeder thread would pickle it later, while the caller may
        already be changing what it was made from."""
        try:
            payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - a value that cannot be pickled: the helper itself is fine
            log.warning("%s: the SR cannot go to the SR process (%s: %s); building it after the SEG", what,
                        type(exc).__name__, exc)
            return None
        with self._lock:
            if self._stopped:
                return None
            try:
                return self._running().submit(_run, payload)
            except (BrokenProcessPool, RuntimeError) as exc:  # the helper died since the last job
                failed = exc
        log.warning("%s: the SR process cannot take the SR (%s: %s); building it after the SEG", what,
                    type(failed).__name__, failed)
        self.restart()
        return None

    def wait(self, future: Future, job: SrJob, what: str) -> float:
        """The seconds the helper took for `job`; where it failed, the SR built here instead (and the helper
        replaced), with a warning naming `what` (the series) and the reason."""
        try:
            return future.result(timeout=WAIT_S)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong there, the SR is built here
            stuck = isinstance(exc, TimeoutError)
            reason = f"no answer in {WAIT_S:.0f} s" if stuck else f"{type(exc).__name__}: {exc}"
            log.warning("%s: the SR process failed (%s); building the SR in the node's own process", what, reason)
            if stuck or isinstance(exc, BrokenProcessPool):
                self.restart()  # the stuck one is killed before the SR is written here
            for left in job.path.parent.glob(f".{job.path.name}.*.tmp"):  # a killed helper's partial file
                left.unlink(missing_ok=True)
            return job.run()

    def settle(self, future: Future) -> None:
        """Let a job whose result nobody wants end: wait for it (at most WAIT_S), else end the helper with it, so
        that it writes nothing later."""
        if wait([future], timeout=WAIT_S).not_done:
            self.restart()

    def restart(self) -> None:
        """Replace the helper: the running one is ended (a job left in it is dropped), a new one starts on the
        next job."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            _end(pool, 0.0)

    def stop(self) -> None:
        """End the helper (a job in it is finished first, for at most STOP_S); jobs handed in later are refused
        (`submit`)."""
        with self._lock:
            pool, self._pool, self._stopped = self._pool, None, True
        if pool is not None:
            _end(pool, STOP_S)


def _end(pool: ProcessPoolExecutor, grace: float) -> None:
    """Shut a pool down: its process may finish the job it holds for `grace` seconds, and is then killed."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(grace)
        if process.is_alive():
            process.kill()
            process.join(5)
