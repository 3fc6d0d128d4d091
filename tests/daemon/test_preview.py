"""preview.png: the montage's tiles, the segments' tint and the lesion boxes."""

import cv2
import numpy as np

from livernode.daemon import report
from livernode.imaging.postprocess import postprocess
from livernode.imaging.volume import LIVER, TUMOUR


def test_the_tint_table_equals_blending_in_float32():
    """Every grey level under every label: the table, and the preview's per-channel look-up of it, give what
    0.6 x grey + 0.4 x colour in float32, truncated, gives (the way the preview was first drawn, pixel by pixel);
    other labels keep the grey level."""
    grey = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    lab = np.array([0, LIVER, TUMOUR, 7], np.uint8)[:, None].repeat(256, axis=1)
    want = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR).astype(np.float32)
    for value, colour in ((LIVER, report.LIVER_BGR), (TUMOUR, report.TUMOUR_BGR)):
        m = lab == value
        want[m] = 0.6 * want[m] + 0.4 * np.array(colour, np.float32)
    got = report._BLEND[report._BLEND_ROW[lab], grey]
    assert got.shape == (4, 256, 3) and np.array_equal(got, want.astype(np.uint8))
    assert np.array_equal(report._blend(lab, grey), got)
    assert not np.array_equal(got[1], got[0]) and np.array_equal(got[3], got[0])


def test_preview_tiles_tint_and_boxes(tmp_path):
    n = 20
    hu = np.full((n, 128, 128), -1000, np.int16)
    labels = np.zeros((n, 128, 128), np.uint8)
    hu[:, 20:100, 20:100] = 60
    labels[2:18, 20:100, 20:100] = LIVER
    labels[8:12, 50:70, 50:70] = TUMOUR
    findings = postprocess(labels, (2.0, 1.0, 1.0))
    assert len(findings.lesions) == 1
    path = report.preview(hu, findings, tmp_path / "preview.png")
    png = cv2.imread(str(path))
    assert png is not None and png.shape == (3 * 256, 4 * 256, 3)  # 12 tiles of the 16 labelled slices
    tiles = [png[r:r + 256, c:c + 256] for r in range(0, 768, 256) for c in range(0, 1024, 256)]
    # air is black, the liver is tinted, and the slices with the lesion have its yellow box
    centre = [t[128, 128].astype(int) for t in tiles]
    assert all(t[5, 250].max() == 0 for t in tiles)
    assert sum(c[1] > c[0] and c[1] > c[2] for c in centre) >= 6  # green over grey: liver
    boxed = [t for t in tiles if (np.abs(t.astype(int) - report.BOX_BGR).sum(axis=2) < 60).sum() > 20]
    assert 1 <= len(boxed) < len(tiles)
