"""Every transfer syntax a modality or PACS may use arrives through the SCP (sent by dcmtk storescu) and decodes to
the same Hounsfield units as the uncompressed reference, bit for bit.

Inputs are made by dcmtk (dcmcjpeg +e1, dcmcjpls, dcmcrle, dcmconv) and, for JPEG 2000, pydicom's encoder
(pylibjpeg-openjpeg)."""

import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from livernode.imaging.dicomio import read_ct_series
from tests.peers import storescu

TOOLS = {
    "jpeg-lossless": ["/usr/bin/dcmcjpeg", "+e1"],
    "jpeg-ls": ["/usr/bin/dcmcjpls"],
    "rle": ["/usr/bin/dcmcrle"],
    "deflated": ["/usr/bin/dcmconv", "+td"],
    "implicit": ["/usr/bin/dcmconv", "+ti"],
    "explicit": ["/usr/bin/dcmconv", "+te"],
}
EXPECTED_TS = {"jpeg-lossless": "1.2.840.10008.1.2.4.70", "jpeg-ls": "1.2.840.10008.1.2.4.80",
               "rle": "1.2.840.10008.1.2.5", "deflated": "1.2.840.10008.1.2.1.99", "implicit": "1.2.840.10008.1.2",
               "explicit": "1.2.840.10008.1.2.1", "jpeg2000": JPEG2000Lossless}
PROPOSE = {"jpeg-lossless": "-xs", "jpeg-ls": "-xt", "rle": "-xr", "deflated": "-xd", "implicit": "-xi",
           "explicit": "-xe", "jpeg2000": "-xv"}


@pytest.mark.parametrize("syntax", sorted(EXPECTED_TS))
def test_received_in_each_syntax_decodes_to_the_reference(scp, synth_dirs, tmp_path, syntax, figure):
    src = sorted((synth_dirs["dicom"] / "case_001" / "ct").glob("*.dcm"))
    reference = read_ct_series(src)
    converted = []
    for f in src:
        dst = tmp_path / f.name
        if syntax == "jpeg2000":
            ds = pydicom.dcmread(f)
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
            ds.save_as(dst, enforce_file_format=True)
        else:
            subprocess.run([*TOOLS[syntax], str(f), str(dst)], check=True, capture_output=True)
        converted.append(dst)
    assert str(pydicom.dcmread(converted[0], stop_before_pixels=True).file_meta.TransferSyntaxUID) == \
        EXPECTED_TS[syntax]
    storescu(scp.port, converted, PROPOSE[syntax])  # the file's own syntax is the one proposed
    received = sorted(scp.spool.instances.rglob("*.dcm"))
    assert len(received) == len(src)
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in received} == \
        {EXPECTED_TS[syntax]}  # stored as it arrived
    decoded = read_ct_series(received)
    assert reference.hu.std() > 0 and np.array_equal(decoded.hu, reference.hu)
    assert decoded.sop_instance_uids == reference.sop_instance_uids
    figure("slices_bit_exact", len(received))
