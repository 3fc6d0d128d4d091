"""Benchmark part 1, model speed: ONNX Runtime against the same network in Keras (tf.function), in one run.

Figures are ratios against a peer measured in the same run:
- ms per slice at 256 and 512 px, batch 1 and 8: ONNX Runtime vs Keras (speed-up = Keras / ORT);
- achieved GFLOP/s of ORT against a ceiling measured now (a 2048x2048 float32 matmul in ORT, before and after the
  model runs: the better of the two), and Keras's share of the same ceiling, which bounds what any runtime can gain
  over it;
- the model's FLOPs counted from the ONNX graph (Conv and matmul-like nodes; 2 FLOPs per multiply-add);
- ORT's kernel time by operator at 256 px (its own profiler).
The benchmark model is built untrained (speed does not depend on the weights) and exported by the real exporter.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bench.common import best_interleaved, log, matmul_ceiling

ROUNDS = {1: 6, 8: 3}  # each round times ORT once and Keras once, so a burst of noise on the machine hits both
SIZES = (256, 512)


def conv_flops(model_path: Path, size: int) -> float:
    """Multiply-adds x 2 of every Conv in the graph for one size x size slice, from shape inference."""
    import onnx
    from onnx import shape_inference

    m = onnx.load(str(model_path))
    inp = m.graph.input[0].type.tensor_type.shape.dim
    inp[0].dim_value, inp[1].dim_value, inp[2].dim_value = 1, size, size
    m = shape_inference.infer_shapes(m)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.output})
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    total = 0.0
    for node in m.graph.node:
        if node.op_type == "Conv" and node.input[1] in inits and node.output[0] in shapes:
            w = inits[node.input[1]]  # (out, in/groups, kh, kw)
            out = shapes[node.output[0]]  # NCHW inside the converted graph
            if len(out) == 4 and all(out):
                total += 2.0 * out[0] * out[1] * out[2] * out[3] * w[1] * w[2] * w[3]
    return total


def bench_model(onnx_model, out: Path, size: int, fp16: bool = False) -> Path:
    """The network (converted once by the real exporter's `_convert`) saved with a manifest (untrained weights:
    speed does not depend on them), so that `livernode serve` and `livernode infer` can load it; `fp16` stores it
    with float16 weights and float32 input and output, as `livernode export --fp16` does."""
    import copy

    from livernode.export.onnx_export import make_manifest, save_with_manifest, to_float16

    model = copy.deepcopy(onnx_model)  # saving adds the manifest to the model it is given
    model = to_float16(model) if fp16 else model
    pre = {"channels": 1, "size_multiple": 32, "size": size, "window_low": -100.0, "window_high": 400.0,
           "bilateral": False}
    summary = {"architecture": "unet", "backbone": "resnet34", "data": "none (benchmark: untrained weights)",
               "best_epoch": 0, "epochs_run": 0, "train_seconds": 0.0, "test_metrics": {}}
    save_with_manifest(model, make_manifest(model, pre, summary, None, "float16" if fp16 else "float32"), out)
    return out


def run(work: Path) -> dict:
    """Measure; returns the rows, the ceiling and the paths of the benchmark models (256 px fp32, 512 px fp16)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from livernode.training.model import build_model, import_tf

    _, tf = import_tf()
    import onnxruntime as ort

    threads = os.cpu_count() or 1
    tf.keras.utils.set_random_seed(0)  # the same untrained weights every run
    keras_model = build_model("resnet34", 1)
    from livernode.export.onnx_export import _convert

    converted = _convert(keras_model, 1, fp16=False)  # once: tf2onnx takes half a minute here
    path = bench_model(converted, work / "bench-256.onnx", 256)
    fp16 = bench_model(converted, work / "bench-512-fp16.onnx", 512, fp16=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    keras_fn = tf.function(lambda x: keras_model(x, training=False))
    ceiling_before = matmul_ceiling("cpu", threads) / 1e9
    timed = []
    for size in SIZES:
        for batch in (1, 8):
            x = np.random.default_rng(1).random((batch, size, size, 1), np.float32)
            name = sess.get_inputs()[0].name
            t_ort, t_keras = best_interleaved(lambda: sess.run(None, {name: x}),
                                              lambda: keras_fn(tf.constant(x)).numpy(), ROUNDS[batch])
            timed.append((size, batch, t_ort, t_keras))
            log(f"model: {size} px batch {batch}: ORT {1000 * t_ort / batch:.0f} ms/slice, "
                f"Keras {1000 * t_keras / batch:.0f} ms/slice")
    # The ceiling is the hardware's: measured before and after, the better one (noise only ever lowers it).
    ceiling = max(ceiling_before, matmul_ceiling("cpu", threads) / 1e9)
    rows = []
    for size, batch, t_ort, t_keras in timed:
        flops = conv_flops(path, size)
        gflops, keras_gflops = flops * batch / t_ort / 1e9, flops * batch / t_keras / 1e9
        rows.append({"size": size, "batch": batch, "ort_ms_per_slice": 1000 * t_ort / batch,
                     "keras_ms_per_slice": 1000 * t_keras / batch, "speedup_vs_keras": t_keras / t_ort,
                     "model_gflop_per_slice": flops / 1e9, "ort_gflops": gflops,
                     "fraction_of_matmul_ceiling": gflops / ceiling,
                     "keras_fraction_of_matmul_ceiling": keras_gflops / ceiling,
                     # the most any runtime could gain over Keras here: running the convolutions at the ceiling
                     "speedup_limit_at_ceiling": ceiling / keras_gflops})
    return {"threads": threads, "matmul_ceiling_gflops": ceiling, "rows": rows, "model_256": str(path),
            "model_512_fp16": str(fp16), "ort_op_profile_256": op_profile(path, 256, threads, work)}


def op_profile(model: Path, size: int, threads: int, work: Path, runs: int = 5) -> dict[str, float]:
    """Share of ONNX Runtime's kernel time by operator type for one size x size slice (ORT's own profiler)."""
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / "ort-profile")
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).random((1, size, size, 1), np.float32)
    for _ in range(runs):
        sess.run(None, {sess.get_inputs()[0].name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    total = sum(by_op.values()) or 1.0
    return {op: round(t / total, 4) for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])}
