"""The few header attributes that choose, order and decode a series, kept in the node's index when an instance is
received: series selection reads them from there instead of parsing every file of the study again. The full
headers of the chosen series come from the files as they are decoded for the network, which reads them anyway."""

from __future__ import annotations

import json
import warnings

import pydicom
from pydicom.multival import MultiValue
from pydicom.valuerep import DSdecimal, DSfloat, IS

from livernode.imaging import dicomio

# What series selection (select.py), slice ordering and decoding (dicomio.py) and the coverage pass read of an
# instance before its series is chosen. No patient or study identifiers beyond the UIDs the index holds anyway.
KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
            "Modality", "ImageType", "SeriesDescription", "SeriesNumber", "ConvolutionKernel", "SliceThickness",
            "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns", "RescaleSlope",
            "RescaleIntercept", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "PixelPaddingValue")
PIXEL_DATA = 0x7FE00010


# (keyword, tag, whether its plain value may be remembered): not for a VR that depends on other elements (US or SS:
# Pixel Padding Value reads as signed or not by Pixel Representation).
_TAGS = tuple((keyword, pydicom.tag.Tag(keyword),
               pydicom.datadict.dictionary_VR(keyword) not in pydicom.valuerep.AMBIGUOUS_VR) for keyword in KEYWORDS)
# The plain value of a raw element, by dicomio.decoded_key (its bytes, tag, VR, encoding and character set): most of
# these facts repeat from slice to slice of a series, and the receivers leave such values undecoded
# (dicomio.check_dataset). Cleared when full.
_PLAIN: dict[tuple, object] = {}
_PLAIN_MAX = 8192


def header_facts(ds: pydicom.Dataset) -> str | None:
    """`ds`'s KEYWORDS as compact JSON: numbers and strings as the file holds them (decimal and integer strings
    keep their text, so a value read back compares equal to the file's). None when a value does not convert:
    selection then reads the file."""
    facts = {}
    try:
        charset = str(ds.get("SpecificCharacterSet", ""))
        for keyword, tag, cacheable in _TAGS:
            raw = ds.get_item(tag, keep_deferred=True)
            if raw is None:
                continue
            key = dicomio.decoded_key(raw, charset) if cacheable else None
            value = _PLAIN.get(key, _PLAIN) if key is not None else _PLAIN
            if value is _PLAIN:  # not seen before
                value = _plain(ds[tag].value)
                if key is not None:
                    if len(_PLAIN) >= _PLAIN_MAX:
                        _PLAIN.clear()
                    _PLAIN[key] = value
            facts[keyword] = value
        return json.dumps(facts, separators=(",", ":"))
    except Exception:  # noqa: BLE001 - a value pydicom cannot give: no facts, not a refused instance
        return None


def _plain(value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (list, tuple, MultiValue)):
        return [_plain(v) for v in value]
    if isinstance(value, (IS, DSfloat, DSdecimal)):
        return str(value)
    if isinstance(value, (int, float)):
        return value
    return str(value)  # UIDs and other str-like values


class LightHeader(pydicom.Dataset):
    """A header made of index facts alone: enough to choose and order a series, not to describe it in a result."""


def without_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    """`ds` without its pixel data and whatever follows it: the header `dcmread(stop_before_pixels=True)` reads."""
    for tag in [t for t in ds.keys() if t >= PIXEL_DATA]:
        del ds[tag]
    return ds


def light_header(facts: str | None) -> LightHeader | None:
    """A dataset with only the attributes in `facts` (from `header_facts`); None when there are none or they do
    not make a dataset (the caller then reads the file)."""
    if not facts:
        return None
    try:
        ds = LightHeader()
        with warnings.catch_warnings():  # a value pydicom warned about when the file was read warns again here
            warnings.simplefilter("ignore")
            for keyword, value in json.loads(facts).items():
                setattr(ds, keyword, value)
        return ds
    except Exception:  # noqa: BLE001 - anything odd: the file itself is read instead
        return None
