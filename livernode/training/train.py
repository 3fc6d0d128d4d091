"""`livernode train`: fit the U-Net from the prepared cache, keep the best checkpoint by validation Dice and a
resumable one every epoch, write plots and metric tables.

Memory does not grow with the number of cases: batches stream from the prepared cache, and validation, the
metrics report, the overlays and the parity sample read one case (or a few slices) at a time.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from livernode.config import PreprocessConfig, TrainingConfig
from livernode.errors import TrainingError, TrainingInterrupted
from livernode.fsutil import replacing, write_json
from livernode.imaging import metrics as M
from livernode.imaging.preprocess import PreprocessSpec
from livernode.training import plots
from livernode.training.cache import prepare
from livernode.imaging.grid import from_grid, sliding_window
from livernode.training.cache import TUMOUR_LABELLED
from livernode.training.data import Batches, CaseSplit, fold_members, split_cases, targets
from livernode.training.volumes import PatchBatches, VolumeSplit
from livernode.training.datasets import list_cases
from livernode.training.distribute import Placement, barrier, place
from livernode.training.model import (build_network, describe, import_tf, load_model, make_loss, make_metrics,
                                      recalibrate_batchnorm)

log = logging.getLogger(__name__)
CHECKPOINT = "best.h5"
LAST = "last"  # tf.train.Checkpoint of model, optimizer and global step, written every epoch and on Ctrl-C
STATE = "state.json"
PARITY_SAMPLE = "validation_sample.npz"  # real validation slices for the export parity check
PRED_BATCH = 16
REPORT_TRAIN_SLICES = 128
CALIBRATION_BATCHES = 2  # batch-norm statistics are re-estimated on this many training batches per epoch


def spec_from_config(cfg: PreprocessConfig) -> PreprocessSpec:
    return PreprocessSpec(window_low=cfg.window.low, window_high=cfg.window.high, channels=cfg.channels,
                          size=cfg.size, bilateral=cfg.bilateral)


def predict(model, x: np.ndarray) -> np.ndarray:
    """Softmax probabilities (n, ..., 3) for network inputs x (slices or patches), PRED_BATCH at a time."""
    if len(x) == 0:
        return np.zeros(x.shape[:-1] + (3,), np.float32)
    return np.concatenate([np.asarray(model.predict_on_batch(x[i:i + PRED_BATCH]), np.float32)
                           for i in range(0, len(x), PRED_BATCH)])


def case_probabilities(model, split: CaseSplit, k: int):
    """(start, probabilities (m, s, s, 3)) of case k's prepared slices, PRED_BATCH slices at a time, as the node
    computes them: slice by slice with their context, or for a V-Net by the sliding window over the case's grid,
    resampled back to the slices."""
    case = split.cases[k]
    if isinstance(split, VolumeSplit):
        g = split.grids[k]
        vol = split.volume_cfg
        prob = sliding_window(g.images().astype(np.float32), tuple(vol.patch), vol.overlap,
                              lambda x: predict(model, x), batch=2)
        yield from from_grid(prob, g.grid, chunk=PRED_BATCH)
        return
    for i in range(0, case.n, PRED_BATCH):
        yield i, predict(model, split.case_chunk(k, i, i + PRED_BATCH)[0])


def _effective(t: np.ndarray, p: np.ndarray, known: np.ndarray):
    """numpy twin of model._effective: on slices without tumour labels liver means liver-or-tumour."""
    k = known.astype(np.float32)[:, None, None, None]
    t_m = np.concatenate([t[..., 0:1], t[..., 1:2] + t[..., 2:3], np.zeros_like(t[..., 2:3])], -1)
    p_m = np.concatenate([p[..., 0:1], p[..., 1:2] + p[..., 2:3], np.ones_like(p[..., 2:3])], -1)
    valid = np.concatenate([np.ones_like(k), np.ones_like(k), k], -1)
    return k * t + (1 - k) * t_m, k * p + (1 - k) * p_m, valid


class SplitScore:
    """Everything validation and the report need from one split, accumulated case by case: the training loss
    over the whole split (its Dice sums and focal sum add up exactly), the hard-prediction IoU and F-score as the
    training metrics define them, global Dice, and each class's confusion figures with AUC."""

    def __init__(self, class_weights, focal_weight: float, gamma: float = 2.0) -> None:
        self.w = np.asarray(class_weights, np.float64)
        self.focal_weight, self.gamma = focal_weight, gamma
        self.inter, self.denom = np.zeros(3), np.zeros(3)
        self.focal_sum, self.pixels, self.slices = 0.0, 0, 0
        self.hard = np.zeros((2, 3))  # per class (liver, tumour): intersection, prediction, truth (folded)
        self.liver, self.tumour = M.ConfusionCounter(), M.ConfusionCounter()

    def add(self, prob: np.ndarray, y: np.ndarray, known: np.ndarray) -> None:
        t3 = targets(y, known)[..., :3]
        t, p, valid = _effective(t3, np.clip(prob, 1e-7, 1 - 1e-7), known)
        self.inter += (t * p * valid).sum((0, 1, 2))
        self.denom += ((t + p) * valid).sum((0, 1, 2))
        pc = np.clip(p, 1e-7, 1.0)
        self.focal_sum += float((-t * (1 - pc) ** self.gamma * np.log(pc) * valid * self.w).sum())
        self.pixels += int(np.prod(y.shape))
        self.slices += len(y)
        pred = prob.argmax(-1)
        k = known.astype(bool)
        # as make_metrics: on tumour-labelled slices liver is label 1; elsewhere liver-or-tumour, tumour ignored
        for c, (hp, g) in enumerate((
                (np.where(k[:, None, None], pred == 1, pred > 0), np.where(k[:, None, None], y == 1, y > 0)),
                (pred[k] == 2, y[k] == 2))):
            self.hard[c] += ((hp & g).sum(), hp.sum(), g.sum())
        self.liver.add(pred > 0, prob[..., 1] + prob[..., 2], y > 0)
        if k.any():
            self.tumour.add(pred[k] == 2, prob[k][..., 2], y[k] == 2)

    @property
    def loss(self) -> float:
        eps = 1e-5
        dice = (2 * self.inter + eps) / (self.denom + eps)
        return float(1 - (self.w * dice).sum() / self.w.sum() + self.focal_weight * self.focal_sum / max(1, self.pixels))

    def logs(self) -> dict[str, float]:
        eps = 1e-5
        inter, p, g = self.hard[:, 0], self.hard[:, 1], self.hard[:, 2]
        liver = self.liver.result().dice if self.liver.seen else float("nan")
        tumour = self.tumour.result().dice if self.tumour.seen else float("nan")
        return {"loss": self.loss,
                "iou_score": float(np.mean((inter + eps) / (p + g - inter + eps))),
                "f1_score": float(np.mean((2 * inter + eps) / (p + g + eps))),
                "dice_liver": liver, "dice_tumour": tumour,
                "score": liver if math.isnan(tumour) else (liver + tumour) / 2}

    def rows(self, name: str) -> list[dict]:
        rows = [{"split": name, "class": "liver", "loss": self.loss, **self.liver.result().as_dict()}] \
            if self.slices else []
        if self.tumour.seen:
            rows.append({"split": name, "class": "tumour", "loss": self.loss, **self.tumour.result().as_dict()})
        return rows


def score_split(model, tc, split: CaseSplit) -> SplitScore:
    """Predict PRED_BATCH slices of one case at a time (never a whole split, nor a whole case) and accumulate."""
    score = SplitScore(tc.class_weights, tc.focal_weight)
    for k, case in enumerate(split.cases):
        for start, prob in case_probabilities(model, split, k):
            stop = start + len(prob)
            score.add(prob, case.labels(start, stop), case.flags[start:stop, TUMOUR_LABELLED])
    return score


def score_sample(model, tc, split: CaseSplit, n: int, seed: int) -> SplitScore:
    """The same on a seeded sample of n slices (the training split's report row); a V-Net on whole cases, as many
    as hold about n slices."""
    score = SplitScore(tc.class_weights, tc.focal_weight)
    if isinstance(split, VolumeSplit):
        order = np.random.default_rng(seed).permutation(len(split.cases))
        sizes = np.cumsum([split.cases[k].n for k in order])
        chosen = order[:max(1, int(np.searchsorted(sizes, n)))]
        sub = VolumeSplit(split.name, tuple(split.cases[k] for k in chosen), volume_cfg=split.volume_cfg)
        return score_split(model, tc, sub)
    pick = np.sort(np.random.default_rng(seed).choice(split.n, min(n, split.n), replace=False))
    for i in range(0, len(pick), PRED_BATCH):
        x, y, known = split.take(pick[i:i + PRED_BATCH])
        score.add(predict(model, x), y, known)
    return score


class _SigintDeferred:
    """Ctrl-C during an epoch's end (validation, checkpoints, history) waits until that end is complete, then
    stops the run, so an interrupted run never has a trained epoch that was neither validated nor recorded."""

    def __enter__(self):
        self.got, self.old = False, None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.got = True
        log.warning("Ctrl-C: finishing this epoch's validation and checkpoint, then stopping")

    def __exit__(self, kind, exc, tb):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.got and kind is None:
            raise KeyboardInterrupt
        return False


class _Progress:
    """One bar for the whole run: batches, slices per second and the ETA of the run; the epoch in its title."""

    def __init__(self, tf, steps: int, epochs: int, first_step: int, batch: int, enabled: bool, started: float,
                 unit: str = "slices"):
        outer = self
        self.first = True
        self.bar = tqdm(total=steps * epochs, initial=first_step, unit="batch", disable=not enabled,
                        dynamic_ncols=True)
        self.t0, self.done0 = time.monotonic(), first_step

        class Callback(tf.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer.bar.set_description(f"epoch {epoch + 1}/{epochs}")

            def on_train_batch_end(self, step, logs=None):
                if outer.first:  # how long preparing, loading and compiling kept the first step waiting
                    outer.first = False
                    log.info("first training step done %.1f s after the start", time.monotonic() - started)
                outer.bar.update(1)
                rate = (outer.bar.n - outer.done0) * batch / max(1e-9, time.monotonic() - outer.t0)
                shown = {f"{unit}/s": f"{rate:.1f}"}
                if logs and "loss" in logs:
                    shown["loss"] = f"{float(logs['loss']):.4f}"
                outer.bar.set_postfix(shown, refresh=False)

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                shown = {k: f"{v:.3f}" for k, v in logs.items() if k in ("val_dice_liver", "val_dice_tumour")}
                outer.bar.set_postfix(shown)

        self.callback = Callback()

    def close(self) -> None:
        self.bar.close()


@dataclass(frozen=True)
class TrainResult:
    run: Path
    seconds: float
    epochs_run: int
    best_epoch: int
    test_dice_liver: float
    test_dice_tumour: float
    chief: bool = True  # False: another worker of a multi-worker run, whose chief writes the run folder


def _read_history(path: Path) -> dict[str, list[float]]:
    if not path.exists():
        return {}
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    return {k: [float(r[k]) for r in rows] for k in (rows[0].keys() if rows else []) if k != "epoch"}


def _write_history(path: Path, history: dict[str, list[float]]) -> None:
    keys = sorted(history)
    n = len(history.get("loss", []))
    with replacing(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", *keys])
        for i in range(n):
            w.writerow([i + 1, *[history[k][i] if i < len(history[k]) else "" for k in keys]])


REPORT_COLUMNS = ["split", "class", "loss", "accuracy", "precision", "sensitivity", "specificity", "auc",
                  "tp", "fp", "tn", "fn", "dice", "iou"]


class _Run:
    """The run folder's resumable state: the last checkpoint (model, optimizer, global step) and state.json."""

    def __init__(self, tf, out: Path, model, optimizer, chief: bool):
        self.tf, self.out, self.chief = tf, out, chief
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=self.step)
        # Every worker writes (a checkpoint save may need all of them); only the chief's folder is the run's.
        self.folder = out / LAST if chief else out / ".worker-checkpoint"
        self.manager = tf.train.CheckpointManager(self.ckpt, str(self.folder), max_to_keep=1)
        self.state = json.loads((out / STATE).read_text()) if (out / STATE).exists() else {}

    def restore(self) -> int:
        """Restore the last checkpoint; the global step it was taken at (0 when there is none)."""
        if self.manager.latest_checkpoint is None:
            return 0
        self.ckpt.restore(self.manager.latest_checkpoint)
        return int(self.step.numpy())

    def save(self, global_step: int, **state) -> None:
        self.step.assign(global_step)
        self.manager.save(checkpoint_number=global_step)
        self.state.update(state, step=global_step)
        if not state.get("interrupted"):
            self.state.pop("interrupted", None)
        if self.chief:
            write_json(self.out / STATE, self.state)


def train(data: Path, fmt: str, out: Path, cfg: TrainingConfig, *, resume: bool = False, cache: Path | None = None,
          workers: int | None = None, pipeline_workers: int = 4, strategy: str = "auto", precision: str = "auto",
          folds: int | None = None, fold: int | None = None, progress: bool = True,
          placement: Placement | None = None) -> TrainResult:
    """Train on the cases under `data` and write the run folder `out` (see README: Training)."""
    t0 = time.monotonic()
    _, tf = import_tf()
    placement = placement or place(tf, strategy, precision)
    tf.keras.utils.set_random_seed(cfg.split.seed)
    out.mkdir(parents=True, exist_ok=True)
    spec = spec_from_config(cfg.preprocess)
    refs = list_cases(data, fmt)
    prepared = prepare(refs, spec, cache, workers, progress=progress)
    usable = [r for r in refs if r.case_id in prepared.cases]
    parts = split_cases(usable, cfg.split, folds, fold)
    volumetric = cfg.dims == 3
    if volumetric:
        splits = {name: VolumeSplit(name, tuple(prepared.cases[r.case_id] for r in part), spec.channels,
                                    volume_cfg=cfg.volume)
                  for name, part in parts.items()}
    else:
        splits = {name: CaseSplit(name, tuple(prepared.cases[r.case_id] for r in part), spec.channels,
                                  cfg.model.context) for name, part in parts.items()}
    train_s, val_s, test_s = splits["train"], splits["validation"], splits["test"]
    log.info("split by patient: %d train, %d validation, %d test cases (%d/%d/%d slices)",
             len(train_s.cases), len(val_s.cases), len(test_s.cases), train_s.n, val_s.n, test_s.n)

    tc = cfg.train
    if volumetric:
        batches = PatchBatches(train_s, tc, seed=cfg.split.seed, volume=cfg.volume)
        calib = PatchBatches(train_s, tc, seed=cfg.split.seed + 7919, volume=cfg.volume)
        steps = tc.steps_per_epoch or max(1, math.ceil(train_s.voxels / (np.prod(cfg.volume.patch) * batches.size)))
    else:
        # Every worker makes the same global batch for a step; tf.distribute gives each worker's replicas their
        # slices of it, so a step sees the same slices on one machine or several, before and after a resume.
        batches = Batches(train_s, tc, seed=cfg.split.seed)
        calib = Batches(train_s, tc, seed=cfg.split.seed + 7919)
        steps = tc.steps_per_epoch or max(1, math.ceil(train_s.n / tc.batch_size))
    if placement.chief:
        _save_parity_sample(val_s if val_s.n else train_s, out, cfg)
    if batches.size % placement.replicas:
        raise TrainingError(f"batch size {batches.size} does not divide among {placement.replicas} replicas")
    loss_fn = make_loss(tc.class_weights, tc.focal_weight)
    metric_fns = make_metrics()
    with placement.strategy.scope():
        model = build_network(cfg.model.arch, cfg.model.backbone, cfg.input_channels, cfg.model.encoder_weights)
        lr = tc.learning_rate
        if tc.lr_schedule == "cosine":
            lr = tf.keras.optimizers.schedules.CosineDecay(tc.learning_rate, steps * tc.epochs, alpha=0.05)
        optimizer = tf.keras.optimizers.Adam(lr)
        model.compile(optimizer=optimizer, loss=loss_fn, metrics=metric_fns)
    backup = out / "backup"  # BackupAndRestore's, multi-worker only
    auto_resume = placement.kind == "multi-worker" and backup.exists()
    if not (resume or auto_resume) and placement.chief and any(
            (out / n).exists() for n in (LAST, STATE, "backup")):
        log.info("%s holds an earlier run: starting afresh (--resume continues it)", out)
        for name in (LAST, "backup"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (STATE, CHECKPOINT, "history.csv"):
            (out / name).unlink(missing_ok=True)
    run = _Run(tf, out, model, model.optimizer, placement.chief)
    history_path = out / "history.csv"
    first_step = 0
    if resume or auto_resume:
        # A multi-worker run that restarts finds BackupAndRestore's backup, taken at the same epoch end as our
        # checkpoint: the data then resumes at that step, as the weights do.
        first_step = run.restore()
        if first_step:
            log.info("resuming %s at step %d (epoch %d, batch %d of %d)", out, first_step, first_step // steps + 1,
                     first_step % steps, steps)
        if placement.kind != "multi-worker":
            shutil.rmtree(backup, ignore_errors=True)
    history = _read_history(history_path) if first_step else {}
    history = {k: v[:first_step // steps] for k, v in history.items()}
    best = float(run.state.get("val_score", -1.0)) if first_step else -1.0


    def calibration() -> np.ndarray:
        return np.concatenate([calib.batch(i)[0] for i in range(CALIBRATION_BATCHES)])

    state = {"best": best, "best_epoch": int(run.state.get("best_epoch", 0)) if first_step else 0}

    class EpochEnd(tf.keras.callbacks.Callback):
        """Validation case by case, the best checkpoint when the Dice score improves, and the resumable one."""

        def on_epoch_end(self, epoch, logs=None):
            with _SigintDeferred():  # an epoch ends whole: validated, checkpointed and in the history
                self._end(epoch, logs if logs is not None else {})

        def _end(self, epoch, logs):
            recalibrate_batchnorm(self.model, calibration())
            val = score_split(self.model, tc, val_s).logs()
            logs.update({f"val_{k}": v for k, v in val.items()})
            improved = val["score"] > state["best"]
            # Saving reads replicated variables, which is a collective operation across the workers of a
            # multi-worker run: there every worker saves every epoch, whatever its own validation said, and only
            # the chief's improved checkpoint is kept.
            if improved or placement.workers > 1:
                keep = improved and placement.chief
                target = out / (CHECKPOINT if keep else f".scratch-{placement.worker_index}.h5")
                with replacing(target) as tmp:
                    self.model.save(str(tmp), include_optimizer=False)
                if not keep:
                    target.unlink(missing_ok=True)
            if improved:
                state["best"], state["best_epoch"] = val["score"], epoch + 1
                log.info("epoch %d: validation score %.4f (liver %.4f, tumour %.4f), checkpoint saved",
                         epoch + 1, val["score"], val["dice_liver"], val["dice_tumour"])
            for k, v in logs.items():
                history.setdefault(k, []).append(float(v))
            if placement.chief:
                _write_history(history_path, history)
            run.save((epoch + 1) * steps, epochs_done=epoch + 1, val_score=state["best"],
                     best_epoch=state["best_epoch"], optimizer_steps=int(self.model.optimizer.iterations.numpy()))

    bar = _Progress(tf, steps, tc.epochs, first_step, batches.size, progress and placement.chief, t0,
                    "patches" if volumetric else "slices")
    callbacks = [EpochEnd(), bar.callback]
    if placement.kind == "multi-worker":  # a worker that restarts resumes the epoch it was in
        callbacks.append(tf.keras.callbacks.BackupAndRestore(str(out / "backup")))
    last = tc.epochs * steps

    def fit(first: int, end: int, epoch: int, n_steps: int) -> None:
        ds = batches.dataset(tf, first, end, pipeline_workers)
        model.fit(ds, steps_per_epoch=n_steps, epochs=epoch + 1 if n_steps != steps else tc.epochs,
                  initial_epoch=epoch, callbacks=callbacks, verbose=0)

    step_now = first_step
    try:
        if first_step % steps:  # finish the interrupted epoch with the batches it had left
            epoch = first_step // steps
            fit(first_step, (epoch + 1) * steps, epoch, steps - first_step % steps)
            step_now = (epoch + 1) * steps
        if step_now < last:
            fit(step_now, last, step_now // steps, steps)
    except KeyboardInterrupt:
        bar.close()
        if placement.workers > 1:  # saving needs every worker, and the signal reached this one only
            raise TrainingInterrupted(f"interrupted; the last epoch's checkpoint in {out / LAST} and BackupAndRestore's "
                                f"backup resume the run: start the same command on every worker") from None
        at = int(model.optimizer.iterations.numpy())  # steps applied, counting those of a restored checkpoint
        run.save(at, epochs_done=at // steps, val_score=state["best"], best_epoch=state["best_epoch"],
                 interrupted=True)
        raise TrainingInterrupted(f"interrupted at step {at} of {last}; saved to {out / LAST}: continue with --resume") \
            from None
    bar.close()
    if not placement.chief:
        shutil.rmtree(run.folder, ignore_errors=True)
    train_seconds = time.monotonic() - t0
    if not placement.chief:  # the chief keeps the checkpoint and writes the report
        barrier(tf, placement)
        shutil.rmtree(out / "backup", ignore_errors=True)
        return TrainResult(out, train_seconds, len(history.get("loss", [])), state["best_epoch"], float("nan"),
                           float("nan"), chief=False)
    try:
        if not (out / CHECKPOINT).exists():
            raise TrainingError(f"{out}: no checkpoint was saved (validation score never improved)")
        return _report(tf, out, data, fmt, cfg, spec, splits, history, state["best_epoch"],
                       train_seconds, placement, prepared, usable, folds, fold)
    finally:
        barrier(tf, placement)


def _report(tf, out, data, fmt, cfg, spec, splits, history, best_epoch, train_seconds, placement,
            prepared, usable, folds, fold) -> TrainResult:
    train_s, val_s, test_s = splits["train"], splits["validation"], splits["test"]
    best_model = load_model(out / CHECKPOINT)
    # The train row is computed on a seeded sample of its slices: predicting every training slice again would
    # cost as much as several epochs on a CPU, for a figure that only shows over- or under-fitting.
    tc = cfg.train
    scores = {"train": score_sample(best_model, tc, train_s, REPORT_TRAIN_SLICES, cfg.split.seed),
              "validation": score_split(best_model, tc, val_s),
              "test": score_split(best_model, tc, test_s)}
    rows = [r for name, s in scores.items() for r in s.rows(name)]
    with replacing(out / "metrics.csv") as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=REPORT_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plots.metrics_table(rows, REPORT_COLUMNS, out / "metrics.png", "Pixel-wise metrics of the best checkpoint")
    plots.learning_curves(history, out / "learning_curves.png")
    _overlays(best_model, test_s if test_s.n else val_s, out / "overlay.png")

    test = scores["test"].logs() if test_s.n else {"dice_liver": float("nan"), "dice_tumour": float("nan")}
    everything = (train_s, val_s, test_s)
    summary = {
        "data": {"path": str(data), "format": fmt,
                 "cases": {s.name: list(s.case_ids) for s in everything},
                 "slices": {s.name: s.n for s in everything},
                 "skipped": prepared.skipped,
                 "tumour_labelled": bool(train_s.known.any()),
                 "synthetic_cases": sum(sum(s.synthetic) for s in everything),
                 "real_cases": sum(len(s.synthetic) - sum(s.synthetic) for s in everything)},
        "folds": {"folds": folds, "fold": fold, "patients": fold_members(usable, cfg.split, folds)} if folds else None,
        "config": cfg.model_dump(),
        "preprocess": asdict(spec),
        "arch": cfg.model.arch,
        "dims": cfg.dims,
        "context": cfg.model.context,
        "input_channels": cfg.input_channels,
        "volume": cfg.volume.model_dump() if cfg.dims == 3 else None,
        "parameters": int(best_model.count_params()),
        "architecture": describe(cfg.model.arch, cfg.model.backbone)[0],
        "backbone": describe(cfg.model.arch, cfg.model.backbone)[1],
        "placement": {"strategy": placement.kind, "replicas": placement.replicas, "workers": placement.workers,
                      "gpus": placement.gpus, "precision": placement.precision},
        "best_epoch": best_epoch,
        "epochs_run": len(history.get("loss", [])),
        "train_seconds": round(train_seconds, 1),
        "test_metrics": {"dice_liver": test["dice_liver"], "dice_tumour": test["dice_tumour"],
                         "rows": [r for r in rows if r["split"] == "test"]},
    }
    write_json(out / "run.json", summary, indent=2, default=float)
    return TrainResult(out, train_seconds, len(history.get("loss", [])), best_epoch, test["dice_liver"],
                       test["dice_tumour"])


def _save_parity_sample(split: CaseSplit, out: Path, cfg: TrainingConfig, n: int = 64) -> None:
    """Keep real validation slices (V-Net: patches) in the run folder so `export` can check ONNX against Keras on
    them."""
    if isinstance(split, VolumeSplit):
        x = PatchBatches(split, cfg.train, seed=cfg.split.seed, volume=cfg.volume).sample(2)
    else:
        x = split.take(np.linspace(0, split.n - 1, min(n, split.n)).round().astype(int))[0]
    with replacing(out / PARITY_SAMPLE) as tmp:
        np.savez_compressed(tmp, x=x)


def _overlays(model, split: CaseSplit, out: Path, n: int = 4) -> None:
    """The n slices with the most tumour (then liver), found from the labels case by case, predicted alone."""
    if split.n == 0:
        return
    score = np.concatenate([(lab == 2).reshape(c.n, -1).sum(1) * 10 + (lab > 0).reshape(c.n, -1).sum(1)
                            for c in split.cases for lab in (c.labels(),)])
    picks = np.sort(np.argsort(-score, kind="stable")[:n])
    if isinstance(split, VolumeSplit):  # a V-Net sees whole cases: predict the cases the picks are in
        x, y, _ = split.take(picks)
        located = [split.locate(int(i)) for i in picks]
        pred = np.zeros(y.shape, np.uint8)
        for k in sorted({k for k, _ in located}):
            for start, prob in case_probabilities(model, split, k):
                for row, (kk, j) in enumerate(located):
                    if kk == k and start <= j < start + len(prob):
                        pred[row] = prob[j - start].argmax(-1)
    else:
        x, y, _ = split.take(picks)
        pred = predict(model, x).argmax(-1)
    titles = []
    for i in picks:
        k, j = split.locate(int(i))
        titles.append(f"{split.name} case {split.case_ids[k]}, slice {j}")
    plots.overlay_figure(x, y, pred, titles, out)
