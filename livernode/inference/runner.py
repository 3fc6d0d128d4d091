"""ONNX Runtime session for a livernode model: providers chosen and reported, preprocessing from the manifest."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from livernode.errors import ManifestError
from livernode.imaging.grid import Grid, from_grid, sliding_window, to_grid
from livernode.imaging.orient import CONVENTION, Orientation
from livernode.imaging.preprocess import (context_span, prepare_slices, prepared_spacing, restore_labels,
                                          restore_probabilities,
                                          stack_context)
from livernode.inference.manifest import METADATA_KEY, Manifest, parse_manifest

log = logging.getLogger(__name__)
ProviderChoice = Literal["auto", "cpu", "cuda"]
GRAPHS = 4  # slice shapes that get a CUDA graph (Segmenter._bind)
BINDINGS = 8  # bound shapes without a graph kept at once


def _providers(choice: ProviderChoice, available: list[str]) -> list[str]:
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ManifestError(f"providers = 'cuda' but this ONNX Runtime offers only {available}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _tensorrt_loadable() -> bool:
    """Whether TensorRT's own library loads here. ONNX Runtime's GPU build lists its TensorRT provider whether or not
    TensorRT is installed, and without it each session would first fail, print a banner and build a CUDA session
    that is thrown away."""
    from livernode.inference.bound import first_library

    return first_library(("libnvinfer.so.10", "libnvinfer.so")) is not None


def _attempts(chosen: list[str], available: list[str], cuda_graph: bool,
              tensorrt_cache: Path | None = None) -> list[tuple[str, list]]:
    """The sessions to try, best first, each (what it is, providers with their options). On CUDA: TensorRT where
    this ONNX Runtime has it, its library loads and the caller gives a folder of its own for the engines TensorRT
    builds (the node: its state folder; engines are code, so never a shared temporary folder), at the model's own
    precision; then CUDA with its work captured as CUDA graphs (which ONNX Runtime allows only when every node runs
    on CUDA); then CUDA as it comes. The first that loads with its first provider really in use is kept."""
    plain = ("plain", list(chosen))
    if "CUDAExecutionProvider" not in chosen:
        return [plain]
    out = []
    if tensorrt_cache is not None and "TensorrtExecutionProvider" in available and _tensorrt_loadable():
        out.append(("tensorrt", [("TensorrtExecutionProvider", {"trt_engine_cache_enable": True,
                                                                "trt_engine_cache_path": str(tensorrt_cache)}),
                                 *chosen]))
    if cuda_graph:
        out.append(("cuda graph", [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}),
                                   *[p for p in chosen if p != "CUDAExecutionProvider"]]))
    return [*out, plain]


class Segmenter:
    """One ONNX Runtime session per model. `providers_used` is what the session really runs on."""

    def __init__(self, path: Path, providers: ProviderChoice = "auto", threads: int | None = None,
                 batch_size: int | None = None, cuda_graph: bool = True, bound: bool | None = None,
                 tensorrt_cache: Path | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ManifestError(f"{self.path}: model file not found")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # ONNX Runtime's worker threads otherwise busy-wait after each run, on cores that the node's own stages
        # beside the network need (decoding the next slices, restoring the last batch's labels): on this 2-core
        # machine end to end went from 1.17x and 1.14x of the pure model to 1.13x and 1.12x without the spinning,
        # and the pure model itself did not slow down (bench/pipeline.py's end_to_end, alternated runs).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        chosen = _providers(providers, available)
        self._plain = (opts, chosen)  # what a session without graphs is made of (_without_graphs)
        self.session, self.engine, why = None, "", []
        # a graph session runs bound only, so a caller that asks for unbound runs gets none
        for engine, wanted in _attempts(chosen, available, cuda_graph and bound is not False, tensorrt_cache):
            first = wanted[0][0] if isinstance(wanted[0], tuple) else wanted[0]
            if engine == "tensorrt":
                Path(tensorrt_cache).mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                session = ort.InferenceSession(str(self.path), opts, providers=wanted)
            except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
                why.append(f"{engine}: {exc}")
                continue
            if first in session.get_providers():
                self.session, self.engine = session, engine
                break
            why.append(f"{engine}: ONNX Runtime fell back to {session.get_providers()}")
        if self.session is None:
            raise ManifestError(f"{self.path}: ONNX Runtime cannot load the model ({'; '.join(why)})")
        if why:  # say why a faster session was not kept
            log.info("model %s: %s", self.path.name, "; ".join(w.splitlines()[0][:200] for w in why))
        self.providers_used = self.session.get_providers()
        if providers == "cuda" and "CUDAExecutionProvider" not in self.providers_used:
            raise ManifestError(f"{self.path}: CUDA requested but the session runs on {self.providers_used}")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.manifest: Manifest = parse_manifest(meta.get(METADATA_KEY), str(self.path))
        if self.manifest.preprocessing.orientation != CONVENTION:  # the node can turn slices one way only
            raise ManifestError(f"{self.path}: trained on slices oriented as "
                                f"'{self.manifest.preprocessing.orientation}'; this node feeds {CONVENTION}")
        self.spec = self.manifest.preprocess_spec()
        self.mode = self.manifest.run  # 2-D with `context` neighbours, or 3-D by sliding window
        self.lut = self.manifest.label_lut()  # output channel -> livernode's label; refuses a map it cannot use
        self.input_name = self.session.get_inputs()[0].name
        self.fused = self.manifest.fused is not None  # preprocessing and restoring in the graph: export/fused.py
        self._matrices: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        rank = len(self.session.get_inputs()[0].shape)
        if rank != self.mode.dims + 2 - self.fused:  # a fused model takes (n, rows, cols) HU
            raise ManifestError(f"{self.path}: the manifest says {self.mode.dims}-D but the network's input has "
                                f"{rank} dimensions")
        # On the CPU a batch buys no speed (the benchmark's ms per slice at batch 1 is no worse than at 8) and its
        # activations stay in ONNX Runtime's arena: 200 slices at 256 px peaked at 1541 MiB with 8, 883 with 2.
        # A 3-D patch holds as many voxels as dozens of slices: one at a time.
        gpu = "CUDAExecutionProvider" in self.providers_used
        self.batch_size = batch_size or ((2 if gpu else 1) if self.mode.dims == 3 else (16 if gpu else 2))
        # On a GPU every batch runs bound (bound.py): buffers on the device, one per input shape, and with a CUDA
        # graph session nothing else may run it. On the CPU session.run is as fast; `bound` forces either way.
        self.device = "cuda" if gpu else "cpu"
        self.bound = gpu if bound is None else bound
        # Streamed inference prepares the next batch's input in the reader thread while the network runs where
        # the network does not run on the host's cores: on a GPU the host's time between two runs is the GPU's
        # idle time. On the CPU the network's threads use every core, and the overlap only moves that work into
        # the network's seconds: `make bench` at 3f2b817, where it was on everywhere, put the time beside the
        # network at 1.59 s (1.76 at 781ab37) and end to end at 1.18x the pure model (1.13x), no gain beyond this
        # machine's spread. So on the CPU the network's thread prepares each batch, as before.
        self.prepare_ahead = gpu
        if self.engine == "cuda graph" and not self.bound:
            raise ManifestError(f"{self.path}: a CUDA graph session runs bound only")
        self._bound: dict[tuple, object] = {}  # input shape -> its binding, oldest first
        self._graphs = 0  # CUDA graph ids handed out (ONNX Runtime keeps each graph for the session's life)
        self._lock = threading.Lock()  # a binding's buffers serve one batch at a time
        # seconds spent in the network itself (inside ONNX Runtime's runs), over the session's life: the node
        # reports each series' share (summary.json's network_s), so the work around the model is measured in the
        # same run
        self.network_s, self._network_lock = 0.0, threading.Lock()
        out = self.session.get_outputs()[0]
        self.output_name = out.name
        self.output_dtype = np.float16 if out.type == "tensor(float16)" else np.float32
        log.info("model %s (%s %s) on %s (%s%s)", self.path.name, self.manifest.architecture.name,
                 self.manifest.architecture.backbone, ",".join(self.providers_used), self.engine,
                 f", batches of {self.batch_size} bound" if self.bound else "")

    @property
    def page_locked(self) -> bool:
        """Whether a bound batch's host buffer is page-locked (CUDA only; the figure bench/gpu.py reports)."""
        with self._lock:
            return any(b.pinned for b in self._bound.values())

    def _run_bound(self, part: np.ndarray, constants: dict[str, np.ndarray] | None = None,
                   slice_out: tuple[int, ...] | None = None, dtype_out=None) -> np.ndarray:
        """One batch through the I/O binding for its shape (made on first use: bound.Bound)."""
        from livernode.inference.bound import Shape

        key = (part.shape[1:], part.dtype.str)
        with self._lock:
            runner = self._bound.pop(key, None)
            if runner is not None:
                self._bound[key] = runner  # the most recently used last: spares are let go oldest first
            else:
                runner = self._bind(key, Shape(part.shape[1:], part.dtype.type,
                                               slice_out or (*part.shape[1:-1], len(self.lut)),
                                               dtype_out or self.output_dtype, constants or {}))
            try:
                return runner(part)
            except ValueError:
                raise
            except Exception as exc:  # a graph ONNX Runtime could not capture or replay: once, without graphs
                if self.engine != "cuda graph":
                    raise
                self._without_graphs(exc)
                return self._bind(key, runner.shape)(part)

    def _without_graphs(self, exc: Exception) -> None:
        """Replace a CUDA graph session whose run failed (a node that cannot be captured shows only then) by a
        plain one, for good: the node keeps working, a little slower, and says why."""
        import onnxruntime as ort

        log.warning("model %s: a CUDA graph run failed (%s); running without CUDA graphs from now on",
                    self.path.name, str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        opts, chosen = self._plain
        self._bound.clear()
        self.session = ort.InferenceSession(str(self.path), opts, providers=chosen)
        self.engine, self._graphs = "plain", 0

    def _bind(self, key: tuple, shape) -> object:
        """A new binding for `shape`. A CUDA graph is captured for the first GRAPHS shapes only: ONNX Runtime keeps
        a graph, and the buffers it was captured on, for the session's life, and a node that meets a new slice
        size now and then for months must not grow without end. Later shapes run bound without a graph (id -1),
        and at most BINDINGS of those are kept, the oldest let go first."""
        from livernode.inference.bound import Bound

        graph_id = None
        if self.engine == "cuda graph":
            graph_id, self._graphs = (self._graphs, self._graphs + 1) if self._graphs < GRAPHS else (-1, self._graphs)
        spare = [k for k, b in self._bound.items() if b.graph_id in (None, -1)]
        if len(spare) >= BINDINGS:
            del self._bound[spare[0]]
        runner = self._bound[key] = Bound(self.session, self.input_name, self.output_name, self.batch_size, shape,
                                          self.device, graph_id)
        log.info("model %s: batches of %d x %s bound on %s%s%s", self.path.name, self.batch_size,
                 "x".join(map(str, shape.slice_in)), self.device,
                 f", CUDA graph {graph_id}" if graph_id not in (None, -1) else "",
                 ", host buffer page-locked" if runner.pinned else "")
        return runner

    def run(self, x: np.ndarray) -> np.ndarray:
        """Network input (n, s, s, c) float32 -> softmax probabilities (n, s, s, k); 3-D: patches (n, d, h, w, 1)."""
        if self.fused:
            raise ManifestError(f"{self.path}: a fused model takes HU slices and gives labels (fused_labels)")
        outs = []
        for i in range(0, len(x), self.batch_size):
            with self._network():
                outs.append(self._run_bound(np.ascontiguousarray(x[i:i + self.batch_size], np.float32))
                            if self.bound else self.session.run(None, {self.input_name: x[i:i + self.batch_size]})[0])
        return np.concatenate(outs).astype(np.float32, copy=False)

    @contextlib.contextmanager
    def _network(self):
        """Adds the seconds its body takes to `network_s`."""
        t = time.perf_counter()
        try:
            yield
        finally:
            with self._network_lock:
                self.network_s += time.perf_counter() - t

    def inputs(self, hu: np.ndarray, n: int, start: int, stop: int, first: int,
               orientation: Orientation = Orientation()) -> np.ndarray:
        """Network input of a 2-D model for slices start..stop of an n-slice series, from `hu` holding stored
        slices first..first + len(hu) (with the neighbours the context needs: preprocess.context_span)."""
        x = prepare_slices(orientation.forward(hu).astype(np.float32, copy=False), self.spec)
        if not self.mode.context:
            return x[start - first:stop - first]
        return stack_context(x[..., 0], n, start, stop, self.mode.context, first, orientation.reverse_slices)

    def probabilities(self, hu: np.ndarray, orientation: Orientation = Orientation()) -> np.ndarray:
        """(n, rows, cols) HU -> (n, rows, cols, k) probabilities at the original resolution, for a 2-D model; the
        network sees the slices turned to the convention by `orientation`."""
        if self.mode.dims == 3:
            raise ManifestError(f"{self.path}: a 3-D model gives labels by segment(), not slice probabilities")
        seen_shape = orientation.shape(hu.shape[1:])
        prob = restore_probabilities(self.run(self.inputs(hu, len(hu), 0, len(hu), 0, orientation)), seen_shape)
        return np.ascontiguousarray(orientation.inverse(prob.transpose(3, 0, 1, 2)).transpose(1, 2, 3, 0))

    def fused_labels(self, hu: np.ndarray, orientation: Orientation = Orientation()) -> np.ndarray:
        """A fused model: (n, rows, cols) stored HU -> (n, rows, cols) uint8 labels. The graph windows, resizes,
        runs the network, resizes back and takes the argmax; the host turns the slices to the convention (views)
        and sends int16 (HU that are not integers, which no CT scanner we know of writes, are rounded to 1 HU)."""
        from livernode.export.fused import COLS_IN, COLS_OUT, HU, ROWS_IN, ROWS_OUT, resize_matrices

        seen = orientation.forward(hu)
        shape = seen.shape[1:]
        if shape not in self._matrices:
            self._matrices[shape] = dict(zip((ROWS_IN, COLS_IN, ROWS_OUT, COLS_OUT),
                                             resize_matrices(shape, self.spec.size)))
        mats = self._matrices[shape]
        out = np.empty(seen.shape, np.uint8)
        for i in range(0, len(seen), self.batch_size):
            part = seen[i:i + self.batch_size]
            if part.dtype != np.int16:
                part = np.clip(np.rint(part), -32768, 32767)
            part = np.ascontiguousarray(part, np.int16)
            with self._network():
                out[i:i + len(part)] = (self._run_bound(part, mats, shape, np.uint8) if self.bound
                                        else self.session.run(None, {HU: part, **mats})[0])
        return orientation.inverse(out)

    def labels_of(self, prob: np.ndarray) -> np.ndarray:
        """(..., k) network output -> (...) uint8 labels in livernode's values (the manifest's label map)."""
        return self.lut[prob.argmax(-1)]

    def labels_at(self, prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(n, size, size, k) network output -> (n, rows, cols) uint8 labels in livernode's values at the slices'
        `shape` (preprocess.restore_labels: the argmax of the resized probabilities, mapped in the same pass)."""
        return restore_labels(prob, shape, self.lut.tolist())

    def segment(self, hu: np.ndarray, orientation: Orientation = Orientation(),
                spacing: tuple[float, float, float] | None = None) -> np.ndarray:
        """(n, rows, cols) HU -> (n, rows, cols) uint8 labels. `spacing` (slice step, row, column) mm, as stored:
        a 3-D model needs it."""
        if self.mode.dims == 3:
            return self.segment_volume(hu, orientation, spacing)
        if self.fused:
            return self.fused_labels(hu, orientation)
        seen = orientation.shape(hu.shape[1:])
        prob = self.run(self.inputs(hu, len(hu), 0, len(hu), 0, orientation))
        return np.ascontiguousarray(orientation.inverse(self.labels_at(prob, seen)))

    def segment_volume(self, hu: np.ndarray, orientation: Orientation, spacing: tuple[float, float, float] | None,
                       on_patch: Callable[[int, int], None] | None = None, out: np.ndarray | None = None
                       ) -> np.ndarray:
        """A 3-D model over (n, rows, cols) stored slices: each slice preprocessed as for a 2-D model (window, pad
        to a square, resize), the stack resampled to the model's spacing foot to head, the sliding window with
        Gaussian blending, and the probabilities resampled back to the stored slices a few at a time; uint8
        labels (n, rows, cols), written into `out` when given."""
        if spacing is None:
            raise ManifestError(f"{self.path}: a 3-D model needs the series' voxel spacing")
        n = len(hu)
        seen = orientation.shape(hu.shape[1:])
        size, mode = self.spec.size, self.mode
        grid = Grid((n, size, size), prepared_spacing(seen, orientation.spacing(tuple(spacing)), size),
                    tuple(mode.target_spacing_mm))
        rev = orientation.reverse_slices

        def stored(a: int, b: int) -> slice:  # foot-to-head planes a..b as stored slices
            return slice(n - b, n - a) if rev else slice(a, b)

        def read(a: int, b: int) -> np.ndarray:
            planes = self.inputs(hu[stored(a, b)], b - a, 0, b - a, 0, orientation)[..., 0]
            return planes[::-1] if rev else planes

        volume = to_grid(read, grid)
        prob = sliding_window(volume, tuple(mode.patch_size), mode.overlap, self.run, batch=self.batch_size,
                              on_patch=on_patch)
        del volume
        labels = np.empty(hu.shape, np.uint8) if out is None else out
        for start, p in from_grid(prob, grid, chunk=16):
            lab = orientation.inverse(self.labels_at(p, seen))
            labels[stored(start, start + len(p))] = lab[::-1] if rev else lab
        return labels

    def segment_streamed(self, n: int, shape: tuple[int, int], decode: Callable[[int], np.ndarray],
                         dtype=np.int16, on_batch: Callable[[int, int], None] | None = None,
                         orientation: Orientation = Orientation(),
                         spacing: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decode, infer and restore `n` slices in overlapping stages; returns (HU volume, uint8 labels).

        A reader thread fills the HU volume slice by slice with `decode(i)`, and where `prepare_ahead` (the network
        on a GPU) also prepares each batch's network input as soon as its slices are decoded, at most two batches
        ahead; this thread runs the network on each batch as soon as it is ready (ONNX Runtime releases the GIL),
        preparing it first where the reader did not; a third thread resizes the probabilities back to `shape` and
        keeps only the argmax. So decoding and restoring (and on a GPU preparing) overlap inference, and the float
        probabilities of the whole study are never held at once. `dtype` int16 holds integer HU exactly in half
        the memory of float32.

        `on_batch(done, n)` is called after each batch has run. An exception it raises (the node stopping) ends
        the call between batches: the reader stops and the exception reaches the caller. The network sees each
        slice turned to the convention by `orientation`; the labels come back as the slices are stored.

        A 2.5-D model's batch waits for the neighbours its context needs. A 3-D model decodes the whole series
        first, then runs `segment_volume` (with `spacing`); `on_batch` then counts patches."""
        hu = np.empty((n, *shape), dtype)
        labels = np.empty((n, *shape), np.uint8)
        bs, errors = (self.batch_size if self.mode.dims == 2 else 16), []
        # (start, stop, network input or None), None: done. Bounded only where the reader prepares the inputs:
        # otherwise it decodes the series as fast as it can, as the items are small
        ahead = self.prepare_ahead and not self.fused and self.mode.dims == 2
        ready: queue.Queue = queue.Queue(maxsize=1 if ahead else 0)
        probs: queue.Queue = queue.Queue(maxsize=2)
        cancelled = threading.Event()
        k = self.mode.context

        def prepared(start: int, stop: int) -> np.ndarray:
            """The network input of slices start..stop, with the neighbours its context needs."""
            first, last = context_span(n, start, stop, k)
            return self.inputs(hu[first:last], n, start, stop, first, orientation)

        def hand_on(item) -> bool:
            """Put `item` on `ready` unless the call was cancelled meanwhile (nobody takes it then)."""
            while not cancelled.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def reader() -> None:
            try:
                start = 0
                for first_new in range(0, n, bs):
                    if cancelled.is_set():
                        break
                    have = min(n, first_new + bs)
                    for i in range(first_new, have):
                        hu[i] = decode(i)
                    if self.mode.dims == 3:
                        continue  # the volume first, then the sliding window in the caller's thread
                    # a batch is ready once its slices and the neighbours its context needs are decoded
                    while start < have and (have == n or min(n, start + bs) + k <= have):
                        stop = min(n, start + bs)
                        x = prepared(start, stop) if ahead and not cancelled.is_set() else None
                        if not hand_on((start, stop, x)):
                            return
                        start = stop
            except BaseException as exc:  # handed to the caller below
                errors.append(exc)
            finally:
                hand_on(None)

        seen = orientation.shape(shape)

        def restorer() -> None:
            while (item := probs.get()) is not None:
                start, prob = item
                try:
                    labels[start:start + len(prob)] = orientation.inverse(self.labels_at(prob, seen))
                except BaseException as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=reader, name="decode", daemon=True),
                   threading.Thread(target=restorer, name="restore", daemon=True)]
        for t in threads:
            t.start()
        try:
            while (item := ready.get()) is not None:
                start, stop, x = item
                if self.fused:  # labels straight from the graph: nothing left to restore
                    labels[start:stop] = self.fused_labels(hu[start:stop], orientation)
                else:
                    probs.put((start, self.run(prepared(start, stop) if x is None else x)))
                del x, item
                if on_batch is not None:
                    on_batch(stop, n)
            if self.mode.dims == 3 and not errors and not cancelled.is_set():
                self.segment_volume(hu, orientation, spacing, on_patch=on_batch, out=labels)
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
