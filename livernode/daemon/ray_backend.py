"""`[inference] backend = "ray"`: the worker hands studies to Ray actors, several at once.

Each actor loads the model once (one per GPU of the cluster, else `ray_actors` on CPUs). A study goes to an actor
as its files' bytes and comes back as the bytes of its result files, so the actors need no shared disk; the node
writes the results into its own results folder, and its SQLite index and outbox stay the only record. Ray holds
nothing that the node cannot rebuild: a study whose actor or machine is lost is due again (its attempt counted as
a crash's), and a node killed mid-study redoes it at the next start.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from livernode.config import InferenceConfig, SelectionConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteResult:
    """One series' result as an actor returns it: paths relative to the study's result folder."""

    seg: str
    sr: str
    timings: dict
    slices: int
    decisions: tuple


class NodeActor:
    """Ray actor: one loaded model; runs the node's pipeline on a study handed over as file bytes."""

    def __init__(self, model_name: str, model_bytes: bytes, providers: str) -> None:
        from livernode.inference.runner import Segmenter

        # The session holds the model once loaded, so its file goes at once: an actor is ended by ray.kill or
        # with its worker process, which runs no clean-up, and each left a copy of the model in /tmp.
        with tempfile.TemporaryDirectory(prefix="livernode-node-actor-") as folder:
            path = Path(folder) / model_name  # the model's file name goes into every summary.json
            path.write_bytes(model_bytes)
            self.segmenter = Segmenter(path, providers=providers, threads=1)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def describe(self) -> dict:
        return {"worker": self.name, "providers": self.segmenter.providers_used,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def run(self, files: list[bytes], series_number_offset: int, rules: SelectionConfig | None
            ) -> tuple[list[RemoteResult], dict[str, bytes]]:
        """The study's results (one per segmented series) and every file of its result folder, by relative path.
        An expected failure (no usable series, a refused input) is raised as itself and reaches the node."""
        from livernode.daemon.pipeline import process_all

        from livernode.batch import staged

        with staged(files) as paths, tempfile.TemporaryDirectory(prefix="livernode-study-") as work:
            out = Path(work) / "out"
            results = process_all(paths, self.segmenter, out, series_number_offset=series_number_offset,
                                  rules=rules)
            remote = [RemoteResult(str(r.seg_path.relative_to(out)), str(r.sr_path.relative_to(out)),
                                   dict(r.timings), r.slices, tuple(r.decisions)) for r in results]
            blobs = {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}
            return remote, blobs


class RayStudies:
    """The node's handle on its actors: submit a study, wait for any, tell a lost actor from a failed study."""

    def __init__(self, cfg: InferenceConfig, model: Path) -> None:
        from livernode.raycluster import connect

        self.ray = ray = connect(cfg.ray_address)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count, options, providers = ((gpus, {"num_gpus": 1, "num_cpus": 1}, cfg.providers) if gpus else
                                     (cfg.ray_actors, {"num_cpus": 1}, "cpu"))
        # A dead actor is restarted by Ray (from the model kept here in the object store); the study it held fails
        # with an actor error and is redone by the node once an actor answers again.
        cls = ray.remote(NodeActor).options(max_restarts=-1, max_task_retries=0, **options)
        self.model_ref = ray.put(Path(model).read_bytes())
        self.actors = [cls.remote(Path(model).name, self.model_ref, providers) for _ in range(count)]
        self.placement = ray.get([a.describe.remote() for a in self.actors])
        self.load = [0] * count
        self.probes: dict[int, object] = {}  # lost actor -> describe() reference that answers once it is back
        self.lost_errors = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                            ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                            ray.exceptions.LocalRayletDiedError)
        log.info("Ray backend: %d actor(s) on %s", count, ", ".join(sorted({p["worker"] for p in self.placement})))

    def free(self) -> int:
        """Actors that can take a study now: idle, and answering (a lost one is back once it answers again)."""
        if self.probes:
            ready, _ = self.ray.wait(list(self.probes.values()), num_returns=len(self.probes), timeout=0)
            for k, ref in list(self.probes.items()):
                if ref in ready:
                    try:
                        self.ray.get(ref)
                        del self.probes[k]
                        log.info("Ray actor %d answers again", k)
                    except self.lost_errors:
                        self.probes[k] = self.actors[k].describe.remote()
        return sum(1 for k in range(len(self.actors)) if k not in self.probes and self.load[k] == 0)

    def submit(self, files: list[Path], series_number_offset: int, rules: SelectionConfig | None):
        """Hand a study to an idle actor that answers; returns (reference, actor index)."""
        k = next(i for i in range(len(self.actors)) if i not in self.probes and self.load[i] == 0)
        self.load[k] += 1
        # the bytes travel through Ray's object store: the actor may run on a machine without this node's disk
        return self.actors[k].run.remote([Path(f).read_bytes() for f in files], series_number_offset, rules), k

    def done(self, k: int) -> None:
        self.load[k] = max(0, self.load[k] - 1)

    def lost(self, k: int) -> None:
        """Actor k died: no study for it until Ray has restarted it and it answers. Its machine may be gone with it,
        and the idle actors there too, unnoticed until they are handed a study: every idle actor is asked as well,
        so a study is never given to an actor that is already dead (which would cost it a second attempt)."""
        self.done(k)
        for i in range(len(self.actors)):
            if i == k or (self.load[i] == 0 and i not in self.probes):
                self.probes[i] = self.actors[i].describe.remote()

    def wait(self, refs: list, timeout: float) -> list:
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        return ready

    def result(self, ref):
        """The actor's answer; an expected failure raised in the actor comes back as itself (its cause)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise

    def cancel(self, ref) -> None:
        try:
            self.ray.cancel(ref, force=False)
        except Exception:  # best effort: the node is stopping and the study stays due anyway
            pass

    def close(self) -> None:
        self.ray.shutdown()
