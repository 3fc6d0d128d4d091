"""The pipeline reads a study's pixels twice: streamed into the network, then a dozen slices again for the
preview (the HU volume is not kept through post-processing). Both reads must give the same HU."""

from pathlib import Path

import numpy as np

from livernode.daemon.pipeline import _Slices
from livernode.imaging.dicomio import order_slices, read_ct_series, read_dataset


def test_slices_read_again_are_the_volumes_slices(chaos_sample):
    """Real scanner data (CHAOS: intercept -1000, files in descending z): slice k read again equals slice k of the
    volume the reader builds, as int16 HU."""
    files = sorted((chaos_sample / "DICOM_anon").glob("*.dcm"))
    headers = [(str(f), read_dataset(f, pixels=False)) for f in files]
    series = str(headers[0][1].SeriesInstanceUID)
    order = order_slices(headers, series)
    kept = [headers[i] for i in order.kept]
    volume = read_ct_series([Path(p) for p, _ in kept])
    slices = _Slices(kept, np.int16)
    assert len(slices) == len(volume.hu) == 78
    for k in (0, 20, 77):
        got = slices[k]
        assert got.dtype == np.int16 and np.array_equal(got, volume.hu[k])
    assert volume.hu.min() < -900  # HU, not raw stored values
