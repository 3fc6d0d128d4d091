"""`make bench-train`: does training scale to LiTS on this machine? Every figure is measured here, in this run:

1. peak RSS of `livernode train` (one short epoch, cache ready) on 8 and on 48 phantom cases of 512x512 source
   slices at 256 px: the ratio must be at most 1.15 (memory flat in the number of cases);
2. the input pipeline alone (batches of 8 with augmentation, no model) against the model's own training steps at
   256 and 512 px: at least 3x, and with how many pipeline workers;
3. cache preparation in slices per second, and a second run's time to its first training step against the
   first run's (which prepares the cache);
4. a projection of LiTS (58,600 slices) at 256 and 512 px from these figures: cache size on disk, peak training
   memory and epoch time on this CPU.

Writes bench/train_results.json and prints a table."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ENV, PY, REPO, log  # noqa: E402

WORK = REPO / "bench" / "work" / "train"
LITS_SLICES = 58_600
SLICES, SOURCE = 24, 512
BATCH = 8


def _cli(*args) -> list[str]:
    return [PY, "-m", "livernode.cli", *map(str, args)]


def _peak_rss_run(cmd: list[str], env: dict) -> tuple[float, str, float]:
    """Run cmd; (peak resident MiB of its main process from /proc VmHWM, its output, seconds)."""
    t0 = time.monotonic()
    logf = WORK / "last.log"
    with logf.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        peak = 0
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                pass
            time.sleep(0.1)
    out = logf.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return peak / 1024, out, time.monotonic() - t0


def _first_step(out: str) -> float:
    return float(re.search(r"first training step done ([0-9.]+) s after the start", out).group(1))


def datasets() -> tuple[Path, Path]:
    """48 phantom cases of 512x512 slices (LiTS layout), and a folder with the first 8 of them."""
    many, few = WORK / "cases48", WORK / "cases8"
    if not (many / "done").exists():
        shutil.rmtree(many, ignore_errors=True)
        subprocess.run(_cli("synth", many, "--cases", 48, "--slices", SLICES, "--size", SOURCE, "--seed", 5,
                            "--layout", "lits"), check=True, env=ENV)
        (many / "done").write_text("")
    shutil.rmtree(few, ignore_errors=True)
    few.mkdir(parents=True)
    for i in range(8):
        for kind in ("volume", "segmentation"):
            os.symlink(many / f"{kind}-{i}.nii.gz", few / f"{kind}-{i}.nii.gz")
    return few, many


def memory_and_cache(few: Path, many: Path) -> dict:
    cache = WORK / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(ENV, LIVERNODE_CACHE=str(cache))
    config = WORK / "bench.toml"  # 3 validation and 3 test cases of the 48: the bench measures training, not scoring
    config.write_text("[split]\nvalidation = 0.05\ntest = 0.05\n")
    train = ("train", "--format", "lits", "--size", 256, "--epochs", 1, "--steps-per-epoch", 3, "--config", config)
    # first run on 48 cases prepares the cache (cold); the second finds it ready
    t0 = time.monotonic()
    _, cold_out, _ = _peak_rss_run(_cli(*train, "--data", many, "--out", WORK / "run-cold"), env)
    log(f"  cold run: {time.monotonic() - t0:.0f} s")
    prep = re.search(r"preparing 48 of 48 cases", cold_out)
    assert prep, cold_out[-2000:]
    prepare_s = _prepare_seconds(cold_out)
    results = {"prepare_slices_per_s": 48 * SLICES / prepare_s, "prepare_seconds": prepare_s,
               "first_step_cold_s": _first_step(cold_out)}
    rss = {}
    for name, data in (("8", few), ("48", many)):
        peak, out, secs = _peak_rss_run(_cli(*train, "--data", data, "--out", WORK / f"run-{name}"), env)
        rss[name] = peak
        log(f"  {name} cases: peak RSS {peak:.0f} MiB, {secs:.0f} s")
        if name == "48":
            results["first_step_warm_s"] = _first_step(out)
    sizes = [json.loads(p.read_text())["slices"] for p in cache.glob("*/case.json")]
    nbytes = sum(f.stat().st_size for f in cache.glob("*/*.npy"))
    results.update(peak_rss_mib_8=rss["8"], peak_rss_mib_48=rss["48"], rss_ratio=rss["48"] / rss["8"],
                   cache_bytes_per_slice_256=nbytes / sum(sizes), cache_slices=sum(sizes),
                   first_step_ratio=results["first_step_warm_s"] / results["first_step_cold_s"])
    return results


def _prepare_seconds(out: str) -> float:
    """Seconds the cache preparation took, from its log line."""
    return float(re.search(r"prepared 48 cases \(\d+ slices\) in ([0-9.]+) s", out).group(1))


def pipeline_and_model() -> dict:
    """Batches per second of the pipeline alone (augmentation on) and training steps per second of the model,
    at 256 and 512 px, measured in this process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    from livernode.config import TrainConfig
    from livernode.imaging.preprocess import PreprocessSpec
    from livernode.training.cache import prepare
    from livernode.training.data import Batches, CaseSplit
    from livernode.training.datasets import list_cases
    from livernode.training.model import build_model, import_tf, make_loss

    _, tf = import_tf()
    refs = list_cases(WORK / "cases8", "lits")
    out = {"rows": []}
    for size in (256, 512):
        p = prepare(refs, PreprocessSpec(size=size), WORK / "cache", workers=2, progress=False)
        split = CaseSplit("train", tuple(p.cases.values()))
        batches = Batches(split, TrainConfig(batch_size=BATCH), seed=0)
        per_workers = {}
        for workers in (1, 2, 4):
            ds = batches.dataset(tf, 0, 10_000, workers)
            it = iter(ds)
            for _ in range(3):
                next(it)
            n, t = 30, time.perf_counter()
            for _ in range(n):
                next(it)
            per_workers[workers] = n / (time.perf_counter() - t)
        model = build_model("resnet34", 1)
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=make_loss())
        x, t = batches.batch(0)
        model.train_on_batch(x, t)  # compile and warm up
        steps = 2
        t0 = time.perf_counter()
        for i in range(steps):
            x, t = batches.batch(i + 1)
            model.train_on_batch(x, t)
        model_steps = steps / (time.perf_counter() - t0)
        best_workers = min((w for w, r in per_workers.items() if r >= 3 * model_steps), default=None)
        out["rows"].append({"size": size, "pipeline_batches_per_s": per_workers,
                            "model_steps_per_s": model_steps, "s_per_step": 1 / model_steps,
                            "ratio_best": max(per_workers.values()) / model_steps,
                            "workers_for_3x": best_workers})
        log(f"  {size} px: pipeline {per_workers} batches/s, model {model_steps:.3f} steps/s")
        del model
        tf.keras.backend.clear_session()
        del split, batches, p
        np.zeros(1)
    return out


def memory_512(few: Path) -> float:
    """Peak RSS of one short epoch at 512 px (8 cases; memory does not depend on the count, as measured at 256)."""
    env = dict(ENV, LIVERNODE_CACHE=str(WORK / "cache"))
    peak, _, secs = _peak_rss_run(_cli("train", "--format", "lits", "--size", 512, "--epochs", 1,
                                       "--steps-per-epoch", 1, "--data", few, "--out", WORK / "run-512"), env)
    log(f"  512 px, 8 cases: peak RSS {peak:.0f} MiB, {secs:.0f} s")
    return peak


def project(mem: dict, speed: dict) -> list[dict]:
    """LiTS at 256 and 512 px from this run's figures."""
    rows = []
    per_slice_256 = mem["cache_bytes_per_slice_256"]
    for r in speed["rows"]:
        scale = (r["size"] / 256) ** 2
        rows.append({"size": r["size"],
                     "cache_gib": LITS_SLICES * per_slice_256 * scale / 2**30,
                     "peak_training_memory_mib": mem["peak_rss_mib_48"] if r["size"] == 256 else mem["peak_rss_mib_512"],
                     "epoch_hours_this_cpu": LITS_SLICES / BATCH * r["s_per_step"] / 3600})
    return rows


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log("bench-train: 48 phantom cases of 512x512 slices")
    few, many = datasets()
    log(f"  data ready in {time.monotonic() - t0:.0f} s")
    mem = memory_and_cache(few, many)
    speed = pipeline_and_model()
    mem["peak_rss_mib_512"] = memory_512(few)
    lits = project(mem, speed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    results = {"commit": commit, "memory_and_cache": mem, "speed": speed, "lits_projection": lits,
               "seconds": time.monotonic() - t0}
    (REPO / "bench" / "train_results.json").write_text(json.dumps(results, indent=1) + "\n")
    rows = [("peak RSS, train on 48 vs 8 cases (MiB)", f"{mem['peak_rss_mib_48']:.0f}", f"{mem['peak_rss_mib_8']:.0f}",
             f"{mem['rss_ratio']:.3f}", "<= 1.15", mem["rss_ratio"] <= 1.15)]
    for r in speed["rows"]:
        best = max(r["pipeline_batches_per_s"].values())
        rows.append((f"{r['size']} px: pipeline batches/s vs model steps/s (workers for 3x: {r['workers_for_3x']})",
                     f"{best:.1f}", f"{r['model_steps_per_s']:.3f}", f"{r['ratio_best']:.0f}x", ">= 3x",
                     r["ratio_best"] >= 3))
    rows.append(("cache preparation, slices/s (512 -> 256 px)", f"{mem['prepare_slices_per_s']:.1f}", "", "", "", None))
    rows.append(("time to first step, cache ready vs preparing (s)", f"{mem['first_step_warm_s']:.1f}",
                 f"{mem['first_step_cold_s']:.1f}", f"{mem['first_step_ratio']:.2f}", "", None))
    for p in lits:
        mem_txt = f"{p['peak_training_memory_mib']:.0f} MiB"
        rows.append((f"LiTS projection {p['size']} px: cache GiB / peak memory / epoch hours on this CPU",
                     f"{p['cache_gib']:.1f} GiB", mem_txt, f"{p['epoch_hours_this_cpu']:.1f} h", "", None))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'item'.ljust(width)}  livernode  peer  ratio  target  met")
    for item, ours, peer, ratio, target, met in rows:
        print(f"{item.ljust(width)}  {ours}  {peer}  {ratio}  {target}  {'' if met is None else 'yes' if met else 'NO'}")
    print(f"\nbench-train took {results['seconds'] / 60:.1f} min; bench/train_results.json")
    return 0 if all(r[5] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
