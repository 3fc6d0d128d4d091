"""Benchmark parts 3 to 5: the node end to end, memory and scaling.

They run a trained network, because post-processing, SEG and SR depend on what the network outputs (an untrained
one labels nearly every voxel as tumour, which no real model does): the demo's weights from `make demo` or, when it
has not run, the demo's recipe cut to 3 epochs (kept in bench/cache), set to take 256 px input so that the model
costs what a 256 px deployment costs. Trained at 128 px, they find the liver at 256 px less well and report many
small false tumours (liver Dice and lesion count are in results.json): a noisier output than a good model's, so
post-processing is measured on the hard side.

3. End to end: a 200-slice 512x512 study sent by dcmtk storescu to `livernode serve`; seconds from the last
   instance acknowledged to the SEG and SR acknowledged by a dcmtk storescp PACS, split by stage (the node's own
   summary.json). The peer is the pure model: the same slices through the same ONNX session, nothing else.
   Run in the order model, node, node, model (a fresh node each time), and compared as the sums of each. The
   tail (the time beside the network) is the node's time less the quiet period and the seconds its network ran in
   that run (summary.json's network_s).
4. Memory: peak RSS of `livernode infer` on a 600-slice 512x512 study against its int16 volume plus the model,
   for the 2-D network and for a 3-D V-Net (config/compare.toml's recipe, trained once and kept in bench/cache),
   run by sliding window over the resampled study.
5. Scaling: pipeline seconds (summary.json, all stages) for 100, 200 and 400 slices, the network run at the size
   it was trained at (128 px), so that the host's stages, whose cost is what could grow faster than the slice
   count, weigh more in the sum than at 256 px.
6. Coverage pass: on a whole 512x512 study as PACS sends it (`livernode synth --layout study`: two phases, thorax
   and pelvis series, a bone-kernel copy, MIP, MinIP, reformat, localizer, dose screen), the seconds the model's
   coverage pass takes against the seconds of inference on the series it chose (`livernode infer`, summary.json).
   Here the network runs at the size it was trained at: run at 256 px, the 128 px demo network labels some 26 cm²
   of "liver" on every slice above and below the liver, which no usable model does.
7. The fused model against the host path (`fused_speed`)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from bench.common import (ENV, PY, REPO, at_size, best_of, free_port, log, stacked_study, stop, storescp,
                          storescu, wait_port)

QUIET_S = 0.5


def pipeline_model(work: Path, template_dir: Path, size: int = 256,
                   evaluate_it: bool = True) -> tuple[Path, dict]:
    """The demo's trained model with its manifest set to `size` px input, and (with `evaluate_it`) its scores on
    the template case."""
    from livernode.demo import demo_model
    from livernode.training.evaluate import evaluate

    demo = REPO / "demo" / "model.onnx"
    src = demo if demo.is_file() else demo_model(REPO / "bench" / "cache" / "demo-3-epochs", epochs=3)[0]
    out = work / f"trained-{size}.onnx"
    _, _, trained_size = at_size(src, size, out)
    scores = {"trained_size": trained_size, "run_size": size,
              "weights": "make demo" if src == demo else "the demo recipe cut to 3 epochs"}
    if not evaluate_it:
        return out, scores
    report = evaluate(out, template_dir, "dicom", work / f"trained-{size}-evaluation")["summary"]
    scores.update(liver_dice=report["liver"]["dice_global"], tumour_dice=report["tumour"]["dice_global"])
    log(f"pipeline model: weights from {scores['weights']} at {size} px, liver Dice {scores['liver_dice']:.3f} "
        "on the template case")
    return out, scores


def _pure_model_seconds(files: list[Path], model: Path) -> float:
    """The network alone on the study's prepared slices: the same session, batches and threads the node uses."""
    from livernode.imaging.dicomio import read_ct_series
    from livernode.imaging.preprocess import prepare_slices
    from livernode.inference.runner import Segmenter

    seg = Segmenter(model, providers="cpu")
    x = prepare_slices(read_ct_series(files).hu, seg.spec)
    seg.run(x[:8])  # warm-up
    t = time.perf_counter()
    seg.run(x)
    return time.perf_counter() - t


def _pydicom_decode_seconds(files: list[Path]) -> float:
    """Reading and decoding `files` with pydicom, one after the other (the faster of two rounds): the peer of the
    work around the model."""
    import pydicom

    return best_of(lambda: [pydicom.dcmread(f).pixel_array for f in files], 2, warmup=False)


def _failed(state: Path) -> str:
    import sqlite3

    with sqlite3.connect(state / "index.sqlite", timeout=30) as db:
        row = db.execute("SELECT reason FROM studies WHERE state = 'failed'").fetchone()
    return row[0] if row else ""


def node_once(files: list[Path], model: Path, work: Path, sr_process: bool | None = None
              ) -> tuple[float, float, dict, dict]:
    """One study through a freshly started node: (seconds from the last acknowledgement to the SEG and SR at the
    PACS, seconds sending took, its stage timings, its summary.json). `sr_process`: the node's
    `inference.sr_process` (None: its default)."""
    pacs_port, node_port, pacs_out = free_port(), free_port(), work / "e2e-pacs"
    pacs_out.mkdir(parents=True)
    pacs = storescp(pacs_out, pacs_port)
    state = work / "e2e-state"
    config = []
    if sr_process is not None:
        (work / "node.toml").write_text(f"[inference]\nsr_process = {str(sr_process).lower()}\n")
        config = ["--config", str(work / "node.toml")]
    node = subprocess.Popen([PY, "-m", "livernode.cli", "serve", *config, "--model", str(model), "--providers", "cpu",
                             "--state", str(state), "--port", str(node_port), "--bind", "127.0.0.1",
                             "--destination", f"PACS@127.0.0.1:{pacs_port}", "--study-timeout", str(QUIET_S),
                             "--metrics-port", "0"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(pacs_port, pacs)
        wait_port(node_port, node)
        send_s = storescu(node_port, files)
        acked = time.perf_counter()  # storescu exits right after the last response and the release
        while len(list(pacs_out.iterdir())) < 2:
            if time.perf_counter() - acked > 600 or node.poll() is not None or _failed(state):
                raise RuntimeError(f"no SEG and SR at the PACS: {_failed(state) or 'see livernode status'}")
            time.sleep(0.02)
        e2e = time.perf_counter() - acked
    finally:
        stop(node)
        stop(pacs)
    summary = json.loads(next(state.rglob("summary.json")).read_text())
    return e2e, send_s, summary["timings_s"], summary


def end_to_end(files: list[Path], model: Path, work: Path) -> dict:
    """The node against the pure model, in the order pure, node, node, pure: this machine's speed drifts by a
    fifth within minutes (shared hosts), and the symmetric order cancels a steady drift, where one node run
    against a later best-of-two model run did not."""
    model_runs = [_pure_model_seconds(files, model)]
    nodes = [node_once(files, model, work / f"e2e-{k}") for k in (1, 2)]
    model_runs.append(_pure_model_seconds(files, model))
    e2e = [n[0] for n in nodes]
    model_s, node_s = sum(model_runs) / 2, sum(e2e) / 2
    decode_s = _pydicom_decode_seconds(files)
    # Everything but the network's own compute and the quiet period, the network's seconds as the node measured
    # them in the same run (summary.json's network_s): the pure model's runs differ by up to a sixth from one
    # another, which made the difference node - pure model swing by seconds. That difference is kept beside it.
    tails = [e - QUIET_S - n[3]["network_s"] for e, n in zip(e2e, nodes)]
    tail_s = sum(tails) / 2
    subtracted = node_s - QUIET_S - model_s
    stages = {k: round(sum(n[2].get(k, 0.0) for n in nodes) / 2, 3) for k in nodes[0][2]}
    # of the tail, what comes before post-processing: the infer stage less the network's own seconds, with
    # selection and loading
    beyond = stages.get("infer", 0.0) - sum(n[3]["network_s"] for n in nodes) / 2
    before = {"select": stages.get("select", 0.0), "load": stages.get("load", 0.0), "infer_beyond_network": beyond}
    summary = nodes[-1][3]
    log(f"end to end: {node_s:.2f} s after the last ack (runs {', '.join(f'{x:.2f}' for x in e2e)}); pure model "
        f"{model_s:.2f} s (runs {', '.join(f'{x:.2f}' for x in model_runs)}); the rest {tail_s:.2f} s (runs "
        f"{', '.join(f'{x:.2f}' for x in tails)}; {subtracted:.2f} s by the pure model) against {decode_s:.2f} s of "
        "pydicom reading the files")
    return {"slices": len(files), "send_s": sum(n[1] for n in nodes) / 2, "last_ack_to_pacs_s": node_s,
            "runs_s": e2e, "pure_model_runs_s": model_runs, "quiet_period_s": QUIET_S, "stages_s": stages,
            "pure_model_s": model_s, "overhead": node_s / model_s, "non_model_s": tail_s, "non_model_runs_s": tails,
            "network_runs_s": [n[3]["network_s"] for n in nodes], "non_model_by_subtraction_s": subtracted,
            "pydicom_decode_s": decode_s, "non_model_vs_decode": tail_s / decode_s,
            "before_postprocess_s": before,
            "lesions_found": summary["lesion_count"], "liver_ml": summary.get("liver_volume_ml")}


def _infer(files_dir: Path, model: Path, out: Path) -> tuple[float, dict]:
    """`livernode infer` in a fresh process under a tiny parent that reports the child's peak RSS (KiB)."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)")
    r = subprocess.run([PY, "-c", probe, PY, "-m", "livernode.cli", "infer", str(files_dir), "--model", str(model),
                        "--out", str(out), "--providers", "cpu"], env=ENV, capture_output=True, text=True)
    peak_kib = int(r.stdout.strip().splitlines()[-1])
    if peak_kib < 0:
        raise RuntimeError(f"livernode infer failed: {r.stderr[-2000:]}")
    return peak_kib * 1024, json.loads((out / "summary.json").read_text())["timings_s"]


def memory(template: list[Path], model: Path, work: Path, slices: int = 600, label: str = "") -> dict:
    """Peak RSS of `livernode infer` with `model` on a `slices`-slice 512x512 study against its int16 volume."""
    files = stacked_study(template, slices, work / f"study-{slices}")
    peak, stages = _infer(files[0].parent, model, work / f"infer{label}-{slices}")
    volume = slices * 512 * 512 * 2
    model_bytes = model.stat().st_size
    log(f"memory{label}: {slices} slices, peak RSS {peak / 2**20:.0f} MiB")
    return {"slices": slices, "peak_rss_bytes": peak, "int16_volume_bytes": volume, "model_bytes": model_bytes,
            "ratio_to_volume_plus_model": (peak - model_bytes) / volume, "pipeline_s": sum(stages.values()),
            "stages_s": stages}


def vnet_model(work: Path) -> tuple[Path, dict]:
    """A V-Net trained by config/compare.toml's recipe cut to 2 epochs and scored on one held-out phantom, on the
    demo's training phantoms (kept in bench/cache): an untrained network labels nearly every voxel, and
    post-processing and the SEG of such an output would be measured instead of the 3-D path. In the bench at
    f1f7dfe the whole recipe (5 epochs, 4 test phantoms) took 7.9 of 24.7 minutes; its validation liver Dice was
    0.77 after epoch 2 and 0.84 after epoch 5."""
    from livernode.config import load_training_config
    from livernode.export.onnx_export import export_run
    from livernode.imaging.synth import synthesize
    from livernode.training.train import train

    cache = REPO / "bench" / "cache" / "vnet-2-epochs"
    model, run = cache / "model.onnx", cache / "run"
    if not model.is_file():
        # the demo's training phantoms (16 of 48 x 128^2, seed 0), from `make demo` or the bench's 3-epoch run
        found = [d for d in (REPO / "demo" / "phantoms-train",
                             REPO / "bench" / "cache" / "demo-3-epochs" / "phantoms-train") if d.is_dir()]
        phantoms = found[0] if found else cache / "phantoms"
        if not found and not phantoms.is_dir():
            synthesize(phantoms, cases=16, slices=48, size=128, seed=0, layout="dicom")
        cfg = load_training_config(REPO / "config" / "compare.toml",
                                   {"model.arch": "vnet", "train.epochs": 2, "split.test": 0.05})
        train(phantoms, "dicom", run, cfg, cache=cache / "prepared", progress=False)
        export_run(run, model)
    summary = json.loads((run / "run.json").read_text())
    return model, {"test_dice_liver": summary["test_metrics"]["dice_liver"], "volume": summary["volume"]}


def memory_3d(template: list[Path], work: Path, slices: int = 600) -> dict:
    """The memory row for a 3-D model: the V-Net of `vnet_model`, sliding over the resampled study."""
    model, trained = vnet_model(work)
    return {**memory(template, model, work, slices, label="-3d"), "spacing_mm": trained["volume"]["spacing_mm"],
            "patch": trained["volume"]["patch"], "test_dice_liver": trained["test_dice_liver"]}


def scaling(template: list[Path], model: Path, work: Path, counts=(100, 200, 400)) -> list[dict]:
    rows = []
    for n in counts:
        files = stacked_study(template, n, work / f"scale-{n}")
        _, stages = _infer(files[0].parent, model, work / f"scale-out-{n}")
        total = sum(stages.values())
        rows.append({"slices": n, "pipeline_s": total, "ms_per_slice": 1000 * total / n, "stages_s": stages})
        log(f"scaling: {n} slices in {total:.1f} s")
    per_slice = np.array([r["ms_per_slice"] for r in rows])
    for r in rows:
        r["per_slice_vs_smallest"] = r["ms_per_slice"] / per_slice[0]
    return rows


def coverage_cost(model: Path, work: Path, size: int = 512) -> dict:
    from livernode.imaging.synth_study import abdomen_study

    folder = work / "whole-study"
    series = abdomen_study(folder, seed=5, size=size, slices=260)
    _, stages = _infer(folder, model, work / "whole-study-out")
    summary = json.loads((work / "whole-study-out" / "summary.json").read_text())
    chosen = next(d for d in summary["series"]["decisions"] if d["chosen"])
    log(f"coverage pass: {stages['coverage']:.2f} s against {stages['infer']:.2f} s of inference")
    return {"series": len(series), "files": sum(len(v) for v in series.values()), "chosen": chosen["description"],
            "chosen_slices": chosen["images"], "coverage_s": stages["coverage"], "infer_s": stages["infer"],
            "ratio": stages["coverage"] / stages["infer"], "stages_s": stages}


def fused_speed(files: list[Path], model: Path, work: Path, slices: int = 32) -> dict:
    """7. The fused model (`livernode fuse`: window, pad, resize, argmax and label map inside the ONNX graph)
    against today's host path (OpenCV before and after the same network), on the CPU: ms per 512x512 slice from
    stored HU to uint8 labels, the better of two runs each, and the share of voxels on which they agree."""
    from livernode.export.fused import fuse_file
    from livernode.imaging.dicomio import read_ct_series
    from livernode.inference.runner import Segmenter

    fused = work / "fused.onnx"
    fuse_file(model, fused)
    hu = np.clip(np.rint(read_ct_series(files[:slices]).hu), -32768, 32767).astype(np.int16)
    plain, fast = Segmenter(model, providers="cpu"), Segmenter(fused, providers="cpu")
    plain.segment(hu[:4]), fast.segment(hu[:4])  # warm-up, both
    host_s = best_of(lambda: plain.segment(hu), 2, warmup=False)
    fused_s = best_of(lambda: fast.segment(hu), 2, warmup=False)
    want, got = plain.segment(hu), fast.segment(hu)
    return {"slices": len(hu), "host_ms_per_slice": 1000 * host_s / len(hu),
            "fused_ms_per_slice": 1000 * fused_s / len(hu), "agreement": float((want == got).mean()),
            "liver_voxels": int((want > 0).sum())}
