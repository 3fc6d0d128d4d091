"""Per-study summary: summary.json (numbers, decisions, model, timings) and preview.png (axial montage)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from livernode import fsutil
from livernode.imaging.labels import LABEL_BY_VALUE
from livernode.imaging.orient import Orientation
from livernode.imaging.postprocess import Findings
from livernode.imaging.preprocess import window
from livernode.imaging.volume import LIVER, TUMOUR

# The segments' colours, as viewers draw them from the SEG (`imaging/labels.py`), in OpenCV's BGR order.
LIVER_BGR, TUMOUR_BGR = (tuple(LABEL_BY_VALUE[v].rgb[::-1]) for v in (LIVER, TUMOUR))
BOX_BGR = (0, 230, 255)


def _blend_table() -> tuple[np.ndarray, np.ndarray]:
    """(label -> row, row x grey level -> BGR): 60 % grey and 40 % of the segment's colour in float32, truncated
    to uint8, for every grey level at once; row 0 (any other label) is the grey level itself."""
    grey = np.arange(256, dtype=np.float32)[:, None]
    table = np.stack([np.repeat(grey, 3, axis=1)] + [0.6 * grey + 0.4 * np.array(c, np.float32)
                                                      for c in (LIVER_BGR, TUMOUR_BGR)]).astype(np.uint8)
    row = np.zeros(256, np.intp)
    row[LIVER], row[TUMOUR] = 1, 2
    return row, table


_BLEND_ROW, _BLEND = _blend_table()
# The table one colour channel at a time, flat (row * 256 + grey level): a 1-D take per channel is some five times
# faster than indexing the 3-D table with two index arrays, and gives the same bytes.
_BLEND_FLAT = tuple(np.ascontiguousarray(_BLEND[:, :, c]).ravel() for c in range(3))


def _blend(labels: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """(rows, cols) labels and uint8 grey levels -> (rows, cols, 3) BGR: `_BLEND[_BLEND_ROW[labels], grey]`."""
    at = _BLEND_ROW[labels] * 256 + grey
    return np.dstack([np.take(channel, at) for channel in _BLEND_FLAT])


def summary_dict(findings: Findings, **extra) -> dict:
    return {
        "liver_volume_ml": round(findings.liver_volume_ml, 2),
        "tumour_volume_ml": round(findings.tumour_volume_ml, 2),
        "tumour_burden_percent": round(findings.tumour_burden_percent, 3),
        "lesion_count": len(findings.lesions),
        "liver_complete": not findings.liver_touches_scan_edge,
        "lesions": [{k: v for k, v in asdict(lesion).items()} for lesion in findings.lesions],
        **extra,
    }


def write_json(path: Path, data: dict) -> None:
    fsutil.write_json(path, data, indent=1, default=str)


def preview(hu: np.ndarray, findings: Findings, path: Path, turn: Orientation = Orientation(), *, tiles: int = 12,
            tile_px: int = 256) -> Path:
    """Axial montage of `tiles` slices spread evenly over those with any label, liver and tumour tinted, lesion
    boxes in yellow; each slice turned by `turn` the way a head-first supine axial image is shown, whatever its
    storage."""
    labels = findings.labels
    labelled = labels.any(axis=(1, 2))
    idx = np.flatnonzero(labelled) if labelled.any() else np.arange(len(labels))
    picks = idx[np.linspace(0, len(idx) - 1, min(tiles, len(idx))).round().astype(int)]
    cols = min(4, len(picks))
    rows = math.ceil(len(picks) / cols)
    canvas = np.zeros((rows * tile_px, cols * tile_px, 3), np.uint8)
    for n, k in enumerate(picks):
        img = np.ascontiguousarray((window(turn.forward(hu[k]), -160, 240) * 255).astype(np.uint8))
        lab = turn.forward(labels[k])
        rgb = _blend(lab, img)  # the grey level, 40 % of the segment's colour over it
        comp, _ = ndimage.label(lab == TUMOUR)  # boxes around each lesion's footprint on this slice
        for sl in ndimage.find_objects(comp):
            if sl is not None:
                cv2.rectangle(rgb, (sl[1].start - 1, sl[0].start - 1), (sl[1].stop, sl[0].stop), BOX_BGR, 1)
        tile = cv2.resize(rgb, (tile_px, tile_px), interpolation=cv2.INTER_AREA)
        cv2.putText(tile, f"slice {k + 1}/{len(labels)}", (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        r, c = divmod(n, cols)
        canvas[r * tile_px : (r + 1) * tile_px, c * tile_px : (c + 1) * tile_px] = tile
    fsutil.write_png(path, canvas)
    return path
