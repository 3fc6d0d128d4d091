"""A fused model: the network with its preprocessing and restoring inside the ONNX graph (`livernode fuse`).

The host sends a batch of stored slices as int16 HU at their own size and receives uint8 labels at that size; on a
GPU the float input and the probabilities then never cross to the host. What happens in the graph is what the
host path does with OpenCV (preprocess.prepare_slices, restore_probabilities, Segmenter.labels_of):

    window:   (HU - low) / (high - low), clipped to [0, 1]
    resize:   pad to a square with the window's low value, resize to the network size (area when shrinking,
              linear when growing), and back (linear), then crop
    labels:   argmax over the classes, through the manifest's label map, as uint8

Padding and both resizes are linear maps along rows and along columns, so each is one small matrix per slice shape:
`resize_matrices` builds them by running OpenCV's own resize on the identity, and the graph multiplies (rows
matrix) x slice x (columns matrix). The host computes them once per series shape and sends them beside the HU.
The network's weights are untouched, so the manifest's weight digest stays the same.

2-D models without neighbouring slices as context, one channel and no bilateral filter only: the others keep the
host path.
"""

from __future__ import annotations

import numpy as np

from livernode.errors import ManifestError
from livernode.imaging.preprocess import _square_pad
from livernode.inference.manifest import METADATA_KEY, Fused, Manifest

HU, ROWS_IN, COLS_IN, ROWS_OUT, COLS_OUT, LABELS = "hu", "rows_in", "cols_in", "rows_out", "cols_out", "labels"
PARITY = 0.9999  # the least share of voxels on which `livernode fuse` must give the host path's labels


def resize_matrices(shape: tuple[int, int], size: int) -> tuple[np.ndarray, ...]:
    """(rows_in (size, rows), cols_in (cols, size), rows_out (rows, size), cols_out (size, cols)) float32: a
    windowed slice `w` of `shape` becomes the network's input as rows_in @ w @ cols_in, and a probability plane `p`
    of the network's output becomes rows_out @ p @ cols_out at the slice's shape: the padding to a square, the
    resize and the crop of preprocess.prepare_slices and restore_probabilities."""
    rows, cols = shape
    top, bottom, left, right = _square_pad(shape)
    side = rows + top + bottom
    eye = np.eye(side, dtype=np.float32)
    down = _resize_axis(eye, size, shrink=side > size)  # (size, side)
    up = _resize_axis(np.eye(size, dtype=np.float32), side, shrink=False)  # (side, size)
    rows_in, cols_in = down[:, top:top + rows], down[:, left:left + cols].T
    rows_out, cols_out = up[top:top + rows, :], up[left:left + cols, :].T
    return tuple(np.ascontiguousarray(m, np.float32) for m in (rows_in, cols_in, rows_out, cols_out))


def _resize_axis(eye: np.ndarray, size: int, shrink: bool) -> np.ndarray:
    """The (size, n) matrix of OpenCV's resize from n = len(eye) to `size` along rows, with the interpolation
    preprocess._resize picks for a square image of side n (area when shrinking, else linear): the identity resized
    along its rows only (its width stays n, which OpenCV copies unchanged)."""
    import cv2

    n = len(eye)
    if n == size:
        return eye.copy()
    return cv2.resize(eye, (n, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def fusable(manifest: Manifest) -> str:
    """'' when the model can be fused, else why not."""
    run = manifest.run
    if run.dims != 2:
        return "a 3-D model resamples the whole series on the host"
    if run.context:
        return "a model with neighbouring slices as context stacks them on the host"
    if manifest.input.channels != 1:
        return "a 3-channel model"
    if manifest.preprocessing.bilateral:
        return "the bilateral filter runs on the host"
    if manifest.fused is not None:
        return "the model is fused already"
    return ""


def fuse(model, manifest: Manifest, source: str = "the model"):
    """The fused copy of `model` (an onnx.ModelProto whose manifest is `manifest`, read from `source`), with the
    manifest recording it."""
    import onnx
    from onnx import TensorProto, helper

    why = fusable(manifest)
    if why:
        raise ManifestError(f"{source}: cannot be fused: {why}")
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    g = fused.graph
    image, probs = g.input[0].name, g.output[0].name
    low, high = manifest.preprocessing.window.low, manifest.preprocessing.window.high
    lut = manifest.label_lut().astype(np.uint8)

    def const(name: str, value: np.ndarray):
        return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value, name))

    pre = [
        const("fused_low", np.array(low, np.float32)),
        const("fused_range", np.array(high - low, np.float32)),
        const("fused_zero", np.array(0.0, np.float32)),
        const("fused_one", np.array(1.0, np.float32)),
        const("fused_channel", np.array([3], np.int64)),
        helper.make_node("Cast", [HU], ["fused_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["fused_f", "fused_low"], ["fused_shift"]),
        helper.make_node("Div", ["fused_shift", "fused_range"], ["fused_scaled"]),
        helper.make_node("Clip", ["fused_scaled", "fused_zero", "fused_one"], ["fused_window"]),
        helper.make_node("MatMul", [ROWS_IN, "fused_window"], ["fused_rows"]),  # (s, r) @ (n, r, c) -> (n, s, c)
        helper.make_node("MatMul", ["fused_rows", COLS_IN], ["fused_square"]),  # (n, s, c) @ (c, s) -> (n, s, s)
        helper.make_node("Unsqueeze", ["fused_square", "fused_channel"], [image]),
    ]
    post = [
        const("fused_lut", lut),
        helper.make_node("Transpose", [probs], ["fused_planes"], perm=[0, 3, 1, 2]),  # (n, k, s, s)
        helper.make_node("MatMul", [ROWS_OUT, "fused_planes"], ["fused_back_rows"]),  # (n, k, r, s)
        helper.make_node("MatMul", ["fused_back_rows", COLS_OUT], ["fused_back"]),  # (n, k, r, c)
        helper.make_node("ArgMax", ["fused_back"], ["fused_class"], axis=1, keepdims=0),
        helper.make_node("Gather", ["fused_lut", "fused_class"], [LABELS], axis=0),
    ]
    nodes = pre + list(g.node) + post
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.extend([
        helper.make_tensor_value_info(HU, TensorProto.INT16, ["batch", "rows", "columns"]),
        helper.make_tensor_value_info(ROWS_IN, TensorProto.FLOAT, ["size", "rows"]),
        helper.make_tensor_value_info(COLS_IN, TensorProto.FLOAT, ["columns", "size"]),
        helper.make_tensor_value_info(ROWS_OUT, TensorProto.FLOAT, ["rows", "size"]),
        helper.make_tensor_value_info(COLS_OUT, TensorProto.FLOAT, ["size", "columns"]),
    ])
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(LABELS, TensorProto.UINT8, ["batch", "rows", "columns"])])
    new = manifest.model_copy(update={"fused": Fused()})
    for entry in fused.metadata_props:
        if entry.key == METADATA_KEY:
            entry.value = new.to_json()
    onnx.checker.check_model(fused)
    return fused


def fuse_file(src, dst, parity_slices: int = 16) -> float:
    """`livernode fuse`: write the fused copy of the model file `src` to `dst` and return the share of voxels on
    which it gives the labels of the host path, on a 512^2 phantom of `parity_slices` slices (both on the CPU).
    ManifestError when the model cannot be fused or the share is below 99.99 %."""
    from pathlib import Path

    import onnx

    from livernode.fsutil import replacing
    from livernode.imaging.phantom import make_phantom
    from livernode.inference.manifest import parse_manifest
    from livernode.inference.runner import Segmenter

    src, dst = Path(src), Path(dst)
    plain = Segmenter(src, providers="cpu")
    model = onnx.load(str(src))
    manifest = parse_manifest({p.key: p.value for p in model.metadata_props}.get(METADATA_KEY), str(src))
    fused = fuse(model, manifest, str(src))
    hu = np.clip(np.rint(make_phantom(np.random.default_rng(0), 512, parity_slices).hu), -32768, 32767)
    hu = hu.astype(np.int16)
    with replacing(dst) as tmp:  # checked before it replaces anything: a failed check writes nothing
        onnx.save(fused, str(tmp))
        agreement = float((Segmenter(tmp, providers="cpu").segment(hu) == plain.segment(hu)).mean())
        if agreement < PARITY:
            raise ManifestError(f"{src}: the fused model agrees with the host path on {100 * agreement:.4f} % of "
                                f"voxels only (at least {100 * PARITY:.2f} % needed)")
    return agreement

