"""Write a HU volume as a CT Image Storage series that passes dciodvfy (used by synth and by tests)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from livernode import __version__
from livernode.fsutil import write_dataset
from livernode.imaging.dicomio import CT_IMAGE_STORAGE
from livernode.imaging.volume import CtVolume

RESCALE_INTERCEPT = -1024.0
# What marks a synthetic case in every layout (DICOM Manufacturer, NIfTI descrip): the training loaders read it, so
# a model knows, and says, that it was trained on phantoms.
PHANTOM_MARK = "livernode phantom"


@dataclass(frozen=True)
class StudyInfo:
    """Identifiers for a synthetic patient/study; UIDs derive deterministically from `seed_key`."""

    seed_key: str
    patient_name: str = "PHANTOM^LIVER"
    patient_id: str = "PHANTOM"
    accession: str = ""
    study_date: str = "20260101"

    def uid(self, what: str) -> str:
        return generate_uid(entropy_srcs=[self.seed_key, what])


def ct_datasets(volume: CtVolume, study: StudyInfo, *, series_number: int = 1,
                descending_files: bool = False) -> list[Dataset]:
    """One dataset per slice (ascending z). Pixel data stored as unsigned 16 bit with intercept -1024."""
    n = volume.hu.shape[0]
    stored = np.clip(np.rint(volume.hu - RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)
    series_uid = volume.series_instance_uid or study.uid("ct-series")
    frame_uid = study.uid("frame-of-reference")
    out = []
    now = dt.datetime(2026, 1, 1, 12, 0, 0)
    for k in range(n):
        ds = Dataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        sop_uid = volume.sop_instance_uids[k] if volume.sop_instance_uids else study.uid(f"ct-{k}")
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"LIVERNODE_{__version__}"[:16]
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = study.accession
        ds.Modality = "CT"
        ds.Manufacturer = PHANTOM_MARK
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT ABDOMEN (synthetic phantom)"
        ds.SeriesDescription = "Abdomen soft tissue"
        ds.PatientName = study.patient_name
        ds.PatientID = study.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = f"{volume.spacing[0]:.6g}"
        ds.KVP = "120"
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = study.uid("study")
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = (n - k) if descending_files else (k + 1)
        ds.ImagePositionPatient = [f"{v:.6g}" for v in np.asarray(volume.origin) + np.array([0, 0, k * volume.spacing[0]])]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in volume.orientation]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{volume.origin[2] + k * volume.spacing[0]:.6g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.hu.shape[1:]
        ds.PixelSpacing = [f"{volume.spacing[1]:.6g}", f"{volume.spacing[2]:.6g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = stored[k].tobytes()
        out.append(ds)
    return out


def write_series(datasets: list[Dataset], folder: Path, names: list[str]) -> list[Path]:
    """Write datasets as DICOM Part 10 files under `folder` with the given file names."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds, name in zip(datasets, names, strict=True):
        p = folder / name
        write_dataset(p, ds)
        paths.append(p)
    return paths
