import numpy as np
import pytest

from livernode.imaging.dicomio import dicom_files, read_ct_series
import cv2

from livernode.imaging.preprocess import (PreprocessSpec, argmax_last, prepare_labels, prepare_slices, restore_labels,
                                          restore_probabilities, window)
from livernode.training.cache import prepare
from livernode.training.data import CaseSplit
from livernode.training.datasets import list_cases


def test_window_maps_hu_to_unit_range():
    hu = np.array([-1000, -100, 150, 400, 2000], np.float32)
    assert window(hu, -100, 400).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_prepare_pads_non_square_and_sizes_to_multiple_of_32():
    hu = np.full((2, 40, 64), 400.0, np.float32)
    spec = PreprocessSpec(size=96, channels=3)
    x = prepare_slices(hu, spec)
    assert x.shape == (2, 96, 96, 3) and x.dtype == np.float32
    assert x[0, 48, 48, 0] == pytest.approx(1.0)
    assert x[0, 2, 48, 0] == pytest.approx(0.0)  # padding is air
    prob = np.random.default_rng(0).random((2, 96, 96, 3)).astype(np.float32)
    back = restore_probabilities(prob, (40, 64))
    assert back.shape == (2, 40, 64, 3)
    assert prepare_labels(np.ones((1, 40, 64), np.uint8), 96).sum() > 0


def _network_like(rng, n: int, size: int, cells: int, noise: float) -> np.ndarray:
    """Softmax of smooth random logits (organ-like regions of about size/cells px) plus pixel noise."""
    coarse = rng.normal(size=(n, max(2, size // cells), max(2, size // cells), 3)).astype(np.float32)
    logits = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_CUBIC) for c in coarse]) * 8
    logits += rng.normal(size=logits.shape).astype(np.float32) * noise
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("shape,size", [((512, 512), 256), ((493, 461), 256), ((200, 300), 256), ((128, 128), 256),
                                        ((256, 256), 256), ((97, 130), 64)])
@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_restore_labels_is_the_argmax_of_the_resized_probabilities(shape, size, noise):
    """Upsampling, downsampling, no resize, padding to a square in either direction; smooth and noisy outputs."""
    prob = _network_like(np.random.default_rng(size + shape[1]), 6, size, 16, noise)
    full = restore_probabilities(prob, shape).argmax(-1)
    got = restore_labels(prob, shape)
    assert got.shape == (6, *shape) and got.dtype == np.uint8
    assert len(np.unique(full)) == 3  # every class present, boundaries everywhere
    assert (got == full).mean() >= 0.99999, f"{(got != full).sum()} of {full.size} differ"
    mapped = restore_labels(prob, shape, [2, 0, 1])  # a label map, applied in the same pass
    assert np.array_equal(mapped, np.array([2, 0, 1], np.uint8)[got])
    assert np.array_equal(argmax_last(prob), prob.argmax(-1))
    ties = np.zeros((1, 4, 4, 3), np.float32)
    assert argmax_last(ties).max() == 0  # the first of equal maxima, as numpy


def test_spec_rejects_size_not_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        PreprocessSpec(size=100)


def test_inference_path_and_training_path_give_identical_arrays(synth_dirs, tmp_path):
    """The daemon reads a series with dicomio and calls prepare_slices; training goes through the dataset loader
    and the prepared cache, which stores the same array as float16."""
    spec = PreprocessSpec(size=64, bilateral=True)
    ref = list_cases(synth_dirs["dicom"], "dicom")[0]
    split = CaseSplit("t", tuple(prepare([ref], spec, tmp_path, workers=1, progress=False).cases.values()))
    training = split.case_arrays(0)[0]
    files = [f for f in dicom_files(ref.files[0].parent.parent) if "ct" in f.parts[-2]]
    inference = prepare_slices(read_ct_series(files).hu, spec)
    assert training.shape == inference.shape
    assert training.std() > 0 and np.array_equal(training, inference.astype(np.float16).astype(np.float32))
    assert np.abs(training - inference).max() <= 2 ** -11  # float16 keeps 11 bits of a value in [0, 1]


def test_context_stacks_neighbours_foot_to_head_and_repeats_the_edges():
    from livernode.imaging.preprocess import context_index, context_span, stack_context

    assert context_index(5, 0, 5, 1).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    assert context_index(5, 0, 2, 1, reverse=True).tolist() == [[1, 0, 0], [2, 1, 0]]
    assert context_index(3, 1, 2, 0).tolist() == [[1]]
    planes = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 4, 4), np.float32)
    first, last = context_span(6, 2, 4, 2)
    assert (first, last) == (0, 6)
    x = stack_context(planes[first:last], 6, 2, 4, 2, first=first)
    assert x.shape == (2, 4, 4, 5) and x.dtype == np.float32
    assert x[0, 0, 0].tolist() == [0, 1, 2, 3, 4] and x[1, 3, 3].tolist() == [1, 2, 3, 4, 5]
    window = planes[3:6]  # slices 3..5 hold the neighbours of slice 4 only
    assert stack_context(window, 6, 4, 5, 1, first=3)[0, 0, 0].tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="do not hold the neighbours"):
        stack_context(window, 6, 3, 4, 1, first=3)
