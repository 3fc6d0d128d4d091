"""The manifest: schema-versioned JSON stored in the ONNX model's metadata under `livernode.manifest`.

It holds everything inference needs (input layout, channels, size, window, labels, and how to run the network:
slice by slice, with neighbouring slices, or as a 3-D sliding window) and what a reader needs to trust the model
(architecture, training data, test metrics, version, creation time, weights digest, parity result).

Schema 2 added `inference` (dims, context, and for 3-D the patch, target spacing and overlap) and the NDHWC
layout. A schema-1 manifest has no `inference` and means a 2-D model fed one slice at a time.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from livernode.errors import ManifestError
from livernode.imaging.labels import LABELS
from livernode.imaging.orient import CONVENTION
from livernode.imaging.preprocess import PreprocessSpec
from livernode.imaging.volume import BACKGROUND

METADATA_KEY = "livernode.manifest"
SCHEMA_VERSION = 2


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
    layout: Literal["NHWC", "NDHWC"] = "NHWC"
    dtype: Literal["float32"] = "float32"
    channels: int = Field(ge=1, le=7)
    size_multiple: int = 32
    preferred_size: int  # slices are padded to a square and resized to this before anything else


class OutputSpec(_Frozen):
    name: str
    layout: Literal["NHWC", "NDHWC"] = "NHWC"
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


class Inference(_Frozen):
    """How the node runs the network. dims 2: slice by slice, each with `context` neighbours on each side as
    channels (preprocess.stack_context). dims 3: the preprocessed slices resampled to `target_spacing_mm`
    (slice, row, column) and cut into `patch_size` patches overlapping by `overlap`, blended with Gaussian
    weights (imaging.grid), and resampled back."""

    dims: Literal[2, 3] = 2
    context: int = Field(0, ge=0, le=3)
    patch_size: tuple[int, int, int] | None = None
    target_spacing_mm: tuple[float, float, float] | None = None
    overlap: float | None = Field(None, ge=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> "Inference":
        volumetric = (self.patch_size, self.target_spacing_mm, self.overlap)
        if self.dims == 3:
            if any(v is None for v in volumetric):
                raise ValueError("a 3-D model needs patch_size, target_spacing_mm and overlap")
            if self.context:
                raise ValueError("context applies to 2-D models only")
            if any(p < 1 for p in self.patch_size) or any(t <= 0 for t in self.target_spacing_mm):
                raise ValueError("patch_size and target_spacing_mm must be positive")
        elif any(v is not None for v in volumetric):
            raise ValueError("patch_size, target_spacing_mm and overlap belong to 3-D models (dims 3)")
        return self


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


class Fused(_Frozen):
    """Preprocessing and restoring run inside the graph (`livernode fuse`, export/fused.py): the host sends int16
    HU slices at their stored size with the four resize matrices and receives uint8 labels in livernode's values."""

    input: Literal["hu"] = "hu"
    dtype: Literal["int16"] = "int16"
    output: Literal["labels"] = "labels"


class Manifest(_Frozen):
    schema_: Literal["livernode-model-manifest"] = Field("livernode-model-manifest", alias="schema")
    schema_version: Literal[1, 2] = SCHEMA_VERSION
    input: InputSpec
    output: OutputSpec
    preprocessing: Preprocessing
    inference: Inference | None = None  # schema 2; schema 1 has none and means Inference()
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
    fused: Fused | None = None  # absent: the graph takes the network's float input and gives probabilities

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _runnable(self) -> "Manifest":
        if self.schema_version == 1 and self.inference is not None:
            raise ValueError("'inference' is a schema-2 field")
        if self.schema_version >= 2 and self.inference is None:
            raise ValueError("schema 2 needs 'inference' (dims, context)")
        run = self.run
        layout = "NDHWC" if run.dims == 3 else "NHWC"
        if self.input.layout != layout or self.output.layout != layout:
            raise ValueError(f"a {run.dims}-D model's input and output are {layout}")
        if run.dims == 2 and run.context:
            if self.input.channels != 2 * run.context + 1:
                raise ValueError(f"context {run.context} means {2 * run.context + 1} input channels, not "
                                 f"{self.input.channels}")
        elif run.dims == 3 and self.input.channels != 1:
            raise ValueError("a 3-D model takes one channel")
        elif self.input.channels not in (1, 3):
            raise ValueError(f"a 2-D model without context takes 1 or 3 channels, not {self.input.channels}")
        return self

    @property
    def run(self) -> Inference:
        """How to run the network (schema 1: one slice at a time)."""
        return self.inference or Inference()

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
        """The per-slice preprocessing; with context or in 3-D the slice is one channel, stacked or resampled
        afterwards."""
        grey = self.input.channels if self.run.dims == 2 and not self.run.context else 1
        return PreprocessSpec(window_low=self.preprocessing.window.low, window_high=self.preprocessing.window.high,
                              channels=grey, size=self.input.preferred_size,
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
