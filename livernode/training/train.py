"""`livernode train`: fit the U-Net, keep the best checkpoint by validation Dice, write plots and metric tables."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from livernode.config import PreprocessConfig, TrainingConfig
from livernode.errors import TrainingError
from livernode.fsutil import replacing, write_json
from livernode.imaging import metrics as M
from livernode.imaging.preprocess import PreprocessSpec
from livernode.training import plots
from livernode.training.data import BatchStream, SplitArrays, load_splits, targets
from livernode.training.model import (build_model, import_tf, load_model, make_loss, make_metrics,
                                      recalibrate_batchnorm)

log = logging.getLogger(__name__)
CHECKPOINT = "best.h5"
STATE = "state.json"
PARITY_SAMPLE = "validation_sample.npz"  # real validation slices for the export parity check
PRED_BATCH = 32
REPORT_TRAIN_SLICES = 128
CALIBRATION_BATCHES = 2  # batch-norm statistics are re-estimated on this many training batches per epoch


def spec_from_config(cfg: PreprocessConfig) -> PreprocessSpec:
    return PreprocessSpec(window_low=cfg.window.low, window_high=cfg.window.high, channels=cfg.channels,
                          size=cfg.size, bilateral=cfg.bilateral)


def predict(model, x: np.ndarray) -> np.ndarray:
    """Softmax probabilities (n, s, s, 3) for network inputs x."""
    if len(x) == 0:
        return np.zeros(x.shape[:3] + (3,), np.float32)
    return np.concatenate([model.predict_on_batch(x[i : i + PRED_BATCH]) for i in range(0, len(x), PRED_BATCH)])


def split_dice(split: SplitArrays, prob: np.ndarray) -> tuple[float, float]:
    """Global Dice over a split: liver region (label > 0) on all slices, tumour on tumour-labelled slices only."""
    pred = prob.argmax(-1)
    liver = M.overlap(pred > 0, split.y > 0).dice
    k = split.known
    tumour = M.overlap(pred[k] == 2, split.y[k] == 2).dice if k.any() else float("nan")
    return liver, tumour


class _Progress:
    """A tqdm bar per epoch and a Keras callback that feeds it."""

    def __init__(self, tf, steps: int, epochs: int):
        outer = self

        class Callback(tf.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=True)

            def on_train_batch_end(self, batch, logs=None):
                outer.bar.update(1)
                if logs and "loss" in logs:
                    outer.bar.set_postfix(loss=f"{logs['loss']:.4f}")

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                shown = {k: f"{v:.3f}" for k, v in logs.items() if k.startswith("val_")}
                outer.bar.set_postfix(shown)
                outer.bar.close()

        self.callback = Callback()


def _validation_callback(tf, val: SplitArrays, out: Path, start_best: float, loss_fn, metric_fns, calibration):
    t_val = tf.constant(targets(val.y, val.known))

    class ValidationDice(tf.keras.callbacks.Callback):
        """One prediction pass over the validation patients per epoch gives the validation loss, IoU, F1 and
        volume Dice; the checkpoint is saved when the Dice score improves."""

        best = start_best

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            recalibrate_batchnorm(self.model, calibration())
            prob = predict(self.model, val.x)
            p = tf.constant(prob)
            logs["val_loss"] = float(loss_fn(t_val, p))
            for fn in metric_fns:
                logs[f"val_{fn.__name__}"] = float(fn(t_val, p))
            liver, tumour = split_dice(val, prob)
            logs["val_dice_liver"], logs["val_dice_tumour"] = liver, tumour
            score = liver if math.isnan(tumour) else (liver + tumour) / 2
            logs["val_score"] = score
            if score > self.best:
                self.best = score
                with replacing(out / CHECKPOINT) as tmp:
                    self.model.save(str(tmp), include_optimizer=False)
                write_json(out / STATE, {"epoch": epoch + 1, "val_score": score})
                log.info("epoch %d: validation score %.4f (liver %.4f, tumour %.4f), checkpoint saved",
                         epoch + 1, score, liver, tumour)

    return ValidationDice()


@dataclass(frozen=True)
class TrainResult:
    run: Path
    seconds: float
    epochs_run: int
    best_epoch: int
    test_dice_liver: float
    test_dice_tumour: float


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
            w.writerow([i + 1, *[history[k][i] for k in keys]])


REPORT_COLUMNS = ["split", "class", "loss", "accuracy", "precision", "sensitivity", "specificity", "auc",
                  "tp", "fp", "tn", "fn", "dice", "iou"]


def split_report(model, loss_fn, split: SplitArrays) -> tuple[list[dict], np.ndarray]:
    """Rows of pixel-wise figures for liver (label > 0) and tumour, plus the probabilities."""
    _, tf = import_tf()
    prob = predict(model, split.x)
    if split.n == 0:
        return [], prob
    t = targets(split.y, split.known)
    losses = [float(loss_fn(tf.constant(t[i : i + PRED_BATCH]), tf.constant(prob[i : i + PRED_BATCH])))
              * len(t[i : i + PRED_BATCH]) for i in range(0, split.n, PRED_BATCH)]
    loss = sum(losses) / split.n
    pred = prob.argmax(-1)
    rows = []
    liver = M.confusion(pred > 0, prob[..., 1] + prob[..., 2], split.y > 0)
    rows.append({"split": split.name, "class": "liver", "loss": loss, **liver.as_dict()})
    k = split.known
    if k.any():
        tum = M.confusion(pred[k] == 2, prob[k][..., 2], split.y[k] == 2)
        rows.append({"split": split.name, "class": "tumour", "loss": loss, **tum.as_dict()})
    return rows, prob


def train(data: Path, fmt: str, out: Path, cfg: TrainingConfig, *, resume: bool = False) -> TrainResult:
    """Train on the cases under `data` and write the run folder `out` (see README: Training)."""
    t0 = time.monotonic()
    _, tf = import_tf()
    tf.keras.utils.set_random_seed(cfg.split.seed)
    out.mkdir(parents=True, exist_ok=True)
    spec = spec_from_config(cfg.preprocess)
    splits = load_splits(data, fmt, spec, cfg.split)
    train_s, val_s, test_s = splits["train"], splits["validation"], splits["test"]
    log.info("split by patient: %d train, %d validation, %d test cases (%d/%d/%d slices)",
             len(train_s.case_ids), len(val_s.case_ids), len(test_s.case_ids), train_s.n, val_s.n, test_s.n)

    _save_parity_sample(val_s if val_s.n else train_s, out)
    history_path = out / "history.csv"
    history = _read_history(history_path) if resume else {}
    initial_epoch, best = 0, -1.0
    if resume and (out / CHECKPOINT).exists():
        model = load_model(out / CHECKPOINT)
        state = json.loads((out / STATE).read_text()) if (out / STATE).exists() else {}
        initial_epoch, best = len(history.get("loss", [])), float(state.get("val_score", -1.0))
        log.info("resuming from %s after epoch %d (validation score %.4f)", out / CHECKPOINT, initial_epoch, best)
    else:
        model = build_model(cfg.model.backbone, spec.channels, cfg.model.encoder_weights)
    tc = cfg.train
    loss_fn = make_loss(tc.class_weights, tc.focal_weight)
    steps = tc.steps_per_epoch or max(1, math.ceil(train_s.n / tc.batch_size))
    stream = BatchStream(train_s, tc, seed=cfg.split.seed + initial_epoch)
    progress = _Progress(tf, steps, tc.epochs)
    metric_fns = make_metrics()
    lr = tc.learning_rate
    if tc.lr_schedule == "cosine":
        lr = tf.keras.optimizers.schedules.CosineDecay(tc.learning_rate, steps * max(1, tc.epochs - initial_epoch),
                                                       alpha=0.05)
    model.compile(optimizer=tf.keras.optimizers.Adam(lr), loss=loss_fn, metrics=metric_fns)
    calib_stream = BatchStream(train_s, tc, seed=cfg.split.seed + 7919)

    def calibration() -> np.ndarray:
        return np.concatenate([calib_stream.batch()[0] for _ in range(CALIBRATION_BATCHES)])

    cbs = [_validation_callback(tf, val_s, out, best, loss_fn, metric_fns, calibration), progress.callback]
    fit = model.fit(iter(stream), steps_per_epoch=steps, epochs=tc.epochs, initial_epoch=initial_epoch,
                    callbacks=cbs, verbose=0)
    for k, v in fit.history.items():
        history.setdefault(k, []).extend(float(x) for x in v)
    _write_history(history_path, history)
    if not (out / CHECKPOINT).exists():
        raise TrainingError(f"{out}: no checkpoint was saved (validation score never improved)")
    train_seconds = time.monotonic() - t0

    best_model = load_model(out / CHECKPOINT)
    rows, probs = [], {}
    # The train row is computed on a seeded sample of its slices: predicting every training slice again would
    # cost as much as several epochs on a CPU, for a figure that only shows over- or under-fitting.
    for s in (_sample(train_s, REPORT_TRAIN_SLICES, cfg.split.seed), val_s, test_s):
        r, probs[s.name] = split_report(best_model, loss_fn, s)
        rows += r
    with replacing(out / "metrics.csv") as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=REPORT_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plots.metrics_table(rows, REPORT_COLUMNS, out / "metrics.png", "Pixel-wise metrics of the best checkpoint")
    plots.learning_curves(history, out / "learning_curves.png")
    _overlays(test_s if test_s.n else val_s, probs["test"] if test_s.n else probs["validation"], out / "overlay.png")

    test_liver, test_tumour = split_dice(test_s, probs["test"]) if test_s.n else (float("nan"),) * 2
    state = json.loads((out / STATE).read_text())
    summary = {
        "data": {"path": str(data), "format": fmt,
                 "cases": {s.name: list(s.case_ids) for s in (train_s, val_s, test_s)},
                 "slices": {s.name: s.n for s in (train_s, val_s, test_s)},
                 "tumour_labelled": bool(train_s.known.any()),
                 "synthetic_cases": sum(sum(s.synthetic) for s in (train_s, val_s, test_s)),
                 "real_cases": sum(len(s.synthetic) - sum(s.synthetic) for s in (train_s, val_s, test_s))},
        "config": cfg.model_dump(),
        "preprocess": asdict(spec),
        "architecture": "Unet",
        "backbone": cfg.model.backbone,
        "best_epoch": state["epoch"],
        "epochs_run": len(history.get("loss", [])),
        "train_seconds": round(train_seconds, 1),
        "test_metrics": {"dice_liver": test_liver, "dice_tumour": test_tumour,
                         "rows": [r for r in rows if r["split"] == "test"]},
    }
    write_json(out / "run.json", summary, indent=2, default=float)
    return TrainResult(out, train_seconds, len(history.get("loss", [])), state["epoch"], test_liver, test_tumour)


def _sample(split: SplitArrays, n: int, seed: int) -> SplitArrays:
    if split.n <= n:
        return split
    pick = np.sort(np.random.default_rng(seed).choice(split.n, n, replace=False))
    return SplitArrays(split.name, split.case_ids, split.x[pick], split.y[pick], split.known[pick],
                       split.case_index[pick], split.spacings, split.synthetic)


def _save_parity_sample(split: SplitArrays, out: Path, n: int = 64) -> None:
    """Keep real validation slices in the run folder so `export` can check ONNX against Keras on them."""
    pick = np.linspace(0, split.n - 1, min(n, split.n)).round().astype(int)
    with replacing(out / PARITY_SAMPLE) as tmp:
        np.savez_compressed(tmp, x=split.x[pick])


def _overlays(split: SplitArrays, prob: np.ndarray, out: Path, n: int = 4) -> None:
    if split.n == 0:
        return
    pred = prob.argmax(-1)
    score = (split.y == 2).reshape(split.n, -1).sum(1) * 10 + (split.y > 0).reshape(split.n, -1).sum(1)
    picks = np.sort(np.argsort(-score)[:n])
    titles = [f"{split.name} case {split.case_ids[split.case_index[i]]}, slice {i}" for i in picks]
    plots.overlay_figure(split.x[picks], split.y[picks], pred[picks], titles, out)
