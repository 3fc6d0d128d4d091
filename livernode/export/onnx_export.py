"""`livernode export`: best checkpoint -> ONNX (opset 17, dynamic batch/height/width) + manifest + parity."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livernode import __version__
from livernode.errors import ExportError, MissingExtra
from livernode.fsutil import replacing, write_json
from livernode.imaging.labels import LABELS
from livernode.inference.manifest import METADATA_KEY, Manifest, Parity

log = logging.getLogger(__name__)
OPSET = 17
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
MIN_AGREEMENT = {"float32": 0.9999, "float16": 0.999}
DIM_NAMES = {2: ("batch", "height", "width"), 3: ("batch", "depth", "height", "width")}


@dataclass(frozen=True)
class ParityResult:
    slices: int
    max_abs_diff: float
    agreement: float
    tolerance: float
    min_agreement: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.agreement >= self.min_agreement


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: Manifest
    parity: ParityResult


def weights_sha256(model) -> str:
    """sha256 over the initializers' names and raw bytes, in graph order (recomputable from the file)."""
    from onnx import numpy_helper

    h = hashlib.sha256()
    for init in model.graph.initializer:
        h.update(init.name.encode())
        h.update(np.ascontiguousarray(numpy_helper.to_array(init)).tobytes())
    return h.hexdigest()


def _tidy_graph(model, dims: int = 2) -> None:
    """Readable dynamic dimension names, and no deprecated Resize mode.

    tf2onnx writes nearest-neighbour upsampling with coordinate mode `tf_half_pixel_for_nn`, which ONNX Runtime
    warns is deprecated. For integer scale factors with floor rounding, floor((x + 0.5) / s) == floor(x / s), so
    `asymmetric` gives the same pixels; the parity check confirms it on real slices.
    """
    for vi in list(model.graph.input) + list(model.graph.output):
        shape = vi.type.tensor_type.shape.dim
        for d, name in zip(shape[:dims + 1], DIM_NAMES[dims]):
            if not d.HasField("dim_value"):
                d.dim_param = name
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        attrs = {a.name: a for a in node.attribute}
        mode = attrs.get("coordinate_transformation_mode")
        if mode is not None and mode.s == b"tf_half_pixel_for_nn":
            if attrs.get("mode") is None or attrs["mode"].s != b"nearest":
                raise ExportError(f"Resize node {node.name}: deprecated mode on a non-nearest resize")
            mode.s = b"asymmetric"
            if "nearest_mode" in attrs:
                attrs["nearest_mode"].s = b"floor"


def _convert(keras_model, channels: int, fp16: bool, dims: int = 2):
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None,) * (dims + 1) + (channels,), tf.float32, name="image"),)
    model, _ = tf2onnx.convert.from_keras(keras_model, input_signature=spec, opset=OPSET)
    _tidy_graph(model, dims)
    return to_float16(model) if fp16 else model


def to_float16(model):
    """`model` with float16 weights and activations, its input and output left float32."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise MissingExtra("--fp16 needs onnxconverter-common: install the 'train' extra") from None
    with warnings.catch_warnings():
        # it warns once per weight below fp16's smallest normal value; those are expected and harmless here,
        # and the parity check measures the effect that matters
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(model, keep_io_types=True)


def parity(keras_model, onnx_bytes: bytes, x: np.ndarray, precision: str) -> ParityResult:
    """Compare Keras and ONNX Runtime probabilities on the same slices (3-D models: patches)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    ref, got = [], []
    for i in range(0, len(x), 16):
        ref.append(keras_model.predict_on_batch(x[i : i + 16]))
        got.append(sess.run(None, {name: x[i : i + 16]})[0])
    ref_a, got_a = np.concatenate(ref), np.concatenate(got)
    diff = float(np.abs(ref_a - got_a).max())
    agree = float((ref_a.argmax(-1) == got_a.argmax(-1)).mean())
    return ParityResult(len(x), diff, agree, TOLERANCE[precision], MIN_AGREEMENT[precision])


def export_run(run: Path, out: Path, *, fp16: bool = False) -> ExportResult:
    """Export `run`'s best checkpoint to `out`. ExportError (non-zero exit) when parity fails."""
    from livernode.training.model import as_float32, import_tf, load_model
    from livernode.training.train import CHECKPOINT, PARITY_SAMPLE

    import_tf()
    try:
        import onnx  # noqa: F401 - checked here for a clear message
    except ImportError:
        raise MissingExtra("export needs onnx and tf2onnx: install the 'train' extra") from None
    run = Path(run)
    for needed in (CHECKPOINT, "run.json", PARITY_SAMPLE):
        if not (run / needed).exists():
            raise ExportError(f"{run}: missing {needed}; is this a finished `livernode train` run folder?")
    summary = json.loads((run / "run.json").read_text())
    pre = summary["preprocess"]
    keras_model = as_float32(load_model(run / CHECKPOINT))  # a mixed-precision run exports float32 too
    precision = "float16" if fp16 else "float32"
    run_spec = inference_spec(summary)
    model = _convert(keras_model, input_channels(summary), fp16, run_spec["dims"])
    x = np.load(run / PARITY_SAMPLE)["x"]
    result = parity(keras_model, model.SerializeToString(), x, precision)
    unit = "patches" if run_spec["dims"] == 3 else "slices"
    print(f"parity on {result.slices} validation {unit}: max |keras - onnx| = {result.max_abs_diff:.3e} "
          f"(limit {result.tolerance:g}), argmax agreement {100 * result.agreement:.4f} % "
          f"(limit {100 * result.min_agreement:g} %)")
    if not result.ok:
        raise ExportError(f"{run}: ONNX model disagrees with Keras (max diff {result.max_abs_diff:.3e}, "
                          f"agreement {100 * result.agreement:.4f} %); not written")
    manifest = make_manifest(model, pre, summary, result, precision)
    save_with_manifest(model, manifest, Path(out))
    write_json(run / "parity.json", result.__dict__, indent=1)
    return ExportResult(Path(out), manifest, result)


def input_channels(summary: dict) -> int:
    """The network's input channels as run.json records them (runs from before 2.5-D: the preprocessing's)."""
    return int(summary.get("input_channels", summary["preprocess"]["channels"]))


def inference_spec(summary: dict) -> dict:
    """The manifest's `inference` section from run.json (runs from before schema 2: a 2-D model, no context)."""
    spec = {"dims": int(summary.get("dims", 2)), "context": int(summary.get("context", 0))}
    if spec["dims"] == 3:
        vol = summary["volume"]
        spec.update(patch_size=vol["patch"], target_spacing_mm=vol["spacing_mm"], overlap=vol["overlap"])
    return spec


def make_manifest(model, pre: dict, summary: dict, result: ParityResult | None, precision: str) -> Manifest:
    """Everything inference needs, from the run's preprocessing settings and summary and the parity check (None:
    not measured, and the manifest says nothing about parity)."""
    from importlib.metadata import version

    data = summary["data"] if isinstance(summary["data"], dict) else {}
    synthetic, real = data.get("synthetic_cases"), data.get("real_cases")
    if summary.get("epochs_run", 0) == 0:
        trained_on = "untrained"
    elif synthetic is None or real is None:
        trained_on = "unknown"  # a run from before cases were told apart
    else:
        trained_on = "phantoms" if not real else "real" if not synthetic else "mixed"
    run = inference_spec(summary)
    layout = "NDHWC" if run["dims"] == 3 else "NHWC"
    return Manifest(
        input={"name": model.graph.input[0].name, "layout": layout, "channels": input_channels({**summary, "preprocess": pre}),
               "size_multiple": pre["size_multiple"], "preferred_size": pre["size"]},
        output={"name": model.graph.output[0].name, "layout": layout, "classes": 3},
        inference=run,
        preprocessing={"window": {"low": pre["window_low"], "high": pre["window_high"]}, "bilateral": pre["bilateral"]},
        labels=[{"value": 0, "name": "Background"}] + [
            {"value": li.value, "name": li.name, "category": li.category.__dict__,
             "property_type": li.property_type.__dict__,
             "anatomic_region": li.anatomic_region.__dict__ if li.anatomic_region else None} for li in LABELS],
        architecture={"name": summary["architecture"], "backbone": summary["backbone"],
                      "framework": ", ".join(f"{p} {version(p)}" for p in ("segmentation-models", "tf_keras",
                                                                             "tensorflow", "tf2onnx")),
                      "opset": OPSET, "precision": precision},
        training={"data": summary["data"], "best_epoch": summary["best_epoch"],
                  "epochs_run": summary["epochs_run"], "train_seconds": summary["train_seconds"]},
        test_metrics=summary["test_metrics"],
        training_data=trained_on,
        parity=None if result is None else Parity(slices=result.slices, max_abs_diff=result.max_abs_diff,
                                                  argmax_agreement=result.agreement, tolerance=result.tolerance),
        livernode_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        weights_sha256=weights_sha256(model),
    )


def save_with_manifest(model, manifest: Manifest, out: Path) -> None:
    """Embed the manifest, check the graph and write `out` atomically."""
    import onnx

    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, manifest.to_json()
    model.producer_name, model.producer_version = "livernode", __version__
    onnx.checker.check_model(model)
    with replacing(out) as tmp:
        onnx.save(model, str(tmp))

