"""`livernode demo` (what `make demo` runs): everything end to end on phantoms.

synth (training and held-out cases) -> train -> export -> evaluate (metrics table) -> the node on loopback receives a
held-out study by C-STORE and returns SEG and SR to a PACS stand-in, which are validated; the study summary is
printed. The trained model is cached in the work folder, so a second run skips training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from livernode.config import load_training_config

log = logging.getLogger(__name__)

# The documented phantom recipe: 16 training cases at 128 px, held-out cases from another seed.
TRAIN_CASES, HELD_OUT_CASES, SLICES, SIZE = 16, 6, 48, 128
TRAIN_SEED, HELD_OUT_SEED = 0, 1000
CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.toml"


def demo_model(workdir: Path, *, fresh: bool = False, epochs: int | None = None) -> tuple[Path, Path, Path]:
    """The demo's phantoms and trained model in `workdir`, made when missing (or `fresh`): (model, run folder,
    held-out phantoms). `epochs` shortens the documented recipe (`make bench` does, when `make demo` has not run)."""
    from livernode.imaging.synth import synthesize

    workdir.mkdir(parents=True, exist_ok=True)
    train_dir, held_dir = workdir / "phantoms-train", workdir / "phantoms-heldout"
    model, run = workdir / "model.onnx", workdir / "run"
    if not train_dir.exists():
        synthesize(train_dir, cases=TRAIN_CASES, slices=SLICES, size=SIZE, seed=TRAIN_SEED, layout="dicom")
    if not held_dir.exists():
        synthesize(held_dir, cases=HELD_OUT_CASES, slices=SLICES, size=SIZE, seed=HELD_OUT_SEED, layout="dicom")
    cfg = load_training_config(CONFIG if CONFIG.exists() else None, {"train.epochs": epochs})
    if fresh or not _cached(model, run, cfg):
        from livernode.export.onnx_export import export_run
        from livernode.training.train import train

        r = train(train_dir, "dicom", run, cfg)
        print(f"trained in {r.seconds:.0f} s ({r.epochs_run} epochs, best {r.best_epoch})")
        export_run(run, model)
    else:
        print(f"using the cached model {model} (run `livernode demo --fresh` to train again)")
    return model, run, held_dir


def _cached(model: Path, run: Path, cfg) -> bool:
    """A model trained by this recipe and exported by a livernode that records what it was trained on."""
    import json

    from livernode.errors import LivernodeError
    from livernode.inference.manifest import METADATA_KEY, parse_manifest

    if not model.exists() or not (run / "run.json").exists():
        return False
    if json.loads((run / "run.json").read_text()).get("config") != json.loads(cfg.model_dump_json()):
        return False
    try:
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
        return parse_manifest(meta.get(METADATA_KEY), str(model)).training_data != "unknown"
    except (LivernodeError, OSError, ValueError):
        return False


def run_demo(workdir: Path, *, fresh: bool = False) -> int:
    t0 = time.monotonic()
    model, run, held_dir = demo_model(workdir, fresh=fresh)
    from livernode.training.evaluate import evaluate, format_table

    report = evaluate(model, held_dir, "dicom", workdir / "evaluation")
    print(format_table(report))
    print(f"\nplots: {run / 'learning_curves.png'}, {run / 'overlay.png'}, {run / 'metrics.png'}")
    from livernode.demo_node import run_node_demo

    run_node_demo(workdir, model, held_dir / "case_000")
    print(f"demo finished in {time.monotonic() - t0:.0f} s; work folder {workdir}")
    return 0
