"""The result SEG: built with highdicom, then read back and checked frame by frame before anyone receives it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from livernode.errors import LivernodeError
from livernode.fsutil import replacing
from livernode.imaging.labels import LABELS
from livernode.imaging.segwrite import Algorithm, build_seg


class SegCheckFailed(LivernodeError):
    """The written SEG does not line up with its source slices; it must not be sent."""


def write_result_seg(source: Sequence[Dataset], labels: np.ndarray, path: Path, *, algorithm: Algorithm,
                     series_uid: str, sop_uid: str, series_number: int = 9001, note: str = "",
                     description: str = "") -> hd.seg.Segmentation:
    """Build, write and check the SEG. Its series description is `description` (the model's research-use
    statement, when it has one) or the algorithm's name, ended by `note` (e.g. that the liver is cut off)."""
    name = description or f"{algorithm.name} liver segmentation"
    seg = build_seg(source, labels, series_uid=series_uid, sop_uid=sop_uid, series_number=series_number,
                    algorithm=algorithm, series_description=name[:64 - len(note)] + note)  # LO: 64; the note stays
    with replacing(path) as tmp:  # checked before it takes the final name; durable once it has
        seg.save_as(tmp, enforce_file_format=True)
        verify_seg(tmp, source, labels)
    return seg


def verify_seg(path: Path, source: Sequence[Dataset], labels: np.ndarray, chunk: int = 32) -> None:
    """Read the SEG back: every frame's position must equal its source slice's, and the masks must round-trip."""
    seg = hd.seg.segread(str(path))
    positions = {str(ds.SOPInstanceUID): [float(v) for v in ds.ImagePositionPatient] for ds in source}
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        ref_uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        if ref_uid not in positions:
            raise SegCheckFailed(f"{path}: frame {i} references {ref_uid}, which is not a source slice")
        if not np.allclose(pos, positions[ref_uid], atol=1e-3):
            raise SegCheckFailed(f"{path}: frame {i} at {pos} but its source slice {ref_uid} is at "
                                 f"{positions[ref_uid]}: misregistered")
    uids = [str(ds.SOPInstanceUID) for ds in source]
    for start in range(0, len(uids), chunk):  # a few slices at a time: a 600-slice study read back whole is 300 MB
        back = seg.get_pixels_by_source_instance(uids[start:start + chunk],
                                                 segment_numbers=[li.value for li in LABELS],
                                                 assert_missing_frames_are_empty=True)
        for k, li in enumerate(LABELS):
            if not np.array_equal(back[..., k] > 0, labels[start:start + chunk] == li.value):
                raise SegCheckFailed(f"{path}: segment {li.name} read back differs from the prediction "
                                     f"(slices {start}-{start + len(back) - 1})")
