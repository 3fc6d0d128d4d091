"""DICOM SEG (BINARY, highdicom) from a label volume, with the project's coded segment descriptions, and its writer."""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian

from livernode import __version__
from livernode.imaging.dicomio import LONG_VRS_ENCODED
from livernode.imaging.labels import LABELS, CodedConcept


def _remember_iod_answers() -> None:
    """highdicom asks once per source image whether the image's SOP class allows several frames
    (`is_multiframe_image`), each time by walking the standard's tables of every module of the IOD: about a
    millisecond a slice, a third of building a 200-slice SEG. The answer depends only on the attribute and the SOP
    class (the tables are fixed), so it is looked up once per pair."""
    from highdicom import _standard_utils

    lookup = _standard_utils.is_attribute_in_iod
    if hasattr(lookup, "__wrapped__"):
        return
    answers: dict = {}

    @functools.wraps(lookup)
    def remembered(attribute: str, sop_class_uid: str, exclude_path_elements=None) -> bool:
        key = (attribute, str(sop_class_uid), tuple(exclude_path_elements) if exclude_path_elements else None)
        if key not in answers:
            answers[key] = lookup(attribute, sop_class_uid, exclude_path_elements)
        return answers[key]

    _standard_utils.is_attribute_in_iod = remembered


_remember_iod_answers()


@dataclass(frozen=True)
class Algorithm:
    """What produced an automatic segmentation (from the model manifest)."""

    name: str
    version: str


def _code(c: CodedConcept) -> Code:
    return Code(c.value, c.scheme, c.meaning)


def segment_descriptions(algorithm: Algorithm | None) -> list[hd.seg.SegmentDescription]:
    algo_id = None
    if algorithm is not None:
        algo_id = hd.AlgorithmIdentificationSequence(
            name=algorithm.name, version=algorithm.version,
            family=Code("123109", "DCM", "Artificial Intelligence"),
        )
    return [
        hd.seg.SegmentDescription(
            segment_number=li.value,
            segment_label=li.name,
            segmented_property_category=_code(li.category),
            segmented_property_type=_code(li.property_type),
            algorithm_type="AUTOMATIC" if algorithm else "MANUAL",
            algorithm_identification=algo_id,
            anatomic_regions=[_code(li.anatomic_region)] if li.anatomic_region else None,
            # RecommendedDisplayCIELabValue: without it dcmqi and Slicer fall back to a default colour, and some
            # OHIF versions hang
            display_color=hd.color.CIELabColor.from_rgb(*li.rgb),
        )
        for li in LABELS
    ]


def build_seg(source: Sequence[Dataset], labels: np.ndarray, *, series_uid: str, sop_uid: str, series_number: int,
              algorithm: Algorithm | None, series_description: str) -> hd.seg.Segmentation:
    """A BINARY SEG over `source` (one dataset per slice, same order as `labels`, shape (n, rows, cols)).

    Every segment is declared even when empty, so a reader can tell "tumour absent" from "tumour not labelled".
    """
    if labels.shape[0] != len(source):
        raise ValueError(f"{labels.shape[0]} label slices for {len(source)} source images")
    # The label volume itself: its values are the segment numbers (1..n in LABELS' order), which highdicom takes
    # as segments that cannot overlap, without a stacked mask per segment or a check of each voxel for overlap.
    assert [li.value for li in LABELS] == list(range(1, len(LABELS) + 1))
    seg = hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=np.ascontiguousarray(labels, dtype=np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(algorithm),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="livernode",
        manufacturer_model_name="livernode",
        software_versions=__version__,
        device_serial_number="0",
        omit_empty_frames=True,
        content_label="LIVER",
        content_description=series_description[:64],
    )
    seg.SeriesDescription = series_description[:64]
    return seg


def write_seg(source: Sequence[Dataset], labels: np.ndarray, path, *, series_uid: str, sop_uid: str,
              series_number: int, algorithm: Algorithm | None, series_description: str,
              on_model: Callable[[Dataset], None] | None = None) -> Dataset:
    """Build the SEG of `build_seg` and write it to `path` (a path or a writable binary file): the elements
    `build_seg` and `save_seg` write, with frames straight from the label volume. highdicom builds the object model
    (every module but the frames) on a probe volume with one labelled voxel; the per-frame groups and the bit-packed
    pixel data are then encoded here in one pass over the labelled slices, as highdicom would make them: frames by
    segment, then by slice position, empty ones left out, dimension index values (segment, plane among the
    labelled planes). The one frame highdicom made is encoded both ways first; where they differ, or the input is
    not the plain case (no labels, a value that is no segment, multi-frame sources, frames under 8 pixels, a
    transfer syntax other than explicit VR little endian), highdicom builds it all.

    Returns the SEG's object model without its per-frame groups and pixel data (those are in the file), for the
    references an SR makes to it. `on_model`, where given, is called with the object model as soon as it is
    settled but for its frames, before they are encoded: the SR can be started from it."""
    kw = dict(series_uid=series_uid, sop_uid=sop_uid, series_number=series_number, algorithm=algorithm,
              series_description=series_description)
    seg = _direct(source, labels, path, kw, on_model or _ignore)
    if seg is None:
        seg = build_seg(source, labels, **kw)
        if on_model is not None:
            on_model(seg)
        save_seg(seg, path)
    return seg


def _ignore(seg: Dataset) -> None:
    pass


def _direct(source: Sequence[Dataset], labels: np.ndarray, path, kw: dict,
            on_model: Callable[[Dataset], None]) -> Dataset | None:
    """`write_seg`'s frames from the label volume; None (nothing written, `on_model` not called) where highdicom
    must build it all."""
    from highdicom.spatial import _get_slice_distances, get_normal_vector, get_volume_positions
    from highdicom.volume import VOLUME_INDEX_CONVENTION
    from pydicom.valuerep import DS

    segments = [li.value for li in LABELS]
    if labels.ndim != 3 or labels.shape[0] != len(source) or labels.dtype != np.uint8 or not len(source):
        return None
    n = len(labels)
    if labels.shape[1] * labels.shape[2] < 8:
        return None  # highdicom pads frames of under 8 pixels to a byte each; these are packed back to back
    labelled = np.flatnonzero(labels.reshape(n, -1).any(axis=1))
    if not len(labelled) or int(labels.max()) > max(segments) or any(
            int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in source):
        return None
    probe = np.zeros_like(labels)  # the object model: one labelled voxel, of the first segment
    probe[labelled[0], 0, 0] = segments[0]
    seg = build_seg(source, probe, **kw)
    del probe
    if PER_FRAME not in seg or [e.tag for e in seg if e.tag > PER_FRAME] != [PIXEL_DATA] or int(
            seg.BitsAllocated) != 1 or len(seg.PerFrameFunctionalGroupsSequence) != 1 or (
            seg.file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian):
        return None
    made = seg.PerFrameFunctionalGroupsSequence[0]
    try:
        src_item = made.DerivationImageSequence[0].SourceImageSequence[0]
        constant = (_encode(src_item.PurposeOfReferenceCodeSequence[0]),
                    _encode(made.DerivationImageSequence[0].DerivationCodeSequence[0]),
                    _text("CS", str(src_item.SpatialLocationsPreserved)))
        orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        # the plane positions as highdicom takes them from the source images, and its order of the planes
        positions = [[DS(v, auto_format=True) for v in ds.ImagePositionPatient] for ds in source]
        texts = [_text("DS", _ds_string(p)) for p in positions]
        refs = [(_text("UI", str(ds.SOPClassUID)), _text("UI", str(ds.SOPInstanceUID))) for ds in source]
        values = np.array(positions, float)
        normal = get_normal_vector(orientation, index_convention=VOLUME_INDEX_CONVENTION)
        _, order = np.unique(_get_slice_distances(values, normal), return_index=True)
        if len(order) != n:
            return None  # planes at the same position: highdicom says so
        first = int(labelled[0])
        if _frame(constant, refs[first], texts[first], 1, 1, segments[0]) != _items([made]):
            return None  # highdicom makes its frames otherwise than this encoder assumes
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, _Unhandled, UnicodeEncodeError):
        return None
    on_model(seg)  # from here on only its frames, their count and its dimension organisation change
    keep = set(labelled.tolist())
    planes = [int(p) for p in order if int(p) in keep]  # the labelled planes in highdicom's order
    if len(labelled) > 1 and len(segments) == 1:  # highdicom's test for a 3D dimension organisation: one channel
        # (segment) at most, and the labelled planes, as given, evenly spaced
        spacing, _ = get_volume_positions(image_positions=values[labelled], image_orientation=orientation,
                                          sort=False)
        if spacing is not None and spacing > 0.0:
            seg.DimensionOrganizationType = "3D"
    frames, pixels = [], []
    rows, cols = labels.shape[1:]
    step = 32  # frames packed at a time: a multiple of 8, so every chunk starts on a byte boundary
    chunk, filled = np.empty((step, rows, cols), bool), 0
    for index, number in enumerate(segments, 1):
        for dim, p in enumerate(planes, 1):
            np.equal(labels[p], number, out=chunk[filled])
            if not chunk[filled].any():
                continue
            frames.append(_frame(constant, refs[p], texts[p], index, dim, number))
            filled += 1
            if filled == step:
                pixels.append(np.packbits(chunk, bitorder="little").tobytes())
                filled = 0
    if filled:
        pixels.append(np.packbits(chunk[:filled], bitorder="little").tobytes())
    data = b"".join(pixels)
    if len(data) % 2:
        data += b"0"  # highdicom's padding byte
    seg.NumberOfFrames = len(frames)
    del seg.PerFrameFunctionalGroupsSequence, seg.PixelData
    rest = _element(PER_FRAME, "SQ", b"".join(frames)) + _element(PIXEL_DATA, "OB", data)
    write_parts(seg, path, PER_FRAME, rest)
    return seg


def _text(vr: str, text: str) -> bytes:
    """A text value as pydicom writes it: padded to even length (UI with a NUL, the others with a space)."""
    return (text + ("\0" if vr == "UI" else " ") * (len(text) % 2)).encode("ascii")


def _ds_string(vals) -> str:
    return "\\".join(x.original_string if hasattr(x, "original_string") else str(x) for x in vals)


def _frame(constant: tuple[bytes, bytes, bytes], ref: tuple[bytes, bytes], position: bytes, segment_index: int,
           plane: int, number: int) -> bytes:
    """One item of the per-frame functional groups, as highdicom builds it for a single-frame source image and
    pydicom writes it (elements in tag order, explicit VR little endian, defined lengths)."""
    purpose, derivation, preserved = constant
    source_item = (_raw(0x0008, 0x1150, b"UI", ref[0]) + _raw(0x0008, 0x1155, b"UI", ref[1])
                   + _raw(0x0028, 0x135A, b"CS", preserved) + _raw(0x0040, 0xA170, b"SQ", _item(purpose)))
    derivation_item = _raw(0x0008, 0x2112, b"SQ", _item(source_item)) + _raw(0x0008, 0x9215, b"SQ",
                                                                              _item(derivation))
    body = (_raw(0x0008, 0x9124, b"SQ", _item(derivation_item))
            + _raw(0x0020, 0x9111, b"SQ", _item(_raw(0x0020, 0x9157, b"UL",
                                                     struct.pack("<2L", segment_index, plane))))
            + _raw(0x0020, 0x9113, b"SQ", _item(_raw(0x0020, 0x0032, b"DS", position)))
            + _raw(0x0062, 0x000A, b"SQ", _item(_raw(0x0062, 0x000B, b"US", struct.pack("<H", number)))))
    return _item(body)


# Writing: pydicom spends tens of microseconds per element on a path made for every case (ambiguous VRs,
# character sets, raw elements), and a SEG's per-frame functional groups are thousands of small items (about 20
# elements in 9 nested items a frame), which made save_as cost as much as highdicom's constructor. Those items
# hold a few plain VRs, written here as pydicom writes them (a test pins the file to save_as byte for byte);
# anything else goes to pydicom.
PER_FRAME = Tag(0x52009230)  # PerFrameFunctionalGroupsSequence
PIXEL_DATA = Tag(0x7FE00010)
_NUMBERS = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FL": "f", "FD": "d"}
# in every character set, ASCII is ASCII (text that is not ASCII goes to pydicom)
_ASCII = {"UI", "CS", "SH", "LO", "DA", "TM", "DT", "AS", "AE", "ST", "LT", "UT"}
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)


class _Unhandled(Exception):
    """An element this encoder leaves to pydicom."""


def _element(tag: BaseTag, vr: str, value: bytes) -> bytes:
    return _raw(tag.group, tag.element, vr.encode(), value)


def _raw(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One element in explicit VR little endian: a 4-byte length for the long VRs, else 2 bytes."""
    if vr in LONG_VRS_ENCODED:
        return struct.pack("<HH2sHL", group, element, vr, 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise _Unhandled((group, element))
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _item(body: bytes) -> bytes:
    return _ITEM + struct.pack("<L", len(body)) + body


def _items(items: Sequence[Dataset]) -> bytes:
    parts = []
    for item in items:
        if getattr(item, "is_undefined_length_sequence_item", False):
            raise _Unhandled("undefined length item")
        parts.append(_item(_encode(item)))
    return b"".join(parts)


def _encode(ds: Dataset) -> bytes:
    """`ds` in explicit VR little endian as pydicom's write_dataset writes it (tag order, defined lengths)."""
    out = []
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # group lengths, which pydicom leaves out too
        elem = ds[tag]
        vr, v = elem.VR, elem.value
        multi = isinstance(v, (list, tuple)) or (hasattr(v, "__len__") and not isinstance(v, (str, bytes, Dataset)))
        if vr == "SQ":
            if elem.is_undefined_length:
                raise _Unhandled(tag)
            value = _items(v)
        elif (len(v) == 0) if multi else (v is None or v == ""):
            value = b""
        elif vr in _NUMBERS:
            vals = list(v) if multi else [v]
            value = struct.pack(f"<{len(vals)}{_NUMBERS[vr]}", *vals)
        elif vr in ("DS", "IS"):
            vals = list(v) if multi else [v]
            value = _text("DS", _ds_string(vals))
        elif vr in _ASCII:
            text = "\\".join(v) if multi else v
            if not isinstance(text, str):
                raise _Unhandled(tag)
            value = _text(vr, text)
        else:
            raise _Unhandled(tag)
        out.append(_element(tag, vr, value))
    return b"".join(out)


def save_seg(seg: Dataset, path: Path) -> None:
    """Write `seg` to `path` as `seg.save_as(path, enforce_file_format=True)` would, byte for byte, faster: the
    per-frame functional groups and the (native, bit-packed) pixel data are encoded here, the rest by pydicom."""
    tail = [elem.tag for elem in seg if elem.tag > PER_FRAME]
    try:
        if PER_FRAME not in seg or tail != [PIXEL_DATA]:
            raise _Unhandled("not a multi-frame image")
        if (int(seg.BitsAllocated) > 8 or seg[PIXEL_DATA].VR not in ("OB", "OB or OW")
                or not isinstance(seg.PixelData, bytes)):
            raise _Unhandled("pixel data")  # pydicom would write more than 8 bits as OW
        pixels = seg.PixelData + b"\0" * (len(seg.PixelData) % 2)
        rest = _element(PER_FRAME, "SQ", _items(seg.PerFrameFunctionalGroupsSequence)) + _element(
            PIXEL_DATA, "OB", pixels)
    except (_Unhandled, UnicodeEncodeError, struct.error):
        seg.save_as(path, enforce_file_format=True)
        return
    write_parts(seg, path, PER_FRAME, rest)


def encode_from(ds: Dataset, first: BaseTag) -> bytes | None:
    """The elements of `ds` from `first` on (a report's content tree: thousands of small items), encoded as
    pydicom writes them in explicit VR little endian; None when the file is in another encoding or one of them
    is not of the plain kinds encoded here (pydicom must then write it all). With `write_parts`, the file
    `ds.save_as(path, enforce_file_format=True)` writes, byte for byte."""
    if ds.file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return None
    tail = Dataset()
    for elem in ds:
        if elem.tag >= first:
            tail.add(elem)
    try:
        return _encode(tail)
    except (_Unhandled, UnicodeEncodeError, struct.error):
        return None


def write_parts(ds: Dataset, path, first: BaseTag, rest: bytes) -> None:
    """The file: preamble, file meta and the elements before `first` by pydicom, then `rest` (the elements from
    `first` on, already encoded in explicit VR little endian). `path` may be a writable binary file object."""
    if ds.file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        ds.save_as(path, enforce_file_format=True)
        return
    head = Dataset()  # everything before `first`; the elements are ds's own, not copies
    head.file_meta = ds.file_meta
    head.preamble = getattr(ds, "preamble", None)
    plain = Dataset()  # what pydicom encodes itself
    for elem in ds:
        if elem.tag < first:
            raw = _raw_sequence(elem) if elem.VR == "SQ" else None
            head.add(raw or elem)
            if raw is None:
                plain.add(elem)
    if len(plain) < len(head):
        # pydicom writes raw elements as they are when the dataset is marked as already in the file's encoding,
        # and then leaves the ambiguous VRs (US or SS, ...) alone: they are resolved here first, as it would
        correct_ambiguous_vr(plain, True)
        head.set_original_encoding(False, True, head._character_set)
    buf = io.BytesIO()
    head.save_as(buf, enforce_file_format=True)
    if hasattr(path, "write"):
        path.write(buf.getbuffer())
        path.write(rest)
        return
    with open(path, "wb") as f:
        f.write(buf.getbuffer())
        f.write(rest)


def _raw_sequence(elem):
    """A sequence (a SEG's references to each of its source images) as a raw element of its encoded items: the
    bytes pydicom would write. None, for pydicom to write, when the sequence has an undefined length, when an item
    holds what `_encode` leaves to pydicom, or when one still holds elements as read from a file (a source's
    study or patient sequence, which highdicom shares without copying): pydicom writes those bytes as they were
    read, padding and all, and they are not converted here."""
    if elem.is_undefined_length or any(_holds_raw(item) for item in elem.value):
        return None
    try:
        value = _items(elem.value)
    except (_Unhandled, UnicodeEncodeError, struct.error):
        return None
    return RawDataElement(elem.tag, "SQ", len(value), value, 0, False, True)


def _holds_raw(ds: Dataset) -> bool:
    """Whether `ds` or an item below it holds an element not yet converted from the bytes it was read from."""
    for elem in ds._dict.values():
        if isinstance(elem, RawDataElement):
            return True
        if elem.VR == "SQ" and any(_holds_raw(item) for item in elem.value):
            return True
    return False
