"""Late instances: slices that arrive after the result was sent cause a reprocess, delivered as a new SEG and SR
series that supersede the first (higher series numbers, every slice referenced)."""

from __future__ import annotations

import highdicom as hd
import pydicom
import pytest

from tests.peers import at_pacs, free_port, start_node, stop_node, storescu, wait_for, wait_port

pytestmark = pytest.mark.slow


def _at_pacs(out, n):
    return at_pacs(out, n)


def test_late_slice_supersedes_the_sent_result(tmp_path, exported, synth_dirs, pacs, figure):
    pacs_port, pacs_out = pacs
    port = free_port()
    files = sorted((synth_dirs["dicom"] / "case_002" / "ct").glob("*.dcm"))  # 12 slices
    node = start_node(tmp_path / "state", exported, "--port", str(port), "--destination",
                      f"PACS@127.0.0.1:{pacs_port}", "--study-timeout", "1")
    try:
        wait_port(port, node)
        storescu(port, files[:-1])
        first = wait_for(lambda: _at_pacs(pacs_out, 2), 120, "the first SEG and SR")
        storescu(port, files[-1:])  # the straggler, after the result went out
        both = wait_for(lambda: _at_pacs(pacs_out, 4), 120, "the superseding SEG and SR")
    finally:
        err = stop_node(node)
    assert "reprocessing (generation 2)" in err
    by = {}
    for f in both:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by.setdefault(ds.Modality, []).append(ds)
    assert sorted(by) == ["SEG", "SR"] and all(len(v) == 2 for v in by.values())
    for modality in ("SEG", "SR"):
        old, new = sorted(by[modality], key=lambda d: int(d.SeriesNumber))
        assert old.SeriesInstanceUID != new.SeriesInstanceUID and int(new.SeriesNumber) > int(old.SeriesNumber)
    first_names = {p.name for p in first}
    segs = {("first" if p.name in first_names else "second"): hd.seg.segread(p) for p in both
            if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"}
    all_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    late_uid = str(pydicom.dcmread(files[-1], stop_before_pixels=True).SOPInstanceUID)
    assert {str(u[2]) for u in segs["first"].get_source_image_uids()} == all_uids - {late_uid}
    assert {str(u[2]) for u in segs["second"].get_source_image_uids()} == all_uids
    figure("series_numbers", sorted(int(d.SeriesNumber) for v in by.values() for d in v))
    figure("slices_referenced", [len(all_uids) - 1, len(all_uids)])
