"""Benchmark part 7: an archive through `livernode batch` against `livernode infer` run once per study.

Phantom studies (one series each) go through `livernode infer` one after the other, a fresh process per study as a
user scripting it today would run them (the peer: the sum of their wall times), then through `livernode batch`
with 1 and with 2 local worker processes (each ONNX Runtime session on one thread, the model loaded once per
worker), and with `--ray local` and 2 actors. The network runs at the size it was trained at (128 px), the size of
the phantoms. Reported: studies per hour of each, the scaling from 1 to 2 workers,
and the seconds per study that going through Ray costs against local processes (Ray's start included, as a user
meets it)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import ENV, PY, log


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {r.stderr[-2000:]}")
    return seconds


def _batch(archive: Path, model: Path, out: Path, *extra: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    seconds = _timed([PY, "-m", "livernode.cli", "batch", str(archive), "--model", str(model), "--out", str(out),
                      *extra])
    with (out / "studies.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != len(list(archive.iterdir())) or any(r["status"] != "done" for r in rows):
        raise RuntimeError(f"{out}: not every study done: {[r['status'] for r in rows]}")
    return seconds


def run(model: Path, work: Path, studies: int = 8, slices: int = 32, size: int = 128) -> dict:
    from livernode.imaging.synth import synthesize

    archive = work / "archive"
    shutil.rmtree(archive, ignore_errors=True)
    synthesize(archive, cases=studies, slices=slices, size=size, seed=5, layout="dicom")
    for seg in archive.rglob("seg.dcm"):  # the phantoms' reference masks are no part of an archive to segment
        seg.unlink()
    infer_s = sum(_timed([PY, "-m", "livernode.cli", "infer", str(case), "--model", str(model), "--out",
                          str(work / "infer" / case.name), "--providers", "cpu"])
                  for case in sorted(archive.iterdir()))
    local1 = _batch(archive, model, work / "batch-1", "--workers", "1")
    local2 = _batch(archive, model, work / "batch-2", "--workers", "2")
    ray2 = _batch(archive, model, work / "batch-ray", "--workers", "2", "--ray", "local")
    per_hour = {k: studies / s * 3600 for k, s in (("infer", infer_s), ("local_1", local1), ("local_2", local2),
                                                     ("ray_2", ray2))}
    log(f"batch: {studies} studies; infer one by one {infer_s:.1f} s, batch 1 worker {local1:.1f} s, "
        f"2 workers {local2:.1f} s, Ray 2 actors {ray2:.1f} s")
    return {"studies": studies, "slices": slices, "size": size, "infer_sum_s": infer_s, "local_1_s": local1,
            "local_2_s": local2, "ray_2_s": ray2, "studies_per_hour": per_hour,
            "scaling_2_vs_1": local1 / local2, "ray_overhead_s_per_study": (ray2 - local2) / studies}
