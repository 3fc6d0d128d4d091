"""Read CT series into `CtVolume`s: slices sorted along the slice normal, geometry checked, pixels in HU."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom

from livernode.errors import InputError, SeriesRejected
from livernode.imaging.preprocess import to_hu
from livernode.imaging.volume import CtVolume

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
IMAGE_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, SEGMENTATION_STORAGE})
MAX_TILT_DEG = 0.5
DEFER_BYTES = 1 << 20  # values larger than this are read from the file only once their length is checked
SPACING_TOLERANCE = 0.1  # relative deviation of one slice step from the median step
# explicit VR: the VRs whose element header has 2 reserved bytes and a 4-byte length; the others have a 2-byte one
LONG_VRS = {"OB", "OD", "OF", "OL", "OW", "OV", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
LONG_VRS_ENCODED = {vr.encode() for vr in LONG_VRS}  # as they lie in a file


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # long form: 2 reserved bytes and a 4-byte length
        return struct.pack("<HH2s2xI", 2, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, implementation_uid: str,
                  implementation_version: str) -> bytes:
    """Preamble, "DICM" and File Meta Information (Explicit VR Little Endian) for a dataset received over the
    network: written in front of the peer's encoded bytes, it makes a DICOM file without decoding and re-encoding
    the dataset. The same bytes as pydicom's file meta writer, without building a Dataset for every instance."""
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\0")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\0")),
        _meta_element(0x0012, b"UI", _padded(implementation_uid, b"\0")),
        _meta_element(0x0013, b"SH", _padded(implementation_version, b" ")),
    ))
    return b"\0" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def dataset_offset(raw: bytes | memoryview) -> int:
    """Where the dataset begins in the bytes of a Part 10 file: after the preamble, "DICM" and the file meta
    elements (group 0002, explicit VR little endian). They end where the group's length (0002,0000) says, where it
    is given (a deflated dataset's first bytes may look like a group 0002 element), else at the first element of
    another group. ValueError if the bytes do not begin that way, or the elements do not end where the group's
    length says."""
    if len(raw) < 132 or bytes(raw[128:132]) != b"DICM":
        raise ValueError("not a DICOM file: no preamble and DICM prefix")
    at, end, given = 132, len(raw), False
    if len(raw) >= 144 and bytes(raw[132:140]) == b"\x02\x00\x00\x00UL\x04\x00":
        end, given = 144 + struct.unpack_from("<I", raw, 140)[0], True
    while at + 8 <= min(end, len(raw)):
        group, element, vr = struct.unpack_from("<HH2s", raw, at)
        if group != 2:
            break
        if vr in LONG_VRS_ENCODED:
            if at + 12 > len(raw):
                raise ValueError(f"file meta element (0002,{element:04X}) runs past the end of the file")
            at += 12 + struct.unpack_from("<I", raw, at + 8)[0]
        else:
            at += 8 + struct.unpack_from("<H", raw, at + 6)[0]
    if at > min(end, len(raw)) or (given and at != end):
        raise ValueError(f"the file meta's elements end at byte {at}, its group length says {end}, the file has "
                         f"{len(raw)}")
    return at


def read_dataset(path: Path, *, pixels: bool = True, checked: bool = False) -> pydicom.Dataset:
    """Read one DICOM file; InputError naming the file if it is not readable DICOM (see `check_dataset`).
    `checked`: the file holds bytes whose every element `check_dataset` has already decoded (the node's receivers
    check each instance before they store it), so only the lengths and the pixel data are checked again."""
    try:
        size = Path(path).stat().st_size
        # Large values are read only after their declared length has been checked against the file's size:
        # otherwise a header claiming 2 GiB of pixel data makes the reader allocate 2 GiB.
        ds = pydicom.dcmread(str(path), stop_before_pixels=not pixels, defer_size=DEFER_BYTES)
    except Exception as exc:  # pydicom raises many types for broken input; all mean the same to the caller
        raise InputError(f"{path}: not readable DICOM ({type(exc).__name__}: {exc})") from None
    return check_dataset(ds, str(path), pixels=pixels, file_size=size, elements=not checked)


def check_dataset(ds: pydicom.Dataset, source: str, *, pixels: bool = True,
                  transfer_syntax: str | None = None, file_size: int | None = None,
                  elements: bool = True) -> pydicom.Dataset:
    """Decode every top-level element now (unless `elements` is false), so a malformed value (a length that runs
    past the end, a US value of 3 bytes) fails here with `source` named rather than later, deep in the
    pipeline; and refuse an image whose pixel data is shorter than its header says. `transfer_syntax` for a
    dataset received over the network (no file meta). Returns `ds`; InputError otherwise."""
    try:
        charset = str(ds.get("SpecificCharacterSet", "")) if elements else ""
        for tag in list(ds.keys()):
            raw = ds.get_item(tag, keep_deferred=True)
            _check_declared_length(raw, source, file_size)
            if elements:
                key = decoded_key(raw, charset)
                if key is None or key not in _DECODED:
                    ds[tag]  # noqa: B018 - converts the raw element now
                    _remember(key, tag)
        if pixels and ("Rows" in ds or ds.get("SOPClassUID") in IMAGE_SOP_CLASSES):
            ts = pydicom.uid.UID(transfer_syntax or ds.file_meta.TransferSyntaxUID)
            _check_pixel_data(ds, source, ts)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{source}: not readable DICOM ({type(exc).__name__}: {exc})") from None
    return ds


# Values that decoded without error before, keyed by everything their decoding depends on: the same bytes under the
# same tag, VR, byte order and character set decode the same way again, and the slices of one series repeat most of
# their header (of a CT slice's 88 elements, all but a dozen). Such a value is left for whoever reads it. Private
# tags (their VR comes from their creator), sequences (their items are datasets) and VRs that depend on other
# elements (US or SS, OB or OW) are decoded every time. Cleared when full.
_DECODED: dict[tuple, None] = {}
_DECODED_MAX = 8192
_DECODED_LONGEST = 256  # bytes: larger values are decoded every time rather than kept as keys
_NOT_REMEMBERED = frozenset(pydicom.valuerep.AMBIGUOUS_VR) | {"SQ"}


def decoded_key(raw, charset: str) -> tuple | None:
    """The key of a raw element's decoding in `_DECODED`; None for one that is decoded every time."""
    if not isinstance(raw, pydicom.dataelem.RawDataElement) or raw.tag.is_private:
        return None
    value = b"" if raw.value is None and raw.length == 0 else raw.value  # an empty value; None otherwise: deferred
    if value is None or len(value) > _DECODED_LONGEST:
        return None
    return raw.tag, raw.VR, value, raw.is_implicit_VR, raw.is_little_endian, charset


def _remember(key: tuple | None, tag) -> None:
    if key is None:
        return
    try:
        if pydicom.datadict.dictionary_VR(tag) in _NOT_REMEMBERED or key[1] in _NOT_REMEMBERED:
            return
    except KeyError:  # a tag the dictionary does not know
        return
    if len(_DECODED) >= _DECODED_MAX:
        _DECODED.clear()
    _DECODED[key] = None


def _check_declared_length(raw, path: str, file_size: int | None = None) -> None:
    """pydicom stops quietly at the end of the data; an element holding fewer bytes than it declares is an error.
    A value left unread (deferred) is checked against the file's size before anything reads it."""
    length, value = getattr(raw, "length", None), getattr(raw, "value", None)
    if length is None or length == 0xFFFFFFFF:
        return
    if value is None and file_size is not None and getattr(raw, "value_tell", None) is not None:
        available = file_size - raw.value_tell
        if length > available:
            raise InputError(f"{path}: element {raw.tag} declares {length} bytes but the file ends after "
                             f"{max(available, 0)} (truncated or a wrong length)")
    elif isinstance(value, bytes | bytearray) and len(value) < length:
        raise InputError(f"{path}: element {raw.tag} declares {length} bytes but the file ends after {len(value)} "
                         "(truncated or a wrong length)")


def _check_pixel_data(ds: pydicom.Dataset, path: str, transfer_syntax: pydicom.uid.UID) -> None:
    """pydicom reads a truncated file without complaint; an image without all of its pixel data is an error."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InputError(f"{path}: image without pixel data (truncated file?)")
    if "Rows" not in ds or "Columns" not in ds:
        raise InputError(f"{path}: image without Rows/Columns (truncated file?)")
    if not transfer_syntax.is_compressed and "PixelData" in ds:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        bits = int(getattr(ds, "BitsAllocated", 16))
        expected = ds.Rows * ds.Columns * int(getattr(ds, "SamplesPerPixel", 1)) * frames * bits // 8
        if len(ds.PixelData) < expected:
            raise InputError(f"{path}: pixel data holds {len(ds.PixelData)} bytes, expected {expected} (truncated)")


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return np.cross(row, col)


def _pixels(ds: pydicom.Dataset, source: str) -> np.ndarray:
    """The stored pixel values, decoding any supported transfer syntax; InputError naming `source` otherwise."""
    try:
        return ds.pixel_array
    except Exception as exc:  # decoders raise many types; all mean the same to the caller
        raise InputError(f"{source}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None


def hu_of(ds: pydicom.Dataset, source: str) -> np.ndarray:
    """Pixel data of one single-frame image in HU (float32), decoding any supported transfer syntax."""
    arr = _pixels(ds, source)
    hu = to_hu(arr, float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0))
    pad = getattr(ds, "PixelPaddingValue", None)
    if pad is not None:
        hu[arr == pad] = -1000.0
    return hu


def hu_int16_of(ds: pydicom.Dataset, source: str) -> np.ndarray:
    """`hu_of` as int16 (clipped to its range) for integer HU (slope 1, integer intercept), computed in integers:
    the same values without a float32 copy of the slice. A single-frame 16-bit image stored uncompressed, little
    endian (what scanners and our receivers mostly store) is computed from its stored words without pydicom's
    decoding (`_native_words`, `_words_to_hu`). Other rescales go through `hu_of`."""
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    if slope != 1.0 or not intercept.is_integer():
        return np.clip(hu_of(ds, source), -32768, 32767).astype(np.int16)
    pad = getattr(ds, "PixelPaddingValue", None)
    words = _native_words(ds)
    if words is not None and (pad is None or isinstance(pad, int)):
        return _words_to_hu(words, int(ds.PixelRepresentation) == 1, int(ds.BitsStored), int(intercept), pad)
    arr = _pixels(ds, source)
    if arr.dtype.kind not in "iu":
        return np.clip(hu_of(ds, source), -32768, 32767).astype(np.int16)
    hu = arr.astype(np.int64 if arr.itemsize > 2 else np.int32)
    hu += int(intercept)
    out = np.clip(hu, -32768, 32767).astype(np.int16)
    if pad is not None:
        out[arr == pad] = -1000
    return out


_NATIVE_LITTLE_ENDIAN = frozenset({pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian})


def _native_words(ds: pydicom.Dataset) -> np.ndarray | None:
    """The stored 16-bit words (rows, cols) of a single-frame, single-sample image in an uncompressed little-endian
    file, as a view on its pixel data; None for any other image (pydicom decodes those)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _NATIVE_LITTLE_ENDIAN:
        return None
    try:
        if (int(ds.BitsAllocated) != 16 or int(ds.get("SamplesPerPixel", 1) or 1) != 1
                or int(ds.get("NumberOfFrames", 1) or 1) != 1 or not 1 <= int(ds.BitsStored) <= 16
                or int(ds.PixelRepresentation) not in (0, 1)):
            return None
        rows, cols, data = int(ds.Rows), int(ds.Columns), ds.PixelData
    except (AttributeError, TypeError, ValueError):
        return None
    if not isinstance(data, bytes) or rows * cols == 0 or len(data) != 2 * rows * cols:
        return None  # pydicom decides what an empty image or extra data means
    return np.frombuffer(data, "<u2", count=rows * cols).reshape(rows, cols)


def _words_to_hu(words: np.ndarray, signed: bool, bits_stored: int, intercept: int, pad: int | None
                 ) -> np.ndarray:
    """int16 HU of stored 16-bit words, as `_hu_table` maps them. In int16 arithmetic when the unused bits hold
    nothing (each word is its value) and no value overflows int16 with the intercept added, the common case
    (about 0.1 ms a 512 px slice); otherwise through the table (about 0.4 ms)."""
    values = words.view(np.int16) if signed else words
    lo, hi = int(values.min()), int(values.max())
    first, last = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    if (first <= lo and hi <= last and hi <= 32767 and -32768 <= intercept <= 32767
            and -32768 <= lo + intercept and hi + intercept <= 32767):
        out = values.astype(np.int16)  # exact: every value lies in int16's range
        out += np.int16(intercept)
        if pad is not None:
            out[values == pad] = -1000
        return out
    return np.take(_hu_table(signed, bits_stored, intercept, pad), words)


@lru_cache(maxsize=16)
def _hu_table(signed: bool, bits_stored: int, intercept: int, pad: int | None) -> np.ndarray:
    """int16 HU for each of the 65536 stored words: the bits above Bits Stored ignored (sign-extended from the
    highest stored bit for signed pixels, as pydicom's pixel_array does), the intercept added, clipped to int16, and
    the padding value (compared with the stored value) set to -1000 (air)."""
    words = np.arange(1 << 16, dtype=np.int64)
    value = words & ((1 << bits_stored) - 1)
    if signed:
        sign = 1 << (bits_stored - 1)
        value = (value ^ sign) - sign
    table = np.clip(value + intercept, -32768, 32767).astype(np.int16)
    if pad is not None:
        table[value == pad] = -1000
    table.flags.writeable = False  # shared by every call with these arguments
    return table


def _require(ds: pydicom.Dataset, source: str, *keywords: str) -> None:
    missing = [k for k in keywords if k not in ds or ds[k].value in (None, "")]
    if missing:
        raise SeriesRejected(f"{source}: missing {', '.join(missing)}")


@dataclass(frozen=True)
class SliceOrder:
    """Header-only result of ordering one series: which items to use, in order, and the slice step."""

    kept: tuple[int, ...]
    step: float
    orientation: tuple[float, ...]
    origin: tuple[float, float, float]


def order_slices(items: Sequence[tuple[str, pydicom.Dataset]], label: str) -> SliceOrder:
    """Order (source, dataset) pairs of one series along the slice normal and check the geometry.

    Slices are ordered by ImagePositionPatient projected on the slice normal, never by file name or instance
    number. Duplicate positions are dropped (first kept); mixed geometry, tilt and gaps are rejected with a reason.
    Reads headers only.
    """
    if not items:
        raise SeriesRejected(f"series {label}: no images")
    ref_src, ref = items[0]
    for src, ds in items:
        _require(ds, src, "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    orientation = tuple(float(v) for v in ref.ImageOrientationPatient)
    normal = slice_normal(orientation)
    for src, ds in items:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orientation, atol=1e-3):
            raise SeriesRejected(f"series {label}: {src} has a different image orientation")
        if (ds.Rows, ds.Columns) != (ref.Rows, ref.Columns):
            raise SeriesRejected(f"series {label}: {src} is {ds.Rows}x{ds.Columns}, not {ref.Rows}x{ref.Columns}")
        if not np.allclose([float(v) for v in ds.PixelSpacing], [float(v) for v in ref.PixelSpacing], atol=1e-4):
            raise SeriesRejected(f"series {label}: {src} has a different pixel spacing")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    kept: list[int] = []
    for idx in order:
        if kept and abs(along[idx] - along[kept[-1]]) < 1e-3:
            log.warning("series %s: dropping %s, duplicate slice position %.3f", label, items[idx][0], along[idx])
            continue
        kept.append(int(idx))
    if len(kept) > 1:
        steps = np.diff(along[kept])
        step = float(np.median(steps))
        bad = np.abs(steps - step) > SPACING_TOLERANCE * step
        if bad.any():
            i = int(np.argmax(bad))
            raise SeriesRejected(
                f"series {label}: slice gap of {steps[i]:.2f} mm after {items[kept[i]][0]} (median step {step:.2f} mm)"
            )
        # Gantry tilt: the line through the slice origins must run along the normal.
        drift = positions[kept[-1]] - positions[kept[0]]
        cos = abs(drift @ normal) / max(np.linalg.norm(drift), 1e-9)
        tilt = float(np.degrees(np.arccos(min(1.0, cos))))
        if tilt > MAX_TILT_DEG:
            raise SeriesRejected(f"series {label}: gantry tilt {tilt:.1f} deg exceeds {MAX_TILT_DEG} deg")
    else:
        step = float(getattr(ref, "SliceThickness", 1.0) or 1.0)
    return SliceOrder(tuple(kept), step, orientation, tuple(float(v) for v in positions[kept[0]]))


def volume_from_datasets(items: Iterable[tuple[str, pydicom.Dataset]], *, series_label: str = "") -> CtVolume:
    """Build a volume from (source, dataset) pairs of one series, ordered and checked by `order_slices`."""
    items = list(items)
    label = series_label or (str(getattr(items[0][1], "SeriesInstanceUID", items[0][0])) if items else "?")
    order = order_slices(items, label)
    hu = np.stack([hu_of(items[i][1], items[i][0]) for i in order.kept])
    return ordered_volume([items[i][1] for i in order.kept], order, hu, label)


def ordered_volume(kept: Sequence[pydicom.Dataset], order: SliceOrder, hu: np.ndarray, label: str) -> CtVolume:
    """The CtVolume of slices already ordered by `order_slices` (`kept` in that order) and decoded into `hu`."""
    ref = kept[0]
    row_sp, col_sp = (float(v) for v in ref.PixelSpacing)
    return CtVolume(
        hu=hu,
        spacing=(order.step, row_sp, col_sp),
        origin=order.origin,
        orientation=order.orientation,
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in kept),
        series_instance_uid=str(getattr(ref, "SeriesInstanceUID", "")),
        source=label,
    )


def read_ct_series(files: Sequence[Path], *, series_label: str = "") -> CtVolume:
    """Read the given files (one series) into a CtVolume; InputError/SeriesRejected name the file and reason."""
    return volume_from_datasets(((str(f), read_dataset(f)) for f in files), series_label=series_label)


def dicom_files(folder: Path) -> list[Path]:
    """All regular files below `folder` that start like DICOM (preamble + 'DICM'), sorted by path."""
    found = []
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            with p.open("rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                found.append(p)
    return found
