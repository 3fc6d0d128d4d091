"""The manifest: schema-versioned JSON stored in the ONNX model's metadata under `livernode.manifest`.

It holds everything inference needs (input layout, channels, size, window, labels) and what a reader needs to trust
the model (architecture, training data, test metrics, version, creation time, weights digest, parity result).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from livernode.errors import ManifestError
from livernode.imaging.labels import LABELS
from livernode.imaging.orient import CONVENTION
from livernode.imaging.preprocess import PreprocessSpec
from livernode.imaging.volume import BACKGROUND

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
    # What the network learned from: livernode phantoms only, real scans, both, or nothing (a benchmark network).
    # A model that never saw a patient must say so wherever its results go.
    training_data: Literal["phantoms", "real", "mixed", "untrained", "unknown"] = "unknown"
    test_metrics: dict
    parity: Parity | None = None  # absent when not measured
    livernode_version: str
    created: str
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def label_lut(self) -> np.ndarray:
        """Output channel -> livernode's label (0 background, then LABELS' values), from the manifest's label map:
        a channel is the liver or the tumour by its SNOMED property type (by its name when it has none), the
        background by having neither. ManifestError naming a channel that maps to none of these, or a class that
        is missing or doubled."""
        by_code = {li.property_type.value: li.value for li in LABELS}
        by_name = {li.name.lower(): li.value for li in LABELS}
        lut = np.full(self.output.classes, -1, np.int16)
        for label in self.labels:
            if not 0 <= label.value < self.output.classes:
                raise ManifestError(f"label '{label.name}' is output channel {label.value}, but the model has "
                                    f"{self.output.classes}")
            code = label.property_type.value if label.property_type else None
            if code is not None:
                target = by_code.get(code)
            else:
                target = by_name.get(label.name.lower(), BACKGROUND if label.name.lower() == "background" else None)
            if target is None:
                what = f"{label.property_type.scheme} {code} {label.property_type.meaning}" if code else "no code"
                raise ManifestError(f"label '{label.name}' (output channel {label.value}, {what}) is neither liver, "
                                    "liver tumour nor background: this node cannot use the model")
            lut[label.value] = target
        wanted = [BACKGROUND, *by_code.values()]
        if sorted(lut.tolist()) != sorted(wanted):
            raise ManifestError(f"the label map gives channels {lut.tolist()}; it needs background, liver and "
                                "liver tumour once each")
        return lut.astype(np.uint8)

    @property
    def research_use(self) -> str:
        """The statement results of a phantom-trained (or untrained) model carry, or ''."""
        if self.training_data == "phantoms":
            return "research use: trained on synthetic phantoms only"
        if self.training_data == "untrained":
            return "research use: untrained benchmark network"
        return ""

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
