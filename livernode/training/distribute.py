"""Where training runs: the distribution strategy (one device, every local GPU, or several machines) and the
numeric precision. The same code runs on a laptop CPU, a GPU workstation and two of them; tests run it over two
logical CPU devices."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from livernode.errors import TrainingError

log = logging.getLogger(__name__)
StrategyKind = Literal["auto", "default", "mirrored", "multi-worker"]
Precision = Literal["auto", "mixed", "float32"]


@dataclass(frozen=True)
class Placement:
    strategy: Any  # a tf.distribute.Strategy
    kind: str  # "default", "mirrored" or "multi-worker"
    replicas: int
    workers: int
    worker_index: int
    precision: str  # "mixed" or "float32"
    gpus: int

    @property
    def chief(self) -> bool:
        return self.worker_index == 0

    def describe(self) -> str:
        where = f"{self.gpus} GPU(s)" if self.gpus else "CPU"
        return (f"{self.kind} strategy, {self.replicas} replica(s) on {self.workers} worker(s), {where}, "
                f"{self.precision} precision")


def split_cpu(tf, n: int) -> None:
    """Split the CPU into `n` logical devices (before TensorFlow initialises its devices): MirroredStrategy can
    then be exercised without GPUs."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])


def _tf_config() -> dict | None:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
        workers = cfg["cluster"]["worker"]
        index = int(cfg["task"]["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"TF_CONFIG is not a valid cluster description ({exc}): {raw[:200]}") from None
    if not 0 <= index < len(workers):
        raise TrainingError(f"TF_CONFIG task index {index} is outside its {len(workers)} workers")
    others = sorted((set(cfg["cluster"]) | {cfg["task"].get("type", "worker")}) - {"worker"})
    if others:  # a chief or a parameter server would lead the coordination, and this code counts workers only
        raise TrainingError(f"TF_CONFIG names {', '.join(map(str, others))}: livernode's multi-worker training "
                            "takes workers only (worker 0 is the chief)")
    return cfg


# How long the workers' coordination service waits for a worker's heartbeat before it fails the whole run.
# TensorFlow's default (10 s) ended a two-worker run on this 2-core machine while another job kept both cores busy
# (the workers' validation pass took 51 s there, and the heartbeat thread did not get its turn). A worker that
# really dies still stops the others, only that much later.
HEARTBEAT_TIMEOUT_S = 120


def coordinate(context, workers: int, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> None:
    """Configure the coordination service of TensorFlow's `context` as MultiWorkerMirroredStrategy would (led by
    worker 0, all `workers` coordinated), with `heartbeat_timeout_s`. Call before the strategy is made."""
    from tensorflow.python.eager.context import coordination_config_pb2  # where this TensorFlow keeps it

    context.configure_coordination_service(
        service_type="standalone", service_leader="/job:worker/replica:0/task:0",
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=workers)],
        heartbeat_timeout_in_ms=int(heartbeat_timeout_s * 1000))


def place(tf, kind: StrategyKind = "auto", precision: Precision = "auto") -> Placement:
    """Choose the strategy and precision. Call before any other TensorFlow work (multi-worker needs it first).

    auto: several machines when TF_CONFIG names more than one worker, every GPU when there are two or more, else
    the default (one device). Mixed precision (float16 compute, float32 softmax, loss scaling) is the default on
    a GPU; on the CPU float16 is slower, so auto means float32 there."""
    cluster = _tf_config()
    if kind == "auto":
        if cluster and len(cluster["cluster"]["worker"]) > 1:
            kind = "multi-worker"
        else:
            kind = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"
    workers, index = 1, 0
    if kind == "multi-worker":
        if not cluster:
            raise TrainingError("--strategy multi-worker needs TF_CONFIG (the cluster's workers and this one's index)")
        workers, index = len(cluster["cluster"]["worker"]), int(cluster["task"]["index"])
        from tensorflow.python.eager import context  # the strategy leaves a service configured here as it is

        ctx = context.context()
        coordinate(ctx, workers)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        service = ctx.coordination_service  # what the strategy went on with
        log.info("workers' coordination: led by %s, heartbeat timeout %.0f s", service.service_leader,
                 service.heartbeat_timeout_in_ms / 1000)
    elif kind == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif kind == "default":
        strategy = tf.distribute.get_strategy()
    else:
        raise TrainingError(f"unknown strategy {kind!r} (auto, default, mirrored or multi-worker)")
    gpus = len(tf.config.list_physical_devices("GPU"))
    if precision == "auto":
        precision = "mixed" if gpus else "float32"
    if precision not in ("mixed", "float32"):
        raise TrainingError(f"unknown precision {precision!r} (auto, mixed or float32)")
    tf.keras.mixed_precision.set_global_policy("mixed_float16" if precision == "mixed" else "float32")
    placement = Placement(strategy, kind, int(strategy.num_replicas_in_sync), workers, index, precision, gpus)
    log.info("training with %s", placement.describe())
    return placement


def barrier(tf, placement: Placement) -> None:
    """Wait until every worker gets here (one all-reduce). The other workers wait for the chief's report, so the
    cluster's coordination service does not see a worker leave while the chief still works."""
    if placement.workers > 1:
        s = placement.strategy
        tf.function(lambda: s.reduce(tf.distribute.ReduceOp.SUM, s.run(lambda: tf.constant(1.0)), axis=None))()
