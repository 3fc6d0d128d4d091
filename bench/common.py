"""Helpers shared by the benchmark parts: timing, study fixtures, subprocess peers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

ENV = dict(os.environ, TCP_NODELAY="1", TF_CPP_MIN_LOG_LEVEL="3")
REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def storescp(out: Path, port: int, *options: str, aet: str = "PACS") -> subprocess.Popen:
    """dcmtk's storescp as the bench's peer or PACS, writing to `out`, quiet. It has no option for its address,
    so the tests' bind shim is preloaded (tests/loopback.c) and it listens on 127.0.0.1 only."""
    from tests.peers import loopback_env

    return subprocess.Popen(["/usr/bin/storescp", *options, "-aet", aet, "-od", str(out), str(port)],
                            env=loopback_env(ENV), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def best_of(fn, repeats: int, warmup: bool = True) -> float:
    """The fastest of `repeats` runs of fn() in seconds (after one warm-up run)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_interleaved(a, b, rounds: int) -> tuple[float, float]:
    """The fastest run of a() and of b() in seconds over `rounds` rounds of one a() then one b() (after one
    warm-up each): a burst of load on the machine slows both rather than one of the two."""
    a(), b()
    best_a = best_b = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        a()
        best_a = min(best_a, time.perf_counter() - t)
        t = time.perf_counter()
        b()
        best_b = min(best_b, time.perf_counter() - t)
    return best_a, best_b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def log(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def stacked_study(template: list[Path], slices: int, out: Path) -> list[Path]:
    """A study of `slices` slices built by repeating the template's slices along z (new UIDs, contiguous
    positions). Speed and memory depend on the slice count and size, not on the anatomy."""
    out.mkdir(parents=True, exist_ok=True)
    headers = [pydicom.dcmread(p) for p in template]
    step = float(headers[1].ImagePositionPatient[2]) - float(headers[0].ImagePositionPatient[2])
    z0 = float(headers[0].ImagePositionPatient[2])
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(slices):
        ds = headers[i % len(headers)]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z0 + i * step]
        ds.InstanceNumber = i + 1
        path = out / f"CT{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, files: list[Path], parallel: int = 1, called: str = "LIVERNODE") -> float:
    """Send `files` with dcmtk storescu over `parallel` simultaneous associations; seconds until all are done."""
    chunks = [files[i::parallel] for i in range(parallel)]
    t = time.perf_counter()
    procs = [subprocess.Popen(["/usr/bin/storescu", "-aec", called, "127.0.0.1", str(port), *map(str, chunk)],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for chunk in chunks]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(f"storescu failed: {err.decode()[-2000:]}")
    return time.perf_counter() - t


def matmul_ceiling(device: str = "cpu", threads: int | None = None) -> float:
    """FLOP/s of a large matmul in ONNX Runtime on `device`: fp16 8192^2 on CUDA, fp32 2048^2 on the CPU, inputs
    and output bound on the device. The ceiling the model's achieved FLOP/s is compared with."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n, dtype, np_dtype = (8192, TensorProto.FLOAT16, np.float16) if device == "cuda" else \
        (2048, TensorProto.FLOAT, np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                          [helper.make_tensor_value_info("a", dtype, [n, n]),
                           helper.make_tensor_value_info("b", dtype, [n, n])],
                          [helper.make_tensor_value_info("c", dtype, [n, n])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # any ORT reads 8
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    a = ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(0).random((n, n)).astype(np_dtype), device, 0)
    io = sess.io_binding()
    io.bind_ortvalue_input("a", a)
    io.bind_ortvalue_input("b", a)
    io.bind_output("c", device, 0)

    def run() -> None:
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
    return 2 * n**3 / best_of(run, 20 if device == "cuda" else 5)


def manifest_of(proto, source: Path):
    """The manifest inside a loaded ONNX model (`source`: its file, for messages)."""
    from livernode.inference.manifest import METADATA_KEY, parse_manifest

    return parse_manifest({p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY), str(source))


def at_size(model: Path, size: int, out: Path):
    """A copy of `model` written to `out` whose manifest runs it at `size` px (a U-Net runs at any multiple of 32):
    (the copy as loaded, its manifest, the size the model was trained at)."""
    import onnx

    from livernode.inference.manifest import METADATA_KEY

    proto = onnx.load(str(model))
    manifest = manifest_of(proto, model)
    resized = manifest.model_copy(update={"input": manifest.input.model_copy(update={"preferred_size": size})})
    next(p for p in proto.metadata_props if p.key == METADATA_KEY).value = resized.to_json()
    onnx.save(proto, str(out))
    return proto, resized, manifest.input.preferred_size
