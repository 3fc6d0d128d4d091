"""`livernode synth`: write phantoms in the dicom (CT + SEG), chaos (DICOM + PNG) or lits (NIfTI) layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from livernode.fsutil import replacing, write_dataset, write_png
from livernode.imaging.ctwrite import PHANTOM_MARK, StudyInfo, ct_datasets, write_series
from livernode.imaging.phantom import Phantom, make_phantom
from livernode.imaging.volume import LIVER, TUMOUR, CtVolume

log = logging.getLogger(__name__)
Layout = Literal["dicom", "chaos", "lits", "study"]


def phantom_volume(ph: Phantom) -> CtVolume:
    return CtVolume(hu=ph.hu.astype(np.float32), spacing=ph.spacing, origin=ph.origin, source="phantom")


def case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def write_seg(datasets, labels: np.ndarray, path: Path, study: StudyInfo) -> None:
    """Ground truth as a BINARY DICOM SEG (highdicom) with segments Liver (1) and Liver tumour (2)."""
    from livernode.imaging.segwrite import build_seg

    seg = build_seg(datasets, labels, series_uid=study.uid("seg-series"), sop_uid=study.uid("seg"),
                    series_number=100, algorithm=None, series_description="Ground truth (synthetic)")
    write_dataset(path, seg)


def write_lits(ph: Phantom, out: Path, index: int) -> None:
    """`volume-N.nii.gz` + `segmentation-N.nii.gz` with an affine mapping voxel (i, j, k) to RAS millimetres."""
    try:
        import nibabel as nib
    except ImportError:
        from livernode.errors import MissingExtra

        raise MissingExtra("the lits layout needs nibabel: install the 'train' extra (pip install 'livernode[train]')") from None
    # Array axes (col, row, slice) = LPS (x, y, z); RAS flips the sign of x and y.
    dz, dr, dc = ph.spacing
    affine = np.diag([-dc, -dr, dz, 1.0])
    affine[:3, 3] = [-ph.origin[0], -ph.origin[1], ph.origin[2]]
    vol = np.ascontiguousarray(ph.hu.transpose(2, 1, 0))
    seg = np.ascontiguousarray(ph.labels.transpose(2, 1, 0))
    for name, data in ((f"volume-{index}.nii.gz", vol), (f"segmentation-{index}.nii.gz", seg)):
        img = nib.Nifti1Image(data, affine)
        img.header["descrip"] = PHANTOM_MARK.encode()  # read back by the loader: this case is synthetic
        with replacing(out / name) as tmp:
            nib.save(img, str(tmp))


def synthesize(out: Path, *, cases: int, slices: int, size: int, seed: int, layout: Layout) -> list[Path]:
    """Write `cases` phantoms under `out`; returns the per-case paths. Deterministic for a given seed. The study
    layout writes a whole study per case (`synth_study.abdomen_study`; `slices` of 1 mm, at least 240)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in tqdm(range(cases), desc=f"synth {layout}", unit="case"):
        if layout == "study":
            from livernode.imaging.synth_study import abdomen_study

            abdomen_study(out / f"study_{i:03d}", seed=seed * 1000 + i, size=size, slices=slices)
            written.append(out / f"study_{i:03d}")
            continue
        ph = make_phantom(case_rng(seed, i), size=size, slices=slices)
        study = StudyInfo(seed_key=f"livernode-synth-{seed}-{i}", patient_id=f"PHANTOM{seed:04d}{i:04d}",
                          patient_name=f"PHANTOM^{seed}^{i}")
        vol = phantom_volume(ph)
        if layout == "lits":
            write_lits(ph, out, i)
            written.append(out / f"volume-{i}.nii.gz")
        elif layout == "dicom":
            case_dir = out / f"case_{i:03d}"
            dsets = ct_datasets(vol, study)
            write_series(dsets, case_dir / "ct", [f"CT{k + 1:04d}.dcm" for k in range(len(dsets))])
            write_seg(dsets, ph.labels, case_dir / "seg.dcm", study)
            written.append(case_dir)
        elif layout == "chaos":
            # CHAOS names files so that name order is descending z, and PNG masks follow name order.
            case_dir = out / f"{i + 1}"
            dsets = ct_datasets(vol, study, descending_files=True)[::-1]
            write_series(dsets, case_dir / "DICOM_anon", [f"i{k:04d},0000b.dcm" for k in range(len(dsets))])
            ground = case_dir / "Ground"
            ground.mkdir(parents=True, exist_ok=True)
            for k, lab in enumerate(ph.labels[::-1]):
                mask = np.where(np.isin(lab, (LIVER, TUMOUR)), 255, 0).astype(np.uint8)
                write_png(ground / f"liver_GT_{k:03d}.png", mask)
            written.append(case_dir)
        else:
            raise ValueError(f"unknown layout {layout!r}")
    return written
