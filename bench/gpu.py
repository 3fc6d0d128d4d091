"""Benchmark part 6, GPU: the fp16 model on CUDA (and TensorRT when present) with I/O binding.

Slices per second at 512x512 with everything on the device, and achieved TFLOP/s against the card's own matmul
ceiling measured in the same run. Then each way the node can run the network from stored HU to labels on a
500-slice study (VARIANTS: today's session.run path, batches bound on the device with CUDA graphs where ONNX Runtime
allows them, the fused model with preprocessing and restoring in the graph): slices per second, labels against
today's, and today's path and the new default each end to end through the node's pipeline. Runs anywhere: with
`--providers cpu` it exercises the same code on the CPU (small counts), which is how `make bench` keeps it working on
machines without a GPU.

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

from bench.common import at_size, manifest_of, matmul_ceiling, stacked_study  # noqa: E402
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


# Today's path and the new ones, each (name, fused?, Segmenter options). "session.run" is how the node ran a model
# before bound batches: a new input and output allocated and copied per batch, batches of 8 on a GPU.
VARIANTS = (("host path, session.run, batch 8", False, {"bound": False, "cuda_graph": False, "batch_size": 8}),
            ("host path, bound", False, {}),
            ("fused, session.run, batch 8", True, {"bound": False, "cuda_graph": False, "batch_size": 8}),
            ("fused, bound, batch 8", True, {"batch_size": 8}),
            ("fused, bound, no CUDA graph", True, {"cuda_graph": False}),
            ("fused, bound", True, {}))
OLD, NEW = VARIANTS[0][0], VARIANTS[-1][0]


def study(work: Path, slices: int) -> list[Path]:
    from livernode.imaging.synth import synthesize

    synthesize(work / "template", cases=1, slices=20, size=512, seed=3, layout="dicom")
    template = sorted((work / "template" / "case_000" / "ct").glob("*.dcm"))
    return stacked_study(template, slices, work / f"study-{slices}")


def variants(model: Path, providers: str, files: list[Path], work: Path, end_to_end: bool) -> dict:
    """Each way of running the network from stored 512x512 HU to uint8 labels: slices per second (the best of two
    passes over the study after a warm-up batch), the share of voxels whose labels equal today's path's, and (with
    `end_to_end`) today's path and the new default each through the node's whole pipeline on the study."""
    import onnx

    from livernode.daemon.pipeline import process_files
    from livernode.export.fused import fuse
    from livernode.imaging.dicomio import read_ct_series
    from livernode.inference.runner import Segmenter

    plain_model = onnx.load(str(model))
    fused = work / "fused.onnx"
    onnx.save(fuse(plain_model, manifest_of(plain_model, model), str(model)), str(fused))
    hu = np.clip(np.rint(read_ct_series(files).hu), -32768, 32767).astype(np.int16)
    choice = "cpu" if providers == "cpu" else "cuda"
    out: dict = {"slices": len(hu), "rows": {}}
    reference = None
    for name, is_fused, options in VARIANTS:
        row: dict = {}
        out["rows"][name] = row
        try:
            seg = Segmenter(fused if is_fused else model, providers=choice, **options)
            row.update(engine=seg.engine, providers=seg.providers_used, batch=seg.batch_size, bound=seg.bound)
            seg.segment(hu[:seg.batch_size])  # warm-up: kernel choice, CUDA graph capture
            best = float("inf")
            for _ in range(2):
                t = time.perf_counter()
                labels = seg.segment(hu)
                best = min(best, time.perf_counter() - t)
            row["slices_per_s"] = len(hu) / best
            row["host_buffer_page_locked"] = seg.page_locked
            if reference is None:
                reference = labels
            row["agreement_with_today"] = float((labels == reference).mean())
            row["labelled_voxels"] = int((labels > 0).sum())
            if end_to_end and name in (OLD, NEW):
                t = time.perf_counter()
                result = process_files(files, seg, work / f"result-{len(out['rows'])}")
                row["end_to_end_s"] = time.perf_counter() - t
                row["stages_s"] = result.timings
        except Exception as exc:  # one way failing on this machine must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"{name}: {row['error']}", file=sys.stderr)
    out["sizes"] = sizes(fused, choice, hu[:48])
    return out


def sizes(fused: Path, choice: str, hu: np.ndarray) -> list[dict]:
    """The new default on slices cropped to more sizes than get a CUDA graph (runner.GRAPHS): each size's labels
    against the same fused model run with session.run, and the graph id its binding got (-1: none)."""
    from livernode.inference.runner import GRAPHS, Segmenter

    new, old = Segmenter(fused, providers=choice), Segmenter(fused, providers=choice, bound=False, cuda_graph=False)
    rows = []
    for rows_, cols in [(512, 512), (448, 512), (384, 384), (320, 448), (256, 256), (480, 480)][:GRAPHS + 2]:
        part = np.ascontiguousarray(hu[:, :rows_, :cols])
        row: dict = {"shape": [rows_, cols]}
        try:
            got = [new.segment(part) for _ in range(3)]  # warm-up runs, capture, replay
            want = old.segment(part)
            row.update(agreement=float((got[-1] == want).mean()), replays_equal=all(
                np.array_equal(g, got[-1]) for g in got), engine=new.engine,
                graph_id=next((b.graph_id for k, b in new._bound.items() if k[0] == part.shape[1:]), None))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        rows.append(row)
        print(f"slice size {rows_}x{cols}: {row}", flush=True)
    return rows


def pipeline(model: Path, size: int, providers: str, files: list[Path], work: Path) -> dict:
    """Today's path and the new default end to end through the node's pipeline with a trained network (`model`,
    its manifest set to run at `size` px, as bench/pipeline.py does for `make bench`), so that post-processing
    sees a liver, not an untrained network's noise: the better of two runs each, with the stages."""
    import onnx

    from livernode.daemon.pipeline import process_files
    from livernode.daemon.sr_process import SrProcess
    from livernode.export.fused import fuse
    from livernode.inference.runner import Segmenter

    paths = {False: work / f"trained-{size}.onnx", True: work / f"trained-{size}-fused.onnx"}
    plain, manifest, trained_size = at_size(model, size, paths[False])
    onnx.save(fuse(plain, manifest, str(model)), str(paths[True]))
    out: dict = {"size": size, "trained_size": trained_size, "rows": {}}
    for name, is_fused, options in VARIANTS:
        if name not in (OLD, NEW):
            continue
        row: dict = {}
        out["rows"][name] = row
        try:
            seg = Segmenter(paths[is_fused], providers="cpu" if providers == "cpu" else "cuda", **options)
            row.update(engine=seg.engine, batch=seg.batch_size)
            runs = []
            for i in range(2):
                t = time.perf_counter()
                result = process_files(files, seg, work / f"pipeline-{size}-{len(out['rows'])}-{i}")
                runs.append((time.perf_counter() - t, result))
            best, result = min(runs, key=lambda r: r[0])
            row.update(end_to_end_s=best, stages_s=result.timings, liver_ml=result.findings.liver_volume_ml,
                       lesions=len(result.findings.lesions), tumour_ml=result.findings.tumour_volume_ml)
            if name == NEW:  # the same, each SR built in a helper process beside its SEG (inference.sr_process)
                helper = SrProcess()
                try:
                    helper.pid()  # started before the clock, as the node starts it
                    beside = []
                    for i in range(2):
                        t = time.perf_counter()
                        result = process_files(files, seg, work / f"pipeline-{size}-beside-{i}", sr_process=helper)
                        beside.append((time.perf_counter() - t, result))
                finally:
                    helper.stop()
                best, result = min(beside, key=lambda r: r[0])
                row.update(end_to_end_sr_beside_s=best, stages_sr_beside_s=result.timings)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"{name}: {row['error']}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True,
                    help="an fp16 model (make gpu-model: make demo's network, exported --fp16), run at --size px")
    ap.add_argument("--providers", choices=sorted(PROVIDERS), default="auto")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--study-slices", type=int, default=500)
    ap.add_argument("--out", type=Path, default=Path("bench/gpu-results.json"))
    ap.add_argument("--trained", type=Path, help="a trained model (make demo's, exported --fp16): today's path and "
                    "the new default end to end with it, at --trained-size px")
    ap.add_argument("--trained-size", type=int, nargs="+", default=[256])
    a = ap.parse_args(argv)
    sess, used = session(a.model, a.providers)
    device = "cuda" if "CUDAExecutionProvider" in used else "cpu"
    per_s = throughput(sess, a.size, a.batch, a.batches)
    flops = conv_flops(a.model, a.size)
    ceiling = matmul_ceiling(device)
    result = {"providers": used, "size": a.size, "batch": a.batch, "slices_per_s": per_s,
              "model_tflop_per_slice": flops / 1e12, "achieved_tflops": per_s * flops / 1e12,
              "matmul_ceiling_tflops": ceiling / 1e12, "fraction_of_ceiling": per_s * flops / ceiling}
    a.out.write_text(json.dumps(result, indent=1))  # kept if what follows fails
    print(f"providers {','.join(used)}: {per_s:.1f} slices/s at {a.size}x{a.size} (batch {a.batch}, I/O bound on "
          f"{device}); {result['achieved_tflops']:.2f} TFLOP/s of a {result['matmul_ceiling_tflops']:.2f} TFLOP/s "
          f"matmul ceiling ({100 * result['fraction_of_ceiling']:.0f} %)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = study(Path(tmp), a.study_slices)
        model = Path(tmp) / f"model-{a.size}.onnx"
        at_size(a.model, a.size, model)
        result["variants"] = variants(model, a.providers, files, Path(tmp), end_to_end=True)
        a.out.write_text(json.dumps(result, indent=1))
        if a.trained:
            result["trained"] = []
            for size in a.trained_size:
                result["trained"].append(pipeline(a.trained, size, a.providers, files, Path(tmp)))
                a.out.write_text(json.dumps(result, indent=1))
    a.out.write_text(json.dumps(result, indent=1))
    for name, row in result["variants"]["rows"].items():
        if "error" in row:
            print(f"{name}: failed: {row['error'][:300]}")
            continue
        e2e = (f"; {a.study_slices}-slice study end to end {row['end_to_end_s']:.2f} s"
               if "end_to_end_s" in row else "")
        print(f"{name} ({row['engine']}, batch {row['batch']}): {row['slices_per_s']:.1f} slices/s HU to labels, "
              f"labels equal to today's on {100 * row['agreement_with_today']:.3f} % of voxels{e2e}")
    for trained in result.get("trained", []):
        for name, row in trained["rows"].items():
            if "error" in row:
                print(f"trained network, {name}: failed: {row['error'][:300]}")
                continue
            print(f"trained network at {trained['size']} px, {name} ({row['engine']}): {a.study_slices}-slice study "
                  f"end to end {row['end_to_end_s']:.2f} s (" + ", ".join(
                      f"{k} {v:.2f}" for k, v in row["stages_s"].items()) + f"); liver {row['liver_ml']:.0f} mL, "
                  f"{row['lesions']} lesions")
            if "end_to_end_sr_beside_s" in row:
                print(f"  the same, each SR built beside its SEG in a helper process: "
                      f"{row['end_to_end_sr_beside_s']:.2f} s (" + ", ".join(
                          f"{k} {v:.2f}" for k, v in row["stages_sr_beside_s"].items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
