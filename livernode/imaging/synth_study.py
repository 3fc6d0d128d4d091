"""`livernode synth --layout study`: whole abdominal CT studies built from one phantom, as PACS auto-routing sends
them: several reconstructions, phases and kernels, projections, a reformat, a localizer and a dose screen; and one
series stored in the other ways a scanner may store the same physical volume. Every series of a study shares its
Frame of Reference. The series selection, the rule tester (`livernode check --study`) and their tests read these."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from livernode.fsutil import write_dataset
from livernode.imaging.ctwrite import StudyInfo, ct_datasets, write_series
from livernode.imaging.phantom import Phantom, make_phantom
from livernode.imaging.synth import case_rng
from livernode.imaging.volume import CtVolume

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


MIN_SPAN_SLICES = 240  # 1 mm slices: enough to reach above and below any phantom liver


def phantom_1mm(seed: int, size: int = 128, slices: int = 300) -> Phantom:
    """A 1 mm phantom reaching well above and below the liver."""
    if slices < MIN_SPAN_SLICES:
        raise ValueError(f"a study needs at least {MIN_SPAN_SLICES} slices of 1 mm to reach above and below the "
                         f"liver, not {slices}")
    return make_phantom(case_rng(seed, 0), size=size, slices=slices, thickness=1.0)


def _slabs(hu: np.ndarray, width: int, step: int, how) -> tuple[np.ndarray, np.ndarray]:
    """(slab images, index of each slab's middle 1 mm slice): `how` (mean, max, min) over `width` slices."""
    starts = np.arange(0, len(hu) - width + 1, step)
    return np.stack([how(hu[s:s + width].astype(np.float32), axis=0) for s in starts]), starts + (width - 1) / 2


def _axial(ph: Phantom, study: StudyInfo, name: str, hu: np.ndarray, z_index: np.ndarray, step: float,
           number: int, description: str, kernel: str, image_type: list[str]) -> list[Dataset]:
    z0 = ph.origin[2] + float(z_index[0]) * ph.spacing[0]
    vol = CtVolume(hu=hu, spacing=(step, ph.spacing[1], ph.spacing[2]), origin=(ph.origin[0], ph.origin[1], z0),
                   series_instance_uid=study.uid(f"{name}-series"),
                   sop_instance_uids=tuple(study.uid(f"{name}-{k}") for k in range(len(hu))))
    out = ct_datasets(vol, study, series_number=number)
    for ds in out:
        ds.SeriesDescription, ds.ConvolutionKernel, ds.ImageType = description, kernel, image_type
    return out


def _coronal(ph: Phantom, study: StudyInfo, name: str, images: np.ndarray, ys: list[float], number: int,
             description: str, image_type: list[str]) -> list[Dataset]:
    """Coronal images (rows from head to feet, columns to patient left) at the given y positions."""
    rows = images.shape[1]
    vol = CtVolume(hu=images, spacing=(1.0, ph.spacing[0], ph.spacing[2]), series_instance_uid=study.uid(f"{name}-s"),
                   sop_instance_uids=tuple(study.uid(f"{name}-{k}") for k in range(len(images))))
    out = ct_datasets(vol, study, series_number=number)
    top = ph.origin[2] + (rows - 1) * ph.spacing[0]
    for ds, y in zip(out, ys):
        ds.SeriesDescription, ds.ImageType = description, image_type
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [f"{ph.origin[0]:.6g}", f"{y:.6g}", f"{top:.6g}"]
        ds.PixelSpacing = [f"{ph.spacing[0]:.6g}", f"{ph.spacing[2]:.6g}"]
        del ds.SliceLocation
    return out


def _dose_screen(study: StudyInfo, number: int) -> Dataset:
    """A dose report as most scanners send one: a secondary capture of a text screen, Modality CT."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = study.uid("dose-0")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid("study"), study.uid("dose-series")
    ds.Modality, ds.ConversionType, ds.SeriesNumber, ds.InstanceNumber = "CT", "WSD", number, 1
    ds.SeriesDescription, ds.ImageType = "Dose Report", ["DERIVED", "SECONDARY", "OTHER"]
    ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 64, 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.full((64, 64), 30, np.uint8).tobytes()
    return ds


def abdomen_study(root: Path, seed: int = 77, *, size: int = 128, slices: int = 300,
                  with_abdomen: bool = True) -> dict[str, list[Path]]:
    """The study, one folder per series under `root`; returns the files of each series by name:
    portal (3 mm, portal-venous), arterial (3 mm), thorax (1 mm from the upper liver up), pelvis (3 mm from the
    lower liver down), bone (3 mm, B70f), mip, minip (2 mm), coronal (3 mm MPR), localizer, dose. `with_abdomen=False` leaves out the whole-abdomen
    series (portal, arterial, bone)."""
    ph = phantom_1mm(seed, size, slices)
    study = StudyInfo(seed_key=f"study-{seed}", patient_id=f"STUDY{seed}", patient_name=f"STUDY^{seed}")
    hu, n = ph.hu, len(ph.hu)
    liver = np.flatnonzero(ph.labels.reshape(n, -1).any(axis=1))
    thick, mid = _slabs(hu, 3, 3, np.mean)
    series: dict[str, list[Dataset]] = {}
    if with_abdomen:
        series["portal"] = _axial(ph, study, "portal", thick, mid, 3.0, 2, "Abdomen PV 3.0 B30f", "B30f",
                                  ["ORIGINAL", "PRIMARY", "AXIAL"])
        series["arterial"] = _axial(ph, study, "arterial", thick, mid, 3.0, 3, "Abdomen arterial 3.0 B30f", "B30f",
                                    ["ORIGINAL", "PRIMARY", "AXIAL"])
        series["bone"] = _axial(ph, study, "bone", thick, mid, 3.0, 4, "Abdomen PV 3.0 B70f", "B70f",
                                ["ORIGINAL", "PRIMARY", "AXIAL"])
    first = int(liver[-1] - 50)  # 1 mm slices from 50 mm below the top of the liver upwards: it cuts the dome
    series["thorax"] = _axial(ph, study, "thorax", hu[first:], np.arange(first, n), 1.0, 5, "Thorax 1.0 B30f",
                              "B30f", ["ORIGINAL", "PRIMARY", "AXIAL"])
    last = (int(liver[0]) + 25) // 3  # 3 mm slabs from 25 mm above the bottom of the liver downwards
    series["pelvis"] = _axial(ph, study, "pelvis", thick[:last], mid[:last], 3.0, 9, "Pelvis 3.0 B30f", "B30f",
                              ["ORIGINAL", "PRIMARY", "AXIAL"])
    for name, how, number in (("mip", np.max, 6), ("minip", np.min, 7)):
        slabs, centres = _slabs(hu, 5, 2, how)
        series[name] = _axial(ph, study, name, slabs, centres, 2.0, number, f"Abdomen {name.upper()} 5/2",
                              "B30f", ["DERIVED", "SECONDARY", "AXIAL", name.upper()])
    ys = [ph.origin[1] + r * ph.spacing[1] for r in range(30, hu.shape[1] - 30, 6)]
    cor = np.stack([hu[::-1, int(round((y - ph.origin[1]) / ph.spacing[1])), :] for y in ys])
    series["coronal"] = _coronal(ph, study, "coronal", cor, ys, 8, "Abdomen coronal MPR 3.0",
                                 ["DERIVED", "SECONDARY", "REFORMATTED"])
    scout = hu[::-1].astype(np.float32).mean(axis=1)[None]
    series["localizer"] = _coronal(ph, study, "localizer", scout, [0.0], 1, "Topogram 0.6 T20f",
                                   ["ORIGINAL", "PRIMARY", "LOCALIZER"])
    series["dose"] = [_dose_screen(study, 99)]
    paths = {}
    for name, dsets in series.items():
        paths[name] = write_series(dsets, root / name, [f"{k:04d}.dcm" for k in range(len(dsets))])
    return paths


def stored_another_way(files: list[Path], out: Path, *, mirror_columns: bool = False, mirror_rows: bool = False,
                       transpose: bool = False) -> list[Path]:
    """The same physical slices stored another way: columns mirrored (as feet-first scans are stored), rows
    mirrored, both (a 180-degree rotation, as prone scans are), and/or transposed (rows and columns swapped).
    New UIDs; pixel data, ImageOrientationPatient, ImagePositionPatient and PixelSpacing changed together, so every
    voxel keeps its place in the patient."""
    out.mkdir(parents=True)
    tag = f"{int(mirror_columns)}{int(mirror_rows)}{int(transpose)}"
    study_series = pydicom.uid.generate_uid(entropy_srcs=[str(files[0]), tag])
    paths = []
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        px = ds.pixel_array
        row = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
        col = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        pos = np.array([float(v) for v in ds.ImagePositionPatient])
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        if mirror_columns:
            pos, row, px = pos + (ds.Columns - 1) * col_mm * row, -row, px[:, ::-1]
        if mirror_rows:
            pos, col, px = pos + (ds.Rows - 1) * row_mm * col, -col, px[::-1, :]
        if transpose:  # the first pixel stays where it is; rows become columns
            row, col, px = col, row, px.T
            ds.Rows, ds.Columns = px.shape
            ds.PixelSpacing = [f"{col_mm:.6g}", f"{row_mm:.6g}"]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.6g}" for v in pos]
        ds.PixelData = np.ascontiguousarray(px).tobytes()
        ds.SeriesInstanceUID = study_series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
            entropy_srcs=[str(f), tag])
        write_dataset(out / f.name, ds)
        paths.append(out / f.name)
    return paths
