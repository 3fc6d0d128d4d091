"""Batches through ONNX Runtime's I/O binding: the network's input and output live on the execution provider's
device in buffers allocated once per slice shape, the host copies each batch in from one page-locked buffer and
takes the result back, and on CUDA the whole run can be replayed as one CUDA graph.

Why: with `session.run` every batch allocates its input on the GPU, copies it from pageable memory, allocates the
output and copies it back; the float input and, for a fused model, the matrices that resize it were sent again
each time. Bound, a fused model's batch is int16 HU in and uint8 labels out, the matrices go to the GPU once, and
a batch shorter than the buffer (the last of a series) is padded so the shapes, and so a captured CUDA graph,
never change.

On the CPU (tests, and a node without a GPU) the same code binds CPU buffers: ONNX Runtime then reads and writes
them in place, which is how its results are compared with `session.run` without a GPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)
CUDART = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
WARM_RUNS = 2  # runs of a new binding before its CUDA graph is captured


def first_library(names: tuple[str, ...], mode: int = os.RTLD_LOCAL):
    """The first of `names` the dynamic loader opens with `mode`, or None."""
    for name in names:
        try:
            return ctypes.CDLL(name, mode=mode)
        except OSError:
            continue
    return None


def _cudart():
    """The CUDA runtime ONNX Runtime's CUDA provider already loaded, or None: RTLD_NOLOAD never loads a second
    copy (a CUDA 12 runtime beside a CUDA 13 build, say)."""
    return first_library(CUDART, os.RTLD_NOLOAD)


def pin(array: np.ndarray, owner: object) -> bool:
    """Page-lock `array` for the GPU's copy engine (cudaHostRegister) until `owner` is collected; False where no
    CUDA runtime can do it (then copies go through pageable memory, as with session.run)."""
    lib = _cudart()
    if lib is None or array.nbytes == 0:
        return False
    ptr = ctypes.c_void_p(array.ctypes.data)
    if lib.cudaHostRegister(ptr, ctypes.c_size_t(array.nbytes), ctypes.c_uint(0)) != 0:
        lib.cudaGetLastError()  # clear this thread's error, or ONNX Runtime's next kernel check would report it
        return False
    # the finalizer holds the array, so its memory stays allocated until it is unregistered
    weakref.finalize(owner, _unpin, lib, ptr, array).atexit = False
    return True


def _unpin(lib, ptr, array: np.ndarray) -> None:
    if lib.cudaHostUnregister(ptr) != 0:
        lib.cudaGetLastError()


@dataclass
class Shape:
    """One binding: the input's per-slice shape and dtype, the output's, and the constant inputs that go with it."""

    slice_in: tuple[int, ...]
    dtype_in: type
    slice_out: tuple[int, ...]
    dtype_out: type
    constants: dict[str, np.ndarray] = field(default_factory=dict)


class Bound:
    """One session's I/O binding for one input shape, `batch` slices at a time, on `device` ('cuda' or 'cpu')."""

    def __init__(self, session, input_name: str, output_name: str, batch: int, shape: Shape, device: str,
                 graph_id: int | None = None) -> None:
        import onnxruntime as ort

        self.session, self.batch, self.device, self.graph_id, self.shape = session, batch, device, graph_id, shape
        self.host_in = np.zeros((batch, *shape.slice_in), shape.dtype_in)
        self.pinned = device == "cuda" and pin(self.host_in, self)
        self.io = session.io_binding()
        self._keep = []  # the OrtValues bound here: ONNX Runtime does not own them
        if device == "cpu":  # ONNX Runtime reads and writes these host arrays in place
            self.dev_in = ort.OrtValue.ortvalue_from_numpy(self.host_in)
            self.host_out = np.zeros((batch, *shape.slice_out), shape.dtype_out)
            self.dev_out = ort.OrtValue.ortvalue_from_numpy(self.host_out)
        else:
            self.dev_in = ort.OrtValue.ortvalue_from_numpy(self.host_in, device, 0)
            self.host_out = None
            self.dev_out = ort.OrtValue.ortvalue_from_shape_and_type((batch, *shape.slice_out), shape.dtype_out,
                                                                     device, 0)
        self.io.bind_ortvalue_input(input_name, self.dev_in)
        for name, value in shape.constants.items():
            v = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0)
            self._keep.append(v)
            self.io.bind_ortvalue_input(name, v)
        self.io.bind_ortvalue_output(output_name, self.dev_out)
        self.options = self.warm_options = ort.RunOptions()
        self.runs = 0
        if graph_id is not None:  # each shape its own CUDA graph; -1: none
            self.options.add_run_config_entry("gpu_graph_id", str(graph_id))
            # ONNX Runtime counts its runs before a capture per session, not per graph: a new size's graph would be
            # captured on its first run, while its memory is still being allocated. WARM_RUNS plain runs first.
            self.warm_options = ort.RunOptions()
            self.warm_options.add_run_config_entry("gpu_graph_id", "-1")

    def __call__(self, part: np.ndarray) -> np.ndarray:
        """Run `part` (at most `batch` slices of the bound shape); returns a new array of its results."""
        n = len(part)
        if n > self.batch or part.shape[1:] != self.host_in.shape[1:]:
            raise ValueError(f"a batch of {part.shape} does not fit the bound {self.host_in.shape}")
        self.host_in[:n] = part
        self.host_in[n:] = 0  # the padding's results are dropped; zeros keep them finite
        if self.device != "cpu":
            self.dev_in.update_inplace(self.host_in)
        self.session.run_with_iobinding(self.io, self.options if self.runs >= WARM_RUNS else self.warm_options)
        self.runs += 1
        if self.device == "cpu":
            return self.host_out[:n].copy()
        return self.dev_out.numpy()[:n]
