"""The result SEG: built with highdicom, then read back and checked frame by frame before anyone receives it."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage

from livernode.errors import LivernodeError
from livernode.fsutil import replacing
from livernode.imaging.dicomio import LONG_VRS_ENCODED
from livernode.imaging.labels import LABELS
from livernode.imaging.segwrite import PER_FRAME, PIXEL_DATA, Algorithm, write_seg


class SegCheckFailed(LivernodeError):
    """The written SEG does not line up with its source slices; it must not be sent."""


def write_result_seg(source: Sequence[Dataset], labels: np.ndarray, path: Path, *, algorithm: Algorithm,
                     series_uid: str, sop_uid: str, series_number: int = 9001, note: str = "",
                     description: str = "", on_model: Callable[[Dataset], None] | None = None) -> Dataset:
    """Build, write and check the SEG; returns it without its frames (see `segwrite.write_seg`, also for
    `on_model`). Its series description is `description` (the model's research-use statement, when it has one) or
    the algorithm's name, ended by `note` (e.g. that the liver is cut off)."""
    name = description or f"{algorithm.name} liver segmentation"
    with replacing(path) as tmp:  # checked before it takes the final name; durable once it has
        # what build_seg(...).save_as(tmp, enforce_file_format=True) writes, the frames straight from the labels
        seg = write_seg(source, labels, tmp, series_uid=series_uid, sop_uid=sop_uid, series_number=series_number,
                        algorithm=algorithm, series_description=name[:64 - len(note)] + note,  # LO: 64
                        on_model=on_model)
        verify_seg(tmp, source, labels)
    return seg


def verify_seg(path: Path, source: Sequence[Dataset], labels: np.ndarray, chunk: int = 32) -> None:
    """Read the SEG back: every frame's position must equal its source slice's, and the masks must round-trip
    (each frame equals its slice's voxels of its segment; a slice's segment without a frame has no voxels), and
    every segment is declared. Compares `chunk` frames at a time (rounded to a multiple of 8).

    Not read with highdicom's segread, whose frame look-up tables and decoded frames cost more than building the
    SEG did, nor by converting the per-frame groups into pydicom elements (0.4 s for 400 frames): the few top-level
    attributes are read by pydicom, the per-frame references, positions and segment numbers straight from the
    bytes of the per-frame groups (`_frames`), and the packed bits are compared as they lie in the file.
    """
    ds = pydicom.dcmread(path, specific_tags=_TOP_LEVEL)
    n_src, rows, cols = labels.shape
    if ds.SOPClassUID != SegmentationStorage or ds.get("SegmentationType") != "BINARY":
        raise SegCheckFailed(f"{path}: not a BINARY SEG ({ds.SOPClassUID}, {ds.get('SegmentationType')})")
    if (ds.Rows, ds.Columns, ds.BitsAllocated) != (rows, cols, 1):
        raise SegCheckFailed(f"{path}: frames are {ds.Rows}x{ds.Columns} at {ds.BitsAllocated} bit, "
                             f"not {rows}x{cols} at 1 bit")
    index = {str(s.SOPInstanceUID): j for j, s in enumerate(source)}
    positions = np.array([[float(v) for v in s.ImagePositionPatient] for s in source])
    names = {li.value: li.name for li in LABELS}
    declared = sorted(int(item.SegmentNumber) for item in ds.get("SegmentSequence", []))
    if declared != sorted(names):
        raise SegCheckFailed(f"{path}: segments {declared} declared, not {sorted(names)}")
    refs, pos, numbers, pixel_data = _frames(path)
    if len(refs) != int(ds.NumberOfFrames):
        raise SegCheckFailed(f"{path}: {len(refs)} per-frame groups for {ds.NumberOfFrames} frames")
    for i, ref_uid in enumerate(refs):
        if ref_uid not in index:
            raise SegCheckFailed(f"{path}: frame {i + 1} references {ref_uid}, which is not a source slice")
    slice_of = np.array([index[r] for r in refs], np.intp)  # frame -> source slice
    segment_of = np.array(numbers, np.intp)  # frame -> segment number
    off = ~np.isclose(np.array(pos, float).reshape(-1, 3), positions[slice_of], atol=1e-3).all(axis=1)
    if off.any():
        i = int(np.argmax(off))
        raise SegCheckFailed(f"{path}: frame {i + 1} at {pos[i]} but its source slice {refs[i]} is at "
                             f"{positions[slice_of[i]].tolist()}: misregistered")
    seen = set(zip(slice_of.tolist(), numbers))
    for i, number in enumerate(numbers):
        if number not in names:
            raise SegCheckFailed(f"{path}: frame {i + 1} is of segment {number}, which is not declared")
    if len(seen) != len(refs):
        raise SegCheckFailed(f"{path}: {len(refs) - len(seen)} frames repeat a slice's segment")
    # The frames' bits lie one after the other, LSB first (PS3.5 8.1.1): the prediction packed the same way must
    # give the same bytes. Whole multiples of 8 frames start on a byte boundary, whatever the frame size.
    data = memoryview(pixel_data)
    step = max(8, chunk // 8 * 8)
    frame_bits = rows * cols
    want = np.empty((step, rows, cols), bool)
    for start in range(0, len(refs), step):
        m = min(step, len(refs) - start)
        for k in range(m):
            np.equal(labels[slice_of[start + k]], segment_of[start + k], out=want[k])
        packed = np.packbits(want[:m], bitorder="little")
        lo = start * frame_bits // 8
        got = np.frombuffer(data[lo:lo + len(packed)], np.uint8)
        if len(got) != len(packed) or not np.array_equal(got, packed):
            bad = start
            if len(got) == len(packed):
                back = np.unpackbits(got, bitorder="little", count=m * frame_bits).reshape(m, rows, cols)
                bad += int(np.argmax([not np.array_equal(back[k], want[k]) for k in range(m)]))
            raise SegCheckFailed(f"{path}: segment {names[int(segment_of[bad])]} read back differs from the "
                                 f"prediction (slice {slice_of[bad]}, frame {bad + 1})")
    for j in range(n_src):  # frames left out must have been empty
        missing = [v for v in names if (j, v) not in seen]
        if len(missing) == len(names) and not labels[j].any():
            continue  # a slice without any frame: one pass over it, not one per segment
        for v in missing:
            if (labels[j] == v).any():
                raise SegCheckFailed(f"{path}: segment {names[v]} read back differs from the prediction "
                                     f"(slice {j} has it but no frame)")


_TOP_LEVEL = ["SOPClassUID", "SegmentationType", "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
              "SegmentSequence"]
_UNDEFINED = 0xFFFFFFFF


def _frames(path: Path) -> tuple[list[str], list[list[float]], list[int], bytes]:
    """(referenced source SOP Instance UID, ImagePositionPatient and segment number of every frame; the pixel
    data) of a SEG file, its per-frame groups read from their bytes when they are explicit VR little endian with
    defined lengths (as `save_seg` writes them), else by pydicom."""
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        explicit_le = meta.get("TransferSyntaxUID") == ExplicitVRLittleEndian
        raw = {e.tag: e for e in data_element_generator(fp, False, True, defer_size=None)
               if e.tag in (PER_FRAME, PIXEL_DATA)} if explicit_le else {}
    try:
        if PER_FRAME not in raw or PIXEL_DATA not in raw:
            raise ValueError("not read here")
        refs, pos, numbers = [], [], []
        for frame in _items(raw[PER_FRAME].value):
            derivation = frame[0x00089124][0][0x00082112][0]
            refs.append(derivation[0x00081155].rstrip(b"\0 ").decode("ascii"))
            pos.append([float(v) for v in frame[0x00209113][0][0x00200032].decode("ascii").split("\\")])
            numbers.append(struct.unpack("<H", frame[0x0062000A][0][0x0062000B])[0])
        return refs, pos, numbers, raw[PIXEL_DATA].value
    except (ValueError, KeyError, IndexError, TypeError, struct.error, UnicodeDecodeError):
        ds = pydicom.dcmread(path)
        frames = ds.get("PerFrameFunctionalGroupsSequence", [])
        return ([str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID) for f in frames],
                [[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in frames],
                [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in frames], ds.PixelData)


def _items(value: bytes) -> list[dict[int, object]]:
    """The items of a sequence's value (explicit VR little endian, defined lengths): each a dict of tag to the
    element's value bytes, or to its items for a nested sequence. ValueError for anything else."""
    items, at = [], 0
    while at < len(value):
        group, element, length = struct.unpack_from("<HHL", value, at)
        if (group, element) != (0xFFFE, 0xE000) or length == _UNDEFINED:
            raise ValueError("an item of undefined length")
        items.append(_elements(value, at + 8, at + 8 + length))
        at += 8 + length
    return items


def _elements(buf: bytes, at: int, end: int) -> dict[int, object]:
    found: dict[int, object] = {}
    while at < end:
        group, element, vr = struct.unpack_from("<HH2s", buf, at)
        if vr in LONG_VRS_ENCODED:
            (length,), at = struct.unpack_from("<L", buf, at + 8), at + 12
        else:
            (length,), at = struct.unpack_from("<H", buf, at + 6), at + 8
        if length == _UNDEFINED:
            raise ValueError("an element of undefined length")
        value = buf[at:at + length]
        found[(group << 16) | element] = _items(value) if vr == b"SQ" else value
        at += length
    return found
