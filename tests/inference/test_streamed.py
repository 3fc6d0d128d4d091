"""Streamed inference (Segmenter.segment_streamed): a reader thread decodes (and on a GPU prepares) the batches,
this thread runs the network, a third restores the labels. The labels are those of segmenting the whole volume at once, and a
failure in any stage, or a stop asked for between batches, reaches the caller with every thread ended."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from livernode.imaging.dicomio import read_ct_series
from livernode.imaging.orient import Orientation
from livernode.inference.runner import Segmenter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hu(chaos_sample) -> np.ndarray:
    files = sorted((chaos_sample / "DICOM_anon").rglob("*.dcm"))
    return np.clip(np.rint(read_ct_series(files).hu[10:40]), -32768, 32767).astype(np.int16)


def _stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("decode", "restore") and t.is_alive()]


@pytest.mark.parametrize("ahead", [False, True])
def test_streamed_labels_are_the_whole_volumes(liver_model, hu, ahead):
    """Each batch prepared by the network's thread (the CPU's way) or by the reader (a GPU's), the same labels."""
    seg = Segmenter(liver_model, providers="cpu", batch_size=4)
    assert not seg.prepare_ahead  # on the CPU
    seg.prepare_ahead = ahead
    turn = Orientation(flip_rows=True)
    batches = []
    got_hu, got = seg.segment_streamed(len(hu), hu.shape[1:], hu.__getitem__, np.int16, orientation=turn,
                                       on_batch=lambda done, n: batches.append((done, n)))
    want = seg.segment(hu, turn)
    assert np.array_equal(got_hu, hu) and (want > 0).sum() > 1000 and np.array_equal(got, want)
    assert batches == [(min(30, k), 30) for k in range(4, 33, 4)]
    assert not _stage_threads()


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("where", ["decode", "between batches"])
def test_a_failure_or_a_stop_reaches_the_caller_and_the_reader_stops(liver_model, hu, where, ahead):
    seg = Segmenter(liver_model, providers="cpu", batch_size=2)
    seg.prepare_ahead = ahead
    decoded = []

    def decode(i):
        if where == "decode" and i == 13:
            raise RuntimeError("slice 13 cannot be decoded")
        decoded.append(i)
        return hu[i]

    def on_batch(done, n):
        if where == "between batches" and done == 4:
            raise RuntimeError("the node is stopping")

    with pytest.raises(RuntimeError, match="slice 13" if where == "decode" else "stopping"):
        seg.segment_streamed(len(hu), hu.shape[1:], decode, np.int16, on_batch=on_batch)
    assert not _stage_threads()
    # the reader stops at the failing slice; after a stop it has decoded the slices in order, and when it prepares
    # the inputs (bounded to two batches ahead) it stopped before the end
    if where == "decode":
        assert decoded == list(range(13))
    else:
        assert decoded == list(range(len(decoded))) and len(decoded) >= 4, decoded
        assert len(decoded) < len(hu) or not ahead, decoded
