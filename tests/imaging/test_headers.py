"""The header facts a receiver indexes for each instance (livernode/imaging/headers.py)."""

from __future__ import annotations

import json

import pydicom
import pytest
from pynetdicom.dsutils import encode

from livernode.daemon.ingest_scp import decode_dataset
from livernode.imaging import dicomio, headers

IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"


def _received(ds: pydicom.Dataset, syntax: str, checked: bool = True) -> pydicom.Dataset:
    """`ds` as a receiver has it: decoded from its network encoding and checked."""
    ds = decode_dataset(encode(ds, syntax == IMPLICIT, True), syntax)
    return dicomio.check_dataset(ds, "test", transfer_syntax=pydicom.uid.UID(syntax)) if checked else ds


@pytest.mark.parametrize("syntax", [IMPLICIT, EXPLICIT])
def test_remembered_facts_are_the_facts_a_full_decode_gives(synth_dirs, syntax, monkeypatch):
    files = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[:4]
    slices = [pydicom.dcmread(f) for f in files]
    full = []
    with monkeypatch.context() as m:  # nothing remembered: every value decoded
        m.setattr(dicomio, "decoded_key", lambda raw, charset: None)
        full = [headers.header_facts(_received(ds, syntax)) for ds in slices]
    headers._PLAIN.clear()
    converted = []
    real = headers._plain
    monkeypatch.setattr(headers, "_plain", lambda value: converted.append(value) or real(value))
    remembered = []
    for ds in slices:
        before = len(converted)
        remembered.append(headers.header_facts(_received(ds, syntax)))
        converted_now = len(converted) - before
        if len(remembered) == 1:
            first = converted_now
    assert remembered == full and all(full)
    facts = [json.loads(f) for f in full]
    assert len(facts[0]) >= 15 and facts[0]["ImagePositionPatient"] != facts[1]["ImagePositionPatient"]
    # the last slice converted only what differs from the slices before (its position and UIDs, say)
    assert converted_now < first / 2, (converted_now, first)


def test_a_value_whose_reading_depends_on_another_element_is_never_remembered(synth_dirs):
    """Pixel Padding Value (US or SS in implicit VR) reads as -1 or 65535 from the same two bytes, by Pixel
    Representation. (The receivers' check decodes such values itself; a dataset read without it, as at
    re-indexing, reaches header_facts raw.)"""
    ds = pydicom.dcmread(sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[0])
    headers._PLAIN.clear()
    values = []
    for representation in (1, 0, 1):
        ds.PixelRepresentation = representation
        ds.PixelPaddingValue = -1 if representation else 0xFFFF
        ds["PixelPaddingValue"].VR = "SS" if representation else "US"
        values.append(json.loads(headers.header_facts(_received(ds, IMPLICIT, checked=False)))["PixelPaddingValue"])
    assert values == [-1, 65535, -1]
