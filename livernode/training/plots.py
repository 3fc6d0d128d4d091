"""Figures for a training run: learning curves, the metrics table, and CT/ground-truth/prediction overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from livernode.errors import MissingExtra
from livernode.fsutil import replacing

LIVER_RGB = (0.1, 0.8, 0.2)
TUMOUR_RGB = (0.95, 0.15, 0.1)


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("plots need matplotlib: install the 'train' extra (pip install 'livernode[train]')") from None
    return plt


def learning_curves(history: dict[str, list[float]], out: Path) -> Path:
    """Loss, IoU and F1 per epoch, train against validation, one panel each."""
    plt = _plt()
    keys = [("loss", "Loss"), ("iou_score", "IoU"), ("f1_score", "F1 (Dice)")]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(16, 3.8))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, (k, title) in zip(axes, keys):
        if k in history:
            ax.plot(epochs, history[k], "o-", label="train")
        if f"val_{k}" in history:
            ax.plot(epochs, history[f"val_{k}"], "s-", label="validation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[-1]
    for k, label in (("val_dice_liver", "liver"), ("val_dice_tumour", "tumour")):
        if k in history:
            ax.plot(epochs, history[k], "o-", label=label)
    ax.set_title("Validation Dice (volumes)")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with replacing(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out


def metrics_table(rows: list[dict], columns: list[str], out: Path, title: str) -> Path:
    """Render a list of dict rows as a table figure."""
    plt = _plt()
    cells = []
    for r in rows:
        line = []
        for c in columns:
            v = r.get(c, "")
            if isinstance(v, float):
                v = "n/a" if np.isnan(v) else (f"{v:.4f}" if abs(v) < 1000 else f"{v:.3g}")
            line.append(str(v))
        cells.append(line)
    fig, ax = plt.subplots(figsize=(max(8, 1.15 * len(columns)), 0.45 * len(rows) + 1.2))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    ax.set_title(title)
    fig.tight_layout()
    with replacing(out) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return out


def _overlay(img: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rgb = np.repeat(img[..., None], 3, -1).astype(np.float32)
    for value, colour in ((1, LIVER_RGB), (2, TUMOUR_RGB)):
        m = labels == value
        rgb[m] = 0.55 * rgb[m] + 0.45 * np.array(colour)
    return np.clip(rgb, 0, 1)


def lesion_boxes(tumour: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(row0, col0, row1, col1) of each 2-D connected tumour component."""
    lab, _ = ndimage.label(tumour)
    return [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(lab) if s is not None]


def overlay_figure(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, titles: list[str], out: Path) -> Path:
    """Rows of (CT, ground truth, prediction with boxes around predicted lesions)."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for i in range(n):
        img = images[i][..., 0]
        axes[i, 0].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(titles[i], fontsize=8)
        axes[i, 1].imshow(_overlay(img, truth[i]))
        axes[i, 1].set_title("ground truth", fontsize=8)
        axes[i, 2].imshow(_overlay(img, pred[i]))
        boxes = lesion_boxes(pred[i] == 2)
        for r0, c0, r1, c1 in boxes:
            axes[i, 2].add_patch(Rectangle((c0 - 1.5, r0 - 1.5), c1 - c0 + 2, r1 - r0 + 2, fill=False,
                                           edgecolor="yellow", linewidth=1.2))
        axes[i, 2].set_title(f"prediction ({len(boxes)} lesion box{'es' if len(boxes) != 1 else ''})", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    with replacing(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
