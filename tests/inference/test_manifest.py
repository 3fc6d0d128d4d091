"""Manifest schema 2 (how to run the model: dims, context, 3-D patch, spacing and overlap); schema 1 still reads."""

import json

import pytest

from livernode.errors import ManifestError
from livernode.inference.manifest import parse_manifest


def _manifest(version: int = 2, inference: dict | None = None, channels: int = 1, layout: str = "NHWC") -> dict:
    m = {"schema": "livernode-model-manifest", "schema_version": version,
         "input": {"name": "image", "layout": layout, "channels": channels, "preferred_size": 64},
         "output": {"name": "probabilities", "layout": layout, "classes": 3},
         "preprocessing": {"window": {"low": -100, "high": 400}},
         "labels": [{"value": 0, "name": "Background"}, {"value": 1, "name": "Liver"},
                    {"value": 2, "name": "Liver tumour"}],
         "architecture": {"name": "U-Net", "backbone": "plain", "framework": "tf", "opset": 17,
                          "precision": "float32"},
         "training": {}, "test_metrics": {}, "livernode_version": "0.1.0", "created": "2026-12-01",
         "weights_sha256": "0" * 64}
    if inference is not None:
        m["inference"] = inference
    return m


def test_schema_1_means_a_2d_model_fed_one_slice_at_a_time():
    m = parse_manifest(json.dumps(_manifest(1)), "old.onnx")
    assert m.run.dims == 2 and m.run.context == 0 and m.preprocess_spec().channels == 1


def test_schema_2_records_context_and_the_3d_recipe():
    m = parse_manifest(json.dumps(_manifest(2, {"dims": 2, "context": 1}, channels=3)), "k1.onnx")
    assert m.run.context == 1 and m.input.channels == 3
    assert m.preprocess_spec().channels == 1  # each slice is one grey channel; the neighbours are stacked after
    v = parse_manifest(json.dumps(_manifest(2, {"dims": 3, "patch_size": [32, 64, 64],
                                                "target_spacing_mm": [3, 3, 3], "overlap": 0.5},
                                            layout="NDHWC")), "v.onnx")
    assert v.run.dims == 3 and v.run.patch_size == (32, 64, 64) and v.run.target_spacing_mm == (3.0, 3.0, 3.0)
    assert json.loads(v.to_json())["inference"]["overlap"] == 0.5


@pytest.mark.parametrize("version,inference,channels,layout,message", [
    (2, None, 1, "NHWC", "schema 2 needs 'inference'"),
    (1, {"dims": 2}, 1, "NHWC", "schema-2 field"),
    (2, {"dims": 2, "context": 1}, 1, "NHWC", "context 1 means 3 input channels"),
    (2, {"dims": 2, "context": 0}, 5, "NHWC", "takes 1 or 3 channels"),
    (2, {"dims": 3, "patch_size": [32, 64, 64], "target_spacing_mm": [3, 3, 3]}, 1, "NDHWC",
     "needs patch_size, target_spacing_mm and overlap"),
    (2, {"dims": 3, "patch_size": [32, 64, 64], "target_spacing_mm": [3, 3, 3], "overlap": 0.5}, 1, "NHWC",
     "3-D model's input and output are NDHWC"),
    (2, {"dims": 2, "patch_size": [32, 64, 64]}, 1, "NHWC", "belong to 3-D models"),
])
def test_inconsistent_manifests_are_refused_with_the_reason(version, inference, channels, layout, message):
    with pytest.raises(ManifestError, match="bad.onnx: invalid manifest") as err:
        parse_manifest(json.dumps(_manifest(version, inference, channels, layout)), "bad.onnx")
    assert message in str(err.value)
