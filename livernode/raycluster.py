"""Ray, behind the `ray` extra: the one module that imports it. `livernode batch --ray` runs studies on actors that
each load the model once: one actor per GPU when the cluster has GPUs, else one per CPU worker. Ray holds no state
that livernode cannot rebuild: the batch's output folder and its markers are the record.

Safe by default. Anyone who reaches a Ray port can run code on the cluster, so:
- token authentication is always on (`RAY_AUTH_MODE=token`): a local Ray generates its token
  (`~/.ray/auth_token`, unless `RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH` names one); to join a cluster the token
  comes from the same places, set by the operator;
- `local` binds every Ray process to 127.0.0.1 (`listeners_beyond_loopback` checks it);
- no dashboard, hence no Jobs API, and no usage statistics sent anywhere;
- TLS where the cluster is configured for it: Ray's own `RAY_USE_TLS=1` with `RAY_TLS_SERVER_CERT`,
  `RAY_TLS_SERVER_KEY` and `RAY_TLS_CA_CERT` (mutual: every Ray process, and this one, presents the certificate);
  livernode checks the three files before Ray starts, and says when traffic to another machine goes unencrypted."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from livernode.batch import IN_FLIGHT_PER_WORKER, Job, Outcome, lost, study_failures
from livernode.errors import LivernodeError, MissingExtra

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
START_TIMEOUT_S = 120.0  # how long a run waits for an actor when it has none left to run on
SPARE_ACTORS = 2  # replacements for lost actors, per actor the run started with
# Studies between their decoding and their results, per model actor: the actor's own two (IN_FLIGHT_PER_WORKER)
# and two more being decoded or written. Each holds its volume in the object store.
IN_FLIGHT_PER_ACTOR = 4


@dataclass(frozen=True)
class RayRun:
    """What a run on Ray did: the actors that became ready, with their placement, and the most studies that were
    in flight at once."""

    actors: tuple[dict, ...]
    peak_in_flight: int


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingExtra("--ray needs Ray: pip install 'livernode[ray]'") from None
    return ray


TLS_FILES = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def tls_configured() -> bool:
    """Whether Ray's TLS is asked for (`RAY_USE_TLS`); if so, each of its three files must be readable: Ray
    itself would only hang on a connection it cannot make."""
    if os.environ.get("RAY_USE_TLS", "0").strip().lower() not in ("1", "true"):
        return False
    for var in TLS_FILES:
        path = os.environ.get(var, "")
        if not path:
            raise LivernodeError(f"RAY_USE_TLS is on but {var} is not set (Ray's TLS needs {', '.join(TLS_FILES)})")
        try:
            with open(path, "rb") as fh:
                if not fh.read(1):
                    raise LivernodeError(f"{var}: {path} is empty")
        except OSError as exc:
            raise LivernodeError(f"{var}: cannot read {path}: {exc.strerror}") from None
    return True


def connect(address: str, num_cpus: int | None = None):
    """Start Ray on this machine (`address` "local", with `num_cpus` CPU slots) or join the cluster at `address`
    (host:port of its head); returns the `ray` module, initialised. Token authentication is on either way."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    loopback = address == "local" or address.rsplit(":", 1)[0] in LOOPBACK_HOSTS
    if address != "local":
        # Each try to reach the head waits about 40 s, and Ray tries 20 times: a mistyped address would hang for a
        # quarter of an hour (read when ray is imported).
        os.environ.setdefault("RAY_NUM_REDIS_GET_RETRIES", "3")
    if loopback:
        # ray.init turns 127.0.0.1 into this machine's first routable address (so that other machines could
        # join), and its servers then listen on every interface. With this set (read when ray is imported) 127.0.0.1
        # stays 127.0.0.1 and every Ray process binds to loopback only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    tls = tls_configured()
    if not tls and not loopback:
        log.warning("Ray traffic to %s is not encrypted (token authentication does not encrypt): set RAY_USE_TLS "
                    "and its certificates on every machine, or keep the cluster on a private network", address)
    ray = _import_ray()
    try:
        if address == "local":
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                     logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        raise LivernodeError(f"cannot {'start Ray' if address == 'local' else 'join the Ray cluster at ' + address}: "
                             f"{exc}") from None
    log.info("Ray %s: token authentication on, TLS %s", "started on 127.0.0.1" if address == "local" else
             f"joined at {address}", "on" if tls else "off")
    return ray


@contextmanager
def session(address: str, num_cpus: int | None = None) -> Iterator[object]:
    """`connect`, and disconnect at the end (a local Ray stops, with its actors)."""
    ray = connect(address, num_cpus)
    try:
        yield ray
    finally:
        ray.shutdown()


class ModelActor:
    """A Ray actor that holds one loaded model (an ONNX Runtime session) and segments decoded series: the only
    part of a study that needs the GPU."""

    def __init__(self, model_name: str, model_bytes: bytes, providers: str) -> None:
        import ray

        from livernode.inference.runner import Segmenter

        ctx = ray.get_runtime_context()
        self.info = {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(), "gpu_ids": ray.get_gpu_ids(),
                     "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
                     "hostname": socket.gethostname()}
        self.name = f"{socket.gethostname()}:{os.getpid()} actor {ctx.get_actor_id()[:8]}"
        # loaded, the model's file goes at once: an actor ended by ray.kill or with its process cleans up nothing
        with tempfile.TemporaryDirectory(prefix="livernode-actor-") as folder:
            path = Path(folder) / model_name  # the model's file name goes into every summary.json
            path.write_bytes(model_bytes)
            self.segmenter = Segmenter(path, providers=providers, threads=1)
        self.info.update(worker=self.name, providers=self.segmenter.providers_used)

    def describe(self) -> dict:
        return self.info

    def segment(self, key: str, decoded: Sequence) -> tuple[Outcome | list[float], list | None]:
        """(seconds per series, uint8 labels per series), or (the failed Outcome, None)."""
        from livernode.daemon.pipeline import segment_decoded

        t0 = time.perf_counter()
        seconds, labels = [], []
        with study_failures(key, self.name, t0) as failed:
            for d in decoded:
                t = time.perf_counter()
                labels.append(segment_decoded(d, self.segmenter))
                seconds.append(time.perf_counter() - t)
            return seconds, labels
        return failed[0], None


@dataclass
class _Flight:
    """A study between its decoding and its results: the references it holds and the time it took so far."""

    job: Job
    decoded: object = None  # reference to its decoded series
    labels: object = None  # reference to its labels, once an actor has them in hand
    decoded_on: str = ""  # the process that decoded it
    seconds: float = 0.0
    actor: int = -1


def run_on_ray(jobs: Sequence[Job], model: Path, workers: int, finish: Callable[[Job, Outcome], None],
               start_timeout_s: float = START_TIMEOUT_S) -> RayRun:
    """Run `jobs` on the connected cluster, in three steps: decoding (headers, series selection, pixels) as a CPU
    task anywhere in the cluster; the network on a model actor, one per GPU (num_gpus=1 each; ONNX Runtime uses
    CUDA when the CUDA build is installed, the CPU otherwise), else `workers` CPU actors; post-processing and the
    results as a CPU task again. Files go over as bytes and volumes and labels through Ray's object store, so no
    shared disk is needed. At most IN_FLIGHT_PER_ACTOR studies per actor are between their decoding and their
    results at a time, at most IN_FLIGHT_PER_WORKER of them handed to an actor. A study whose task, actor or
    machine is lost runs again from its decoding (`lost`); a lost actor is replaced when the cluster has room."""
    ray = _import_ray()
    from livernode.batch import decode_payload, write_payload
    from livernode.daemon.pipeline import ModelFacts
    from livernode.inference.runner import Segmenter

    gpus = int(ray.cluster_resources().get("GPU", 0))
    # A GPU actor's slot is its GPU: the machine's CPU slots are for decoding and writing.
    count, options, providers = ((gpus, {"num_gpus": 1, "num_cpus": 0}, "auto") if gpus else
                                 (workers, {"num_cpus": 1}, "cpu"))
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus - (0 if gpus else count) < 1:
        raise LivernodeError(f"the Ray cluster has {cpus} CPU slot(s): {count} CPU actor(s) leave none for decoding; "
                             f"ask for fewer --workers")
    actor_cls = ray.remote(ModelActor).options(max_restarts=0, max_task_retries=0, **options)
    # Ray retries neither: a study whose task is lost runs again from the start, counted (`lost`)
    decode = ray.remote(decode_payload).options(num_cpus=1, num_returns=2, max_retries=0)
    write = ray.remote(write_payload).options(num_cpus=1, max_retries=0)
    model_ref = ray.put(Path(model).read_bytes())
    manifest = Segmenter(model, providers="cpu", threads=1).manifest
    log.info("starting %d Ray actor(s) (%s)", count, f"one per GPU of {gpus}" if gpus else "CPU")
    starting: dict = {}  # describe() ref -> (actor id, handle) of actors not yet ready
    ready: dict[int, object] = {}
    facts: dict[int, ModelFacts] = {}
    names: dict[int, str] = {}  # the actor's name: the csv's worker column
    load: dict[int, int] = {}
    placed: list[dict] = []
    spares = SPARE_ACTORS * count

    def start(n: int) -> None:
        actor = actor_cls.remote(Path(model).name, model_ref, providers)
        starting[actor.describe.remote()] = (n, actor)

    for n in range(count):
        start(n)
    next_id = count
    pending = deque(jobs)
    waiting: deque[_Flight] = deque()  # decoded, waiting for an actor
    stage: dict = {}  # reference -> (step, flight): "decode", "segment" or "write"
    flights = peak = 0
    limit = IN_FLIGHT_PER_ACTOR * count
    trouble = ""  # why the last actor was lost or did not start

    def replace_actor(n: int, actor, what: str, why: str) -> None:
        nonlocal next_id, spares, trouble
        trouble = f"actor {what}: {why}"
        log.warning("Ray actor %d %s (%s)%s", n, what, why, "; starting another" if spares else "")
        ray.kill(actor)
        if spares:
            spares -= 1
            start(next_id)
            next_id += 1

    def landed(flight: _Flight, outcome: Outcome | None, why: str = "") -> None:
        nonlocal flights
        flights -= 1
        if outcome is None:
            lost(flight.job, why, pending.appendleft, finish)
        else:
            finish(flight.job, outcome)

    while pending or flights:
        while pending and flights < limit and (ready or starting):
            job = pending.popleft()
            payload = [f.read_bytes() for f in job.study.files]
            small, big = decode.remote(job.study.key, payload, [model_ref], manifest.weights_sha256)
            stage[small] = ("decode", _Flight(job, big))
            flights += 1
            peak = max(peak, flights)
        while waiting:
            free = [n for n in ready if load[n] < IN_FLIGHT_PER_WORKER]
            if not free:
                break
            n = min(free, key=lambda k: load[k])
            flight = waiting.popleft()
            flight.actor = n
            small, labels = ready[n].segment.options(num_returns=2).remote(flight.job.study.key, flight.decoded)
            stage[small] = ("segment", flight)
            flight.labels = labels
            load[n] += 1
        waitable = list(stage) + list(starting)
        if not waitable:
            break
        done, _ = ray.wait(waitable, num_returns=1, timeout=None if stage else start_timeout_s)
        if not done:
            break  # no actor to run on, and none started within the timeout
        ref = done[0]
        if ref in starting:
            n, actor = starting.pop(ref)
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError as exc:  # its machine went away, or the model did not load there
                replace_actor(n, actor, "did not start", _first_line(exc))
                continue
            ready[n], load[n] = actor, 0
            names[n] = info["worker"]
            facts[n] = ModelFacts(manifest, Path(model).name, tuple(info["providers"]))
            placed.append(info)
            log.info("Ray actor %d ready: %s, GPUs %s, ONNX Runtime on %s", n, info["worker"],
                     info["gpu_ids"] or "none", ",".join(info["providers"]))
            continue
        step, flight = stage.pop(ref)
        if step == "segment":
            load[flight.actor] = max(0, load.get(flight.actor, 1) - 1)
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayError as exc:  # our code never raises for a study: a process, object or machine
            why = _first_line(exc)
            if step == "segment" and isinstance(exc, ray.exceptions.RayActorError) and flight.actor in ready:
                replace_actor(flight.actor, ready.pop(flight.actor), "lost", why)
            landed(flight, None, f"its Ray {'actor' if step == 'segment' else step + ' task'} or machine was lost")
            continue
        if step == "write":  # the study's results, or its failure there; the seconds of every step
            landed(flight, replace(answer, decoded_on=flight.decoded_on))
        elif isinstance(answer, Outcome):  # the study failed in this step
            landed(flight, replace(answer, seconds=flight.seconds + answer.seconds))
        elif step == "decode":
            flight.seconds, flight.decoded_on = answer
            waiting.append(flight)
        elif step == "segment":
            n = flight.actor
            flight.seconds += sum(answer)
            stage[write.remote(flight.job.study.key, flight.decoded, flight.labels, facts[n], answer, names[n],
                               flight.seconds)] = ("write", flight)
    why = trouble or f"none started within {start_timeout_s:.0f} s"
    for job in list(pending) + [f.job for f in waiting]:  # only when no actor is left to run them
        finish(job, Outcome(job.study.key, False, f"no Ray actor to run on ({why}; cluster resources free: "
                                                  f"{ray.available_resources()})", transient=True))
    for _, actor in list(starting.values()) + [(n, a) for n, a in ready.items()]:
        ray.kill(actor)
    return RayRun(tuple(placed), peak)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_USERS = re.compile(r'\("([^"]*)",pid=(\d+)')


def process_tree(root: int) -> set[int]:
    """`root` and every process below it (by parent pid in /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid, ppid = int(text.split(" ", 1)[0]), int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def listeners(root_pid: int) -> list[tuple[str, int, int, str]]:
    """TCP sockets listening in `root_pid` or its descendants (a Ray driver and the Ray processes it started), as
    (address, port, pid, process name), from `ss -ltnp`."""
    pids = process_tree(root_pid)
    try:
        text = subprocess.run(["ss", "-H", "-ltnp"], capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise LivernodeError(f"cannot list listening sockets with ss: {exc}") from None
    found = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 6:
            continue
        address, _, port = cols[3].rpartition(":")
        for name, pid in _USERS.findall(" ".join(cols[5:])):
            if int(pid) in pids:
                found.append((address.strip("[]"), int(port), int(pid), name))
    return found


def listeners_beyond_loopback(root_pid: int) -> list[str]:
    """The listening sockets of `root_pid` and its descendants bound to anything but loopback, as
    'address:port (process pid)'; empty when all listen on 127.0.0.1 only."""
    def loopback(address: str) -> bool:
        address = address.removeprefix("::ffff:")
        return address.startswith("127.") or address == "::1"

    return [f"{a}:{p} ({name} {pid})" for a, p, pid, name in listeners(root_pid) if not loopback(a)]

