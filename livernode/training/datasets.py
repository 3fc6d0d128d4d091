"""Loaders for CHAOS, LiTS and DICOM CT + DICOM SEG pairs (the synth layouts are read by the same code).

Each loader lists cases cheaply (`list_cases`) and loads one case at a time (`load_case`), so large data sets are
preprocessed case by case instead of being held in memory at full resolution.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from livernode.errors import DatasetError, InputError, MissingExtra
from livernode.imaging.dicomio import SEGMENTATION_STORAGE as SEG_STORAGE, dicom_files, read_dataset, volume_from_datasets
from livernode.imaging.ctwrite import PHANTOM_MARK
from livernode.imaging.labels import LABELS
from livernode.imaging.volume import LIVER, Case, CtVolume

log = logging.getLogger(__name__)
Format = Literal["chaos", "lits", "dicom"]


@dataclass(frozen=True)
class CaseRef:
    """Where one case lives on disk; `files` holds what its loader needs."""

    case_id: str
    fmt: str
    files: tuple[Path, ...]


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


# ---------------------------------------------------------------- CHAOS: <case>/DICOM_anon/*.dcm + <case>/Ground/*.png
def _is_mr(case_dir: Path, root: Path) -> bool:
    """CHAOS as distributed keeps CT under .../CT/N and MR under .../MR/N/T1DUAL|T2SPIR: a folder named MR on
    the way from the root marks an MR case."""
    parts = case_dir.relative_to(root).parts if case_dir != root else ()
    return any(p.upper() == "MR" or p.upper() in ("T1DUAL", "T2SPIR") for p in parts)


def _list_chaos(root: Path) -> list[CaseRef]:
    """Every case folder with DICOM_anon + Ground under `root`: one case folder, a folder of cases, or the
    download (CHAOS_Train_Sets/Train_Sets/CT/N); MR cases and folders without masks are skipped with a line."""
    if (root / "DICOM_anon").is_dir():
        dirs = [root]
    else:
        dirs = sorted({p.parent for p in root.rglob("DICOM_anon") if p.is_dir()}, key=lambda d: d.parts)
    refs = []
    for d in dirs:
        if _is_mr(d, root):
            log.info("skipping %s: an MR case (CHAOS CT cases only)", d)
            continue
        if not (d / "Ground").is_dir():
            log.info("skipping %s: no Ground folder with liver masks beside DICOM_anon", d)
            continue
        rel = d.relative_to(root).parts if d != root else (root.name,)
        case_id = d.name if len([x for x in dirs if x.name == d.name]) == 1 else "-".join(rel)
        refs.append(CaseRef(case_id, "chaos", (d,)))
    return sorted(refs, key=lambda r: _natural_key(Path(r.case_id)))


def _load_chaos(ref: CaseRef) -> Case:
    case_dir = ref.files[0]
    dcm = sorted((p for p in (case_dir / "DICOM_anon").iterdir() if p.is_file()), key=lambda p: p.name)
    ground_dir = case_dir / "Ground"
    if not ground_dir.is_dir():
        raise DatasetError(f"{case_dir}: no Ground folder with liver masks")
    pngs = sorted((p for p in ground_dir.iterdir() if p.suffix.lower() == ".png"), key=lambda p: p.name)
    if len(pngs) != len(dcm):
        raise DatasetError(f"{ground_dir}: {len(pngs)} masks for {len(dcm)} DICOM slices in {case_dir / 'DICOM_anon'}")
    datasets = [(str(p), read_dataset(p)) for p in dcm]
    masks = {}
    for (src, ds), png in zip(datasets, pngs, strict=True):
        m = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        if m is None:
            raise InputError(f"{png}: not a readable PNG image")
        if m.ndim == 3:
            m = m[..., 0]
        if m.shape != (ds.Rows, ds.Columns):
            raise DatasetError(f"{png}: mask is {m.shape[0]}x{m.shape[1]}, slice {src} is {ds.Rows}x{ds.Columns}")
        masks[str(ds.SOPInstanceUID)] = np.where(m > 0, LIVER, 0).astype(np.uint8)
    vol = volume_from_datasets(datasets, series_label=str(case_dir))
    labels = np.stack([masks[uid] for uid in vol.sop_instance_uids])
    return Case(ref.case_id, vol, labels, tumour_labelled=False, synthetic=_phantom(datasets[0][1]))


# ---------------------------------------------------------------- LiTS: volume-N.nii.gz + segmentation-N.nii.gz
_LITS_NAME = re.compile(r"(volume|segmentation)-(\d+)\.nii(\.gz)?$")


def _list_lits(root: Path) -> list[CaseRef]:
    """Pair volume-N with segmentation-N by number anywhere under `root`: the download's two "Training Batch"
    folders, or volumes and segmentations re-packed into separate folders. A volume without its segmentation
    (the test set) is skipped with a line; a number found twice is an error naming both files."""
    found: dict[str, dict[str, Path]] = {"volume": {}, "segmentation": {}}
    for p in sorted(root.rglob("*.nii*"), key=lambda q: q.parts):
        m = _LITS_NAME.match(p.name)
        if not m or not p.is_file():
            continue
        kind, n = m.group(1), m.group(2)
        if n in found[kind]:
            raise DatasetError(f"{p}: {kind}-{n} is also at {found[kind][n]}; keep one of them")
        found[kind][n] = p
    refs = []
    for n, vol in found["volume"].items():
        seg = found["segmentation"].get(n)
        if seg is None:
            log.info("skipping %s: no segmentation-%s.nii(.gz) anywhere under %s", vol, n, root)
            continue
        refs.append(CaseRef(f"lits-{n}", "lits", (vol, seg)))
    for n, seg in found["segmentation"].items():
        if n not in found["volume"]:
            log.info("skipping %s: no volume-%s.nii(.gz) anywhere under %s", seg, n, root)
    return sorted(refs, key=lambda r: int(r.case_id.split("-")[1]))


def nifti_to_lps_slices(img) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """A NIfTI image -> (array (slices, rows, cols) in DICOM display order, spacing, LPS origin of voxel 0)."""
    import nibabel as nib

    can = nib.as_closest_canonical(img)  # axes now point R, A, S
    data = np.asanyarray(can.dataobj)
    # rows run anterior->posterior and columns right->left in DICOM display: flip A and R.
    arr = data.transpose(2, 1, 0)[:, ::-1, ::-1]
    zx, zy, zz = (float(v) for v in can.header.get_zooms()[:3])
    nx, ny, _ = data.shape
    ras0 = can.affine @ np.array([nx - 1, ny - 1, 0, 1.0])
    origin = (-float(ras0[0]), -float(ras0[1]), float(ras0[2]))
    return np.ascontiguousarray(arr), (zz, zy, zx), origin


def _load_lits(ref: CaseRef) -> Case:
    try:
        import nibabel as nib
    except ImportError:
        raise MissingExtra("reading LiTS needs nibabel: install the 'train' extra (pip install 'livernode[train]')") from None
    vol_path, seg_path = ref.files
    try:
        vimg, simg = nib.load(str(vol_path)), nib.load(str(seg_path))
    except Exception as exc:
        raise InputError(f"{vol_path} / {seg_path}: not readable NIfTI ({exc})") from None
    if len(vimg.shape) != 3:
        raise DatasetError(f"{vol_path}: expected a 3-D volume, got shape {vimg.shape}")
    if vimg.shape != simg.shape:
        raise DatasetError(f"{seg_path}: shape {simg.shape} does not match {vol_path.name} {vimg.shape}")
    if not np.allclose(vimg.affine, simg.affine, atol=1e-3):
        raise DatasetError(f"{seg_path}: affine differs from {vol_path.name} (misaligned geometry)")
    hu, spacing, origin = nifti_to_lps_slices(vimg)
    lab, _, _ = nifti_to_lps_slices(simg)
    lab = np.rint(lab).astype(np.int16)
    bad = np.setdiff1d(np.unique(lab), [0, 1, 2])
    if bad.size:
        raise DatasetError(f"{seg_path}: unexpected label values {bad.tolist()} (LiTS uses 0, 1, 2)")
    volume = CtVolume(hu=hu.astype(np.float32), spacing=spacing, origin=origin, source=str(vol_path))
    descrip = bytes(np.asarray(vimg.header["descrip"])).rstrip(b"\0").decode("latin-1")
    return Case(ref.case_id, volume, lab.astype(np.uint8), tumour_labelled=True, synthetic=descrip == PHANTOM_MARK)


# ---------------------------------------------------------------- DICOM CT + DICOM SEG, grouped by study
def _list_dicom(root: Path) -> list[CaseRef]:
    by_study: dict[str, list[Path]] = defaultdict(list)
    for p in dicom_files(root):
        ds = read_dataset(p, pixels=False)
        by_study[str(getattr(ds, "StudyInstanceUID", p.parent))].append(p)
    refs = []
    for files in by_study.values():
        common = Path(*Path(files[0]).parts[: len(Path(files[0]).parts) - 1])
        for f in files[1:]:
            while common not in f.parents:
                common = common.parent
        refs.append(CaseRef(common.name or str(common), "dicom", tuple(sorted(files))))
    return sorted(refs, key=lambda r: _natural_key(Path(r.case_id)))


def _load_dicom(ref: CaseRef) -> Case:
    import highdicom as hd

    segs, cts = [], []
    for p in ref.files:  # full reads: a truncated slice is reported here, by name, not later as a "gap"
        ds = read_dataset(p)
        (segs if ds.get("SOPClassUID") == SEG_STORAGE else cts).append((p, ds))
    if len(segs) != 1:
        raise DatasetError(f"case {ref.case_id}: expected one DICOM SEG, found {len(segs)}")
    seg_path = segs[0][0]
    try:
        seg = hd.seg.segread(str(seg_path))
    except Exception as exc:
        raise InputError(f"{seg_path}: not a readable DICOM SEG ({exc})") from None
    ref_series = {str(s.SeriesInstanceUID) for s in getattr(seg, "ReferencedSeriesSequence", [])}
    series = [(str(p), ds) for p, ds in cts if str(ds.get("SeriesInstanceUID", "")) in ref_series]
    if not series:
        raise DatasetError(f"{seg_path}: none of the CT files in case {ref.case_id} belong to the referenced series")
    vol = volume_from_datasets(series, series_label=str(seg_path.parent))
    numbers: dict[int, int] = {}
    for desc in seg.SegmentSequence:
        ptype = str(desc.SegmentedPropertyTypeCodeSequence[0].CodeValue)
        for li in LABELS:
            if ptype == li.property_type.value:
                numbers[li.value] = int(desc.SegmentNumber)
    if LIVER not in numbers:
        raise DatasetError(f"{seg_path}: no segment with property type SCT 10200004 (Liver)")
    labels = np.zeros(vol.hu.shape, np.uint8)
    for value, seg_no in numbers.items():
        try:
            m = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=list(vol.sop_instance_uids), segment_numbers=[seg_no],
                assert_missing_frames_are_empty=True,
            )[..., 0]
        except Exception as exc:
            raise DatasetError(f"{seg_path}: segment {seg_no} does not map onto the CT slices ({exc})") from None
        if m.shape != labels.shape:
            raise DatasetError(f"{seg_path}: segment {seg_no} has shape {m.shape}, CT has {labels.shape}")
        labels[(m > 0) & (labels == 0) | ((m > 0) & (value > LIVER))] = value
    return Case(ref.case_id, vol, labels, tumour_labelled=len(numbers) > 1, synthetic=_phantom(series[0][1]))


def _phantom(ds) -> bool:
    """A case written by `livernode synth` (its DICOM files carry the phantom mark as Manufacturer)."""
    return str(getattr(ds, "Manufacturer", "")) == PHANTOM_MARK


_LISTERS = {"chaos": _list_chaos, "lits": _list_lits, "dicom": _list_dicom}
_LOADERS = {"chaos": _load_chaos, "lits": _load_lits, "dicom": _load_dicom}


def list_cases(root: Path, fmt: Format) -> list[CaseRef]:
    """All cases of format `fmt` under `root`; DatasetError when there are none."""
    root = Path(root)
    if fmt not in _LISTERS:
        raise DatasetError(f"unknown data format {fmt!r} (chaos, lits or dicom)")
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    refs = _LISTERS[fmt](root)
    if not refs:
        raise DatasetError(f"{root}: no {fmt} cases found")
    return refs


def load_case(ref: CaseRef) -> Case:
    """Load one case; DatasetError/InputError name the file and reason when images and masks disagree."""
    return _LOADERS[ref.fmt](ref)
