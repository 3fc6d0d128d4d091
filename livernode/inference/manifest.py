"""The manifest: schema-versioned JSON stored in the ONNX model's metadata under `livernode.manifest`.

It holds everything inference needs (input layout, channels, size, window, labels) and what a reader needs to trust
the model (architecture, training data, test metrics, version, creation time, weights digest, parity result).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from livernode.errors import ManifestError
from livernode.imaging.orient import CONVENTION
from livernode.imaging.preprocess import PreprocessSpec

METADATA_KEY = "livernode.manifest"
SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Frozen):
    value: str
    scheme: str
    meaning: str


class Label(_Frozen):
    value: int
    name: str
    category: Code | None = None
    property_type: Code | None = None
    anatomic_region: Code | None = None


class InputSpec(_Frozen):
    name: str
    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["float32"] = "float32"
    channels: Literal[1, 3]
    size_multiple: int = 32
    preferred_size: int


class OutputSpec(_Frozen):
    name: str
    layout: Literal["NHWC"] = "NHWC"
    activation: Literal["softmax"] = "softmax"
    classes: int


class Window(_Frozen):
    low: float
    high: float


class Preprocessing(_Frozen):
    window: Window
    normalisation: str = "clip HU to [low, high], then (HU - low) / (high - low), giving [0, 1]"
    bilateral: bool = False
    resize: str = "pad to a square with the window low value, resize to preferred_size; outputs resized back"
    # Models exported before this field existed were trained on data in this orientation too (phantoms, CHAOS and
    # LiTS in display order), so a manifest without it means the same.
    orientation: str = CONVENTION


class Architecture(_Frozen):
    name: str
    backbone: str
    framework: str
    opset: int
    precision: Literal["float32", "float16"]


class Parity(_Frozen):
    slices: int
    max_abs_diff: float
    argmax_agreement: float
    tolerance: float


class Manifest(_Frozen):
    schema_: Literal["livernode-model-manifest"] = Field("livernode-model-manifest", alias="schema")
    schema_version: Literal[1] = SCHEMA_VERSION
    input: InputSpec
    output: OutputSpec
    preprocessing: Preprocessing
    labels: tuple[Label, ...]
    architecture: Architecture
    training: dict
    test_metrics: dict
    parity: Parity
    livernode_version: str
    created: str
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec(window_low=self.preprocessing.window.low, window_high=self.preprocessing.window.high,
                              channels=self.input.channels, size=self.input.preferred_size,
                              size_multiple=self.input.size_multiple, bilateral=self.preprocessing.bilateral)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=1)


def parse_manifest(text: str | None, source: str) -> Manifest:
    """Validate manifest JSON; ManifestError naming the model file and the first problem."""
    if not text:
        raise ManifestError(f"{source}: no '{METADATA_KEY}' metadata; export the model with `livernode export`")
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ManifestError(f"{source}: invalid manifest at '{where}': {first['msg']}") from None
