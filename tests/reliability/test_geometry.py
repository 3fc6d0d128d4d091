"""Geometry: whatever order, numbering, duplication or mixture a study arrives in, the SEG is registered to its
source slices, or the study is rejected with a reason. Never a misregistered SEG.

Each accepted variant is checked frame by frame (the frame's position equals its referenced source slice's) and
against the untouched study: the masks per source SOP Instance UID must be identical."""

from __future__ import annotations

import copy
import random

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from livernode.daemon.pipeline import process_files
from livernode.errors import LivernodeError
from livernode.inference.runner import Segmenter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def segmenter(exported):
    return Segmenter(exported, providers="cpu")


@pytest.fixture(scope="module")
def source(trained_run):
    root, _ = trained_run
    return [pydicom.dcmread(f) for f in sorted((root / "data" / "case_003" / "ct").glob("*.dcm"))]


def _write(datasets, folder):
    folder.mkdir(parents=True)
    names = [f"{random.Random(7).getrandbits(40):x}-{i}.dcm" for i in range(len(datasets))]
    random.Random(3).shuffle(names)  # file names say nothing about order
    paths = []
    for name, ds in zip(names, datasets):
        ds.save_as(folder / name, enforce_file_format=True)
        paths.append(folder / name)
    return paths


def _copy(source):
    return [copy.deepcopy(ds) for ds in source]


def _new_series(datasets, **changes):
    uid = generate_uid()
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for k, v in changes.items():
            setattr(ds, k, v)
        out.append(ds)
    return out


def _enhanced_ct(datasets):
    """The same slices as one multi-frame Enhanced CT instance."""
    first = datasets[0]
    e = copy.deepcopy(first)
    e.SOPClassUID = e.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    e.SOPInstanceUID = e.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    e.SeriesInstanceUID = generate_uid()
    e.NumberOfFrames = len(datasets)
    e.PixelData = b"".join(ds.PixelData for ds in datasets)
    shared, per_frame = pydicom.Dataset(), []
    shared.PixelMeasuresSequence = Sequence([pydicom.Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = first.PixelSpacing
    shared.PlaneOrientationSequence = Sequence([pydicom.Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = first.ImageOrientationPatient
    for ds in datasets:
        item = pydicom.Dataset()
        item.PlanePositionSequence = Sequence([pydicom.Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = ds.ImagePositionPatient
        per_frame.append(item)
    e.SharedFunctionalGroupsSequence = Sequence([shared])
    e.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber"):
        delattr(e, k)
    return [e]


def _reversed_numbers(src):
    out = _copy(src)
    for i, ds in enumerate(out):
        ds.InstanceNumber = len(out) - i
    return out


def _shuffled_numbers(src):
    out = _copy(src)
    numbers = list(range(1, len(out) + 1))
    random.Random(11).shuffle(numbers)
    for ds, n in zip(out, numbers):
        ds.InstanceNumber = n
    return out


def _reversed_positions(src):
    """Slices stored head-first: instance 1 is the highest z (as in the CHAOS data)."""
    out = _copy(src)
    for i, ds in enumerate(out):
        ds.InstanceNumber = len(out) - i
    return list(reversed(out))


def _duplicate(src):
    out = _copy(src)
    dup = copy.deepcopy(out[5])
    dup.SOPInstanceUID = dup.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return out + [dup]


def _several_series(src):
    sharp = _new_series(src, ConvolutionKernel="B70f", SeriesDescription="Lung 1 mm")
    scout = _new_series(src[:3], SeriesDescription="Topogram")
    return _copy(src) + sharp + scout


def _with_mr(src):
    mr = _new_series(src, Modality="MR")
    for ds in mr:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    return _copy(src) + mr


def _gap(src):
    out = _copy(src)
    del out[len(out) // 2]
    return out


def _tilt(src):
    out = _copy(src)
    for ds in out:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + np.tan(np.radians(15)) * z, z]
        ds.GantryDetectorTilt = 15
    return out


def _sagittal(src):
    out = _copy(src)
    for i, ds in enumerate(out):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [float(i) * 2.5, 0, 0]
    return out


def _mr_only(src):
    return _with_mr(src)[len(src):]


ACCEPTED = {"reversed instance numbers": _reversed_numbers, "shuffled instance numbers": _shuffled_numbers,
            "reversed slice order": _reversed_positions, "duplicate position": _duplicate,
            "several series": _several_series, "CT with an MR series": _with_mr}
REJECTED = {"gap": (_gap, "slice gap"), "gantry tilt": (_tilt, "gantry tilt 15.0 deg"),
            "non-axial": (_sagittal, "not axial"), "non-CT modality": (_mr_only, "modality MR, not CT"),
            "Enhanced CT multi-frame": (_enhanced_ct, "multi-frame Enhanced CT is not supported")}


@pytest.fixture(scope="module")
def reference(source, segmenter, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = process_files(_write(_copy(source), out / "in"), segmenter, out / "result")
    seg = hd.seg.segread(result.seg_path)
    uids = [str(ds.SOPInstanceUID) for ds in source]
    masks = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    assert masks.any(), "the reference SEG is empty: the check below would prove nothing"
    return uids, masks


def _frames_match_sources(seg_path, datasets) -> int:
    seg = pydicom.dcmread(seg_path)
    positions = {str(ds.SOPInstanceUID): [float(v) for v in ds.ImagePositionPatient] for ds in datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, positions[uid], atol=1e-3), (uid, position, positions[uid])
    return len(seg.PerFrameFunctionalGroupsSequence)


@pytest.mark.parametrize("variant", sorted(ACCEPTED))
def test_accepted_variants_are_registered_to_their_source(variant, source, segmenter, reference, tmp_path, figure):
    uids, expected = reference
    datasets = ACCEPTED[variant](source)
    result = process_files(_write(datasets, tmp_path / "in"), segmenter, tmp_path / "result")
    frames = _frames_match_sources(result.seg_path, datasets)
    seg = hd.seg.segread(result.seg_path)
    referenced = {str(u[2]) for u in seg.get_source_image_uids()}
    assert referenced <= set(uids) | {str(ds.SOPInstanceUID) for ds in datasets[len(source):]}
    assert {str(ds.SeriesInstanceUID) for ds in datasets if str(ds.SOPInstanceUID) in referenced} == \
        {str(source[0].SeriesInstanceUID)}  # the soft-tissue CT series was the one segmented
    got = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    assert expected.any() and np.array_equal(got, expected)
    figure("frames_checked", frames)


@pytest.mark.parametrize("variant", sorted(REJECTED))
def test_rejected_variants_name_the_reason(variant, source, segmenter, tmp_path, figure):
    make, reason = REJECTED[variant]
    with pytest.raises(LivernodeError, match=reason) as info:
        process_files(_write(make(source), tmp_path / "in"), segmenter, tmp_path / "result")
    assert not (tmp_path / "result" / "seg.dcm").exists()
    figure("reason", str(info.value)[-160:])
