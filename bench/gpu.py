"""Benchmark part 6, GPU: the fp16 model on CUDA (and TensorRT when present) with I/O binding.

Slices per second at 512x512, the end-to-end pipeline on a 500-slice study, and achieved TFLOP/s against the
card's own matmul ceiling measured in the same run. Then the same network fused (`livernode fuse`: preprocessing
and restoring in the graph) against the host path: slices per second from HU to labels, and both end to end. Runs anywhere: with `--providers cpu` it exercises the same
code on the CPU (small counts), which is how `make bench` keeps it working on machines without a GPU.

    python bench/gpu.py --model bench/work/bench-512-fp16.onnx --out bench/gpu-results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import matmul_ceiling, stacked_study  # noqa: E402
from bench.model_speed import conv_flops  # noqa: E402

PROVIDERS = {"auto": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider"], "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
             "cpu": ["CPUExecutionProvider"]}


def session(model: Path, choice: str):
    import onnxruntime as ort

    wanted = [p for p in PROVIDERS[choice] if p in ort.get_available_providers()]
    if not wanted:
        raise SystemExit(f"none of {PROVIDERS[choice]} is available (have {ort.get_available_providers()})")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    provider_options = [{"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                         "trt_engine_cache_path": tempfile.gettempdir()} if p == "TensorrtExecutionProvider" else {}
                        for p in wanted]
    sess = ort.InferenceSession(str(model), opts, providers=wanted, provider_options=provider_options)
    return sess, sess.get_providers()


def throughput(sess, size: int, batch: int, batches: int) -> float:
    """Slices per second with the input and output bound on the device (no host copies inside the loop)."""
    import onnxruntime as ort

    device = "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
    x = np.random.default_rng(0).random((batch, size, size, 1), np.float32)
    io = sess.io_binding()
    io.bind_ortvalue_input(sess.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x, device, 0))
    io.bind_output(sess.get_outputs()[0].name, device, 0)
    for _ in range(3):  # warm-up: kernel selection, TensorRT engine build
        sess.run_with_iobinding(io)
    io.synchronize_outputs()
    t = time.perf_counter()
    for _ in range(batches):
        sess.run_with_iobinding(io)
    io.synchronize_outputs()
    return batch * batches / (time.perf_counter() - t)


def end_to_end(model: Path, providers: str, slices: int, work: Path) -> dict:
    from livernode.daemon.pipeline import process_files
    from livernode.imaging.synth import synthesize
    from livernode.inference.runner import Segmenter

    synthesize(work / "template", cases=1, slices=20, size=512, seed=3, layout="dicom")
    template = sorted((work / "template" / "case_000" / "ct").glob("*.dcm"))
    files = stacked_study(template, slices, work / f"study-{slices}")
    seg = Segmenter(model, providers="cpu" if providers == "cpu" else "cuda")
    t = time.perf_counter()
    result = process_files(files, seg, work / "result")
    return {"slices": slices, "seconds": time.perf_counter() - t, "stages_s": result.timings,
            "providers": seg.providers_used}


def fused_against_host(model: Path, providers: str, slices: int, work: Path) -> dict:
    """The same network through today's host path (OpenCV before and after) and fused (`livernode fuse`: int16 HU
    in, uint8 labels out): slices per second from stored 512x512 HU to labels, and each end to end on the study."""
    import onnx

    from livernode.daemon.pipeline import process_files
    from livernode.export.fused import fuse
    from livernode.imaging.dicomio import read_ct_series
    from livernode.inference.manifest import METADATA_KEY, parse_manifest
    from livernode.inference.runner import Segmenter

    plain_model = onnx.load(str(model))
    manifest = parse_manifest({p.key: p.value for p in plain_model.metadata_props}.get(METADATA_KEY), str(model))
    fused = work / "fused.onnx"
    onnx.save(fuse(plain_model, manifest, str(model)), str(fused))
    files = sorted((work / f"study-{slices}").glob("*.dcm"))
    hu = np.clip(np.rint(read_ct_series(files).hu), -32768, 32767).astype(np.int16)
    choice = "cpu" if providers == "cpu" else "cuda"
    out: dict = {}
    for name, path in (("host", model), ("fused", fused)):
        seg = Segmenter(path, providers=choice)
        seg.segment(hu[:seg.batch_size])  # warm-up
        t = time.perf_counter()
        labels = seg.segment(hu)
        per_s = len(hu) / (time.perf_counter() - t)
        t = time.perf_counter()
        result = process_files(files, seg, work / f"result-{name}")
        out[name] = {"slices_per_s": per_s, "end_to_end_s": time.perf_counter() - t, "stages_s": result.timings,
                     "providers": seg.providers_used, "labelled_voxels": int((labels > 0).sum())}
        out.setdefault("labels", []).append(labels)
    a, b = out.pop("labels")
    out["agreement"] = float((a == b).mean())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the fp16 benchmark model (bench-512-fp16.onnx)")
    ap.add_argument("--providers", choices=sorted(PROVIDERS), default="auto")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--study-slices", type=int, default=500)
    ap.add_argument("--out", type=Path, default=Path("bench/gpu-results.json"))
    a = ap.parse_args(argv)
    sess, used = session(a.model, a.providers)
    device = "cuda" if "CUDAExecutionProvider" in used else "cpu"
    per_s = throughput(sess, a.size, a.batch, a.batches)
    flops = conv_flops(a.model, a.size)
    ceiling = matmul_ceiling(device)
    with tempfile.TemporaryDirectory() as tmp:
        e2e = end_to_end(a.model, a.providers, a.study_slices, Path(tmp))
        fused = fused_against_host(a.model, a.providers, a.study_slices, Path(tmp))
    result = {"fused_against_host": fused, "providers": used, "size": a.size, "batch": a.batch, "slices_per_s": per_s,
              "model_tflop_per_slice": flops / 1e12, "achieved_tflops": per_s * flops / 1e12,
              "matmul_ceiling_tflops": ceiling / 1e12, "fraction_of_ceiling": per_s * flops / ceiling,
              "end_to_end": e2e}
    a.out.write_text(json.dumps(result, indent=1))
    print(f"providers {','.join(used)}: {per_s:.1f} slices/s at {a.size}x{a.size} (batch {a.batch}, I/O bound on "
          f"{device}); {result['achieved_tflops']:.2f} TFLOP/s of a {result['matmul_ceiling_tflops']:.2f} TFLOP/s "
          f"matmul ceiling ({100 * result['fraction_of_ceiling']:.0f} %); {e2e['slices']}-slice study end to end "
          f"in {e2e['seconds']:.1f} s")
    h, f = fused["host"], fused["fused"]
    print(f"HU to labels, {a.study_slices} slices: host path {h['slices_per_s']:.1f} slices/s, fused "
          f"{f['slices_per_s']:.1f} slices/s (labels equal on {100 * fused['agreement']:.3f} % of voxels); "
          f"end to end {h['end_to_end_s']:.1f} s host path, {f['end_to_end_s']:.1f} s fused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
