"""ONNX Runtime session for a livernode model: providers chosen and reported, preprocessing from the manifest."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from livernode.errors import ManifestError
from livernode.imaging.preprocess import prepare_slices, restore_probabilities
from livernode.inference.manifest import METADATA_KEY, Manifest, parse_manifest

log = logging.getLogger(__name__)
ProviderChoice = Literal["auto", "cpu", "cuda"]


def _providers(choice: ProviderChoice, available: list[str]) -> list[str]:
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ManifestError(f"providers = 'cuda' but this ONNX Runtime offers only {available}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class Segmenter:
    """One ONNX Runtime session per model. `providers_used` is what the session really runs on."""

    def __init__(self, path: Path, providers: ProviderChoice = "auto", threads: int | None = None,
                 batch_size: int = 8) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ManifestError(f"{self.path}: model file not found")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=_providers(
                providers, ort.get_available_providers()))
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise ManifestError(f"{self.path}: ONNX Runtime cannot load the model ({exc})") from None
        self.providers_used = self.session.get_providers()
        if providers == "cuda" and "CUDAExecutionProvider" not in self.providers_used:
            raise ManifestError(f"{self.path}: CUDA requested but the session runs on {self.providers_used}")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.manifest: Manifest = parse_manifest(meta.get(METADATA_KEY), str(self.path))
        self.spec = self.manifest.preprocess_spec()
        self.input_name = self.session.get_inputs()[0].name
        self.batch_size = batch_size
        log.info("model %s (%s %s) on %s", self.path.name, self.manifest.architecture.name,
                 self.manifest.architecture.backbone, ",".join(self.providers_used))

    def run(self, x: np.ndarray) -> np.ndarray:
        """Network input (n, s, s, c) float32 -> softmax probabilities (n, s, s, k)."""
        outs = [self.session.run(None, {self.input_name: x[i : i + self.batch_size]})[0]
                for i in range(0, len(x), self.batch_size)]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def probabilities(self, hu: np.ndarray) -> np.ndarray:
        """(n, rows, cols) HU -> (n, rows, cols, k) probabilities at the original resolution."""
        return restore_probabilities(self.run(prepare_slices(hu, self.spec)), hu.shape[1:])

    def segment(self, hu: np.ndarray) -> np.ndarray:
        """(n, rows, cols) HU -> (n, rows, cols) uint8 labels (argmax)."""
        return self.probabilities(hu).argmax(-1).astype(np.uint8)
