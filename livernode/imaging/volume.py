"""Typed records passed between stages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Label values used everywhere (training targets, model outputs, NIfTI files).
BACKGROUND, LIVER, TUMOUR = 0, 1, 2


@dataclass(frozen=True)
class CtVolume:
    """A CT volume in Hounsfield units.

    `hu` is (slices, rows, columns), slices ordered by position along the slice normal (ascending), rows and columns
    as stored in the DICOM pixel data. `spacing` is (slice step, row spacing, column spacing) in mm.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    sop_instance_uids: tuple[str, ...] = ()
    series_instance_uid: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"{self.source}: volume must be 3-D, got shape {self.hu.shape}")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"{self.source}: spacing must be positive, got {self.spacing}")
        if self.sop_instance_uids and len(self.sop_instance_uids) != self.hu.shape[0]:
            raise ValueError(f"{self.source}: {len(self.sop_instance_uids)} UIDs for {self.hu.shape[0]} slices")


@dataclass(frozen=True)
class Case:
    """One patient: a CT volume and its label volume (0 background, 1 liver, 2 tumour).

    `tumour_labelled` is False for data sets without tumour annotations (CHAOS): there, label 1 means
    "liver, tumour or not", and tumour absence must not be learned or scored.
    """

    case_id: str
    volume: CtVolume
    labels: np.ndarray
    tumour_labelled: bool = True
    synthetic: bool = False  # a livernode phantom (its files carry the phantom mark), not a patient

    def __post_init__(self) -> None:
        if self.labels.shape != self.volume.hu.shape:
            raise ValueError(
                f"case {self.case_id}: labels {self.labels.shape} do not match images {self.volume.hu.shape}"
            )
