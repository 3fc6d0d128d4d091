"""ONNX Runtime session for a livernode model: providers chosen and reported, preprocessing from the manifest."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from livernode.errors import ManifestError
from livernode.imaging.orient import CONVENTION, Orientation
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
                 batch_size: int | None = None) -> None:
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
        if self.manifest.preprocessing.orientation != CONVENTION:  # the node can turn slices one way only
            raise ManifestError(f"{self.path}: trained on slices oriented as "
                                f"'{self.manifest.preprocessing.orientation}'; this node feeds {CONVENTION}")
        self.spec = self.manifest.preprocess_spec()
        self.lut = self.manifest.label_lut()  # output channel -> livernode's label; refuses a map it cannot use
        self.input_name = self.session.get_inputs()[0].name
        # On the CPU a batch buys no speed (the benchmark's ms per slice at batch 1 is no worse than at 8) and its
        # activations stay in ONNX Runtime's arena: 200 slices at 256 px peaked at 1541 MiB with 8, 883 with 2.
        self.batch_size = batch_size or (8 if "CUDAExecutionProvider" in self.providers_used else 2)
        log.info("model %s (%s %s) on %s", self.path.name, self.manifest.architecture.name,
                 self.manifest.architecture.backbone, ",".join(self.providers_used))

    def run(self, x: np.ndarray) -> np.ndarray:
        """Network input (n, s, s, c) float32 -> softmax probabilities (n, s, s, k)."""
        outs = [self.session.run(None, {self.input_name: x[i : i + self.batch_size]})[0]
                for i in range(0, len(x), self.batch_size)]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def probabilities(self, hu: np.ndarray, orientation: Orientation = Orientation()) -> np.ndarray:
        """(n, rows, cols) HU -> (n, rows, cols, k) probabilities at the original resolution; the network sees
        the slices turned to the convention by `orientation`."""
        seen = orientation.forward(hu)
        prob = restore_probabilities(self.run(prepare_slices(seen, self.spec)), seen.shape[1:])
        return np.ascontiguousarray(orientation.inverse(prob.transpose(3, 0, 1, 2)).transpose(1, 2, 3, 0))

    def labels_of(self, prob: np.ndarray) -> np.ndarray:
        """(..., k) network output -> (...) uint8 labels in livernode's values (the manifest's label map)."""
        return self.lut[prob.argmax(-1)]

    def segment(self, hu: np.ndarray, orientation: Orientation = Orientation()) -> np.ndarray:
        """(n, rows, cols) HU -> (n, rows, cols) uint8 labels."""
        return self.labels_of(self.probabilities(hu, orientation))

    def segment_streamed(self, n: int, shape: tuple[int, int], decode: Callable[[int], np.ndarray],
                         dtype=np.int16, on_batch: Callable[[int, int], None] | None = None,
                         orientation: Orientation = Orientation()) -> tuple[np.ndarray, np.ndarray]:
        """Decode, infer and restore `n` slices in overlapping stages; returns (HU volume, uint8 labels).

        A reader thread fills the HU volume slice by slice with `decode(i)`; this thread runs the network on each
        batch as soon as its slices are decoded (ONNX Runtime releases the GIL); a third thread resizes the
        probabilities back to `shape` and keeps only the argmax. So decoding and restoring overlap inference, and
        the float probabilities of the whole study are never held at once. `dtype` int16 holds integer HU exactly
        in half the memory of float32.

        `on_batch(done, n)` is called after each batch has run. An exception it raises (the node stopping) ends
        the call between batches: the reader stops decoding and the exception reaches the caller. The network sees
        each slice turned to the convention by `orientation`; the labels come back as the slices are stored."""
        hu = np.empty((n, *shape), dtype)
        labels = np.empty((n, *shape), np.uint8)
        bs, errors = self.batch_size, []
        decoded: queue.Queue = queue.Queue()
        probs: queue.Queue = queue.Queue(maxsize=2)
        cancelled = threading.Event()

        def reader() -> None:
            try:
                for start in range(0, n, bs):
                    if cancelled.is_set():
                        break
                    for i in range(start, min(n, start + bs)):
                        hu[i] = decode(i)
                    decoded.put(start)
            except BaseException as exc:  # handed to the caller below
                errors.append(exc)
            finally:
                decoded.put(None)

        seen = orientation.shape(shape)

        def restorer() -> None:
            while (item := probs.get()) is not None:
                start, prob = item
                try:
                    labels[start:start + len(prob)] = orientation.inverse(self.labels_of(restore_probabilities(prob, seen)))
                except BaseException as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=reader, name="decode", daemon=True),
                   threading.Thread(target=restorer, name="restore", daemon=True)]
        for t in threads:
            t.start()
        try:
            while (start := decoded.get()) is not None:
                batch = orientation.forward(hu[start:start + bs]).astype(np.float32)
                probs.put((start, self.run(prepare_slices(batch, self.spec))))
                if on_batch is not None:
                    on_batch(min(n, start + bs), n)
        except BaseException:
            cancelled.set()
            raise
        finally:
            probs.put(None)
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return hu, labels
