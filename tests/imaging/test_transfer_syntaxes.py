"""Compressed and alternative transfer syntaxes decode to the same HU as the uncompressed reference.

Inputs are made by dcmtk (dcmcjpeg +e1, dcmcjpls, dcmcrle, dcmconv) and, for JPEG 2000, pydicom's encoder."""

import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from livernode.imaging.dicomio import read_ct_series

TOOLS = {
    "jpeg-lossless": ["/usr/bin/dcmcjpeg", "+e1"],
    "jpeg-ls": ["/usr/bin/dcmcjpls"],
    "rle": ["/usr/bin/dcmcrle"],
    "deflated": ["/usr/bin/dcmconv", "+td"],
    "implicit": ["/usr/bin/dcmconv", "+ti"],
}
EXPECTED_TS = {"jpeg-lossless": "1.2.840.10008.1.2.4.70", "jpeg-ls": "1.2.840.10008.1.2.4.80",
               "rle": "1.2.840.10008.1.2.5", "deflated": "1.2.840.10008.1.2.1.99", "implicit": "1.2.840.10008.1.2",
               "jpeg2000": JPEG2000Lossless}


@pytest.mark.parametrize("syntax", sorted(EXPECTED_TS))
def test_decoded_hu_equals_reference(synth_dirs, tmp_path, syntax):
    src = sorted((synth_dirs["dicom"] / "case_001" / "ct").glob("*.dcm"))
    reference = read_ct_series(src)
    out = []
    for f in src:
        dst = tmp_path / f.name
        if syntax == "jpeg2000":
            ds = pydicom.dcmread(f)
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
            ds.save_as(dst, enforce_file_format=True)
        else:
            subprocess.run([*TOOLS[syntax], str(f), str(dst)], check=True, capture_output=True)
        out.append(dst)
    assert str(pydicom.dcmread(out[0], stop_before_pixels=True).file_meta.TransferSyntaxUID) == EXPECTED_TS[syntax]
    decoded = read_ct_series(out)
    assert np.array_equal(decoded.hu, reference.hu)
    assert decoded.sop_instance_uids == reference.sop_instance_uids
