"""Axial slices the right way up: the orientation every model is trained and run in, and the way back.

A model is not orientation-invariant (a mirrored abdomen puts the liver on the wrong side), so every slice goes to
one convention before preprocessing, in training and in the node alike: columns run to the patient's left and
rows to the patient's posterior (DICOM LPS +x and +y; ImageOrientationPatient 1,0,0,0,1,0), as in an axial image
of a patient lying head first and supine. Feet-first, prone or transposed storage is brought there with flips and
a transpose, which are exact, and the labels go back the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from livernode.errors import SeriesRejected

CONVENTION = ("axial slices with columns running to patient left and rows to patient posterior (LPS +x, +y; "
              "ImageOrientationPatient 1\\0\\0\\0\\1\\0), as a head-first supine image is shown")
# An in-plane direction more than this far from a patient axis is not snapped to it.
SNAP_TOLERANCE_DEG = 10.0


def _axis(cosines: np.ndarray, what: str) -> tuple[int, int, float]:
    """(axis 0 x / 1 y / 2 z, sign, degrees off that axis) of a direction."""
    v = cosines / max(float(np.linalg.norm(cosines)), 1e-9)
    axis = int(np.argmax(np.abs(v)))
    off = float(np.degrees(np.arccos(min(1.0, abs(v[axis])))))
    if off > SNAP_TOLERANCE_DEG:
        raise SeriesRejected(f"{what} direction {np.round(v, 3).tolist()} is {off:.1f} deg from the nearest patient "
                             f"axis (at most {SNAP_TOLERANCE_DEG:g})")
    return axis, (1 if v[axis] > 0 else -1), off


@dataclass(frozen=True)
class Orientation:
    """How stored slices (..., rows, cols) map to the convention: transpose first, then flips."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    # Slices are stored along the slice normal (row direction x column direction). The convention runs them foot
    # to head (+z); where the normal points to the feet this is True. Only models that see several slices at once
    # (2.5-D context, 3-D) need it: they read the slice axis the other way (see preprocess.context_index).
    reverse_slices: bool = False

    @classmethod
    def from_iop(cls, iop: Sequence[float]) -> "Orientation":
        """From ImageOrientationPatient; an oblique direction within SNAP_TOLERANCE_DEG snaps to the nearest axis.
        SeriesRejected when the slices are not axial."""
        row, col = np.asarray(iop[:3], float), np.asarray(iop[3:6], float)
        r_axis, r_sign, _ = _axis(row, "row")  # the direction of increasing column index
        c_axis, c_sign, _ = _axis(col, "column")  # the direction of increasing row index
        if {r_axis, c_axis} != {0, 1}:
            raise SeriesRejected(f"image orientation {list(np.round(iop, 3))} is not axial")
        reverse = float(np.cross(row, col)[2]) < 0
        if r_axis == 0:  # columns already run along x: no transpose
            return cls(False, flip_rows=c_sign < 0, flip_cols=r_sign < 0, reverse_slices=reverse)
        # columns run along y: after swapping the axes, rows follow the row direction (y) and columns x
        return cls(True, flip_rows=r_sign < 0, flip_cols=c_sign < 0, reverse_slices=reverse)

    @property
    def identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def forward(self, a: np.ndarray) -> np.ndarray:
        """Stored slices (..., rows, cols) -> the convention (a view)."""
        if self.transpose:
            a = np.swapaxes(a, -1, -2)
        if self.flip_rows:
            a = a[..., ::-1, :]
        if self.flip_cols:
            a = a[..., ::-1]
        return a

    def inverse(self, a: np.ndarray) -> np.ndarray:
        """The convention -> stored slices (a view); `inverse(forward(a))` is `a`."""
        if self.flip_cols:
            a = a[..., ::-1]
        if self.flip_rows:
            a = a[..., ::-1, :]
        if self.transpose:
            a = np.swapaxes(a, -1, -2)
        return a

    def shape(self, stored: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of a slice in the convention."""
        return (stored[1], stored[0]) if self.transpose else (stored[0], stored[1])

    def spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """(slice, row, column) spacing in the convention."""
        return (spacing[0], spacing[2], spacing[1]) if self.transpose else spacing

    def describe(self) -> str:
        steps = [s for s, on in (("transposed", self.transpose), ("rows flipped", self.flip_rows),
                                 ("columns flipped", self.flip_cols)) if on]
        return ", ".join(steps) or "as stored"
