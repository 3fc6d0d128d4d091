"""`livernode compare`: the thesis's architecture comparison, repeated on the data at hand. Every architecture
(the 2-D ones once per slice context) is trained on the same cases, split and prepared cache, exported, and scored
on the same held-out test cases, as delivered (post-processed) and as the raw network labels them; the results go
into comparison.csv, comparison.json and comparison.png, and one fixed-width table."""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livernode import __version__
from livernode.config import load_training_config
from livernode.errors import ConfigError, EvaluationError, LivernodeError, TrainingInterrupted
from livernode.fsutil import replacing, write_text

log = logging.getLogger(__name__)
ARCHS = ("resnet34-unet", "unet", "vnet")
VOLUMETRIC = ("vnet",)  # 3-D: sees whole volumes, so slice context does not apply
MAX_CONTEXT = 3
STRUCTURES = ("liver", "tumour")
# (column suffix, key in evaluate.summarise's per-structure summary)
METRICS = (("dice_global", "dice_global"), ("dice_mean", "dice_mean"), ("voe", "voe_mean"), ("rvd", "rvd_mean"),
           ("assd_mm", "assd_mm_mean"), ("hd95_mm", "hd95_mm_mean"))
LESIONS = ("lesion_recall", "lesion_precision")
CSV_COLUMNS = ["configuration", "arch", "context", "status", "reason", "output", "parameters", "train_seconds",
               "epochs", "best_epoch", "infer_seconds_per_study", "test_cases",
               *[f"{s}_{m}" for s in STRUCTURES for m, _ in METRICS], *[f"tumour_{k}" for k in LESIONS]]


@dataclass(frozen=True)
class Configuration:
    """One row of the comparison: an architecture and, for a 2-D one, its slice context K."""

    name: str
    arch: str
    context: int


def parse_archs(text: str) -> list[str]:
    """'unet,resnet34-unet' -> ['unet', 'resnet34-unet']; ConfigError naming an unknown or missing name."""
    archs = [a.strip() for a in text.split(",") if a.strip()]
    if not archs:
        raise ConfigError(f"--archs {text!r}: name at least one of {', '.join(ARCHS)}")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ConfigError(f"--archs: unknown architecture {', '.join(map(repr, unknown))}; known: {', '.join(ARCHS)}")
    return archs


def parse_contexts(text: str) -> list[int]:
    """'0,1' -> [0, 1]; ConfigError unless each is an integer from 0 to MAX_CONTEXT."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"--context {text!r}: name at least one of 0 to {MAX_CONTEXT}")
    bad = [p for p in parts if not (p.isdigit() and int(p) <= MAX_CONTEXT)]
    if bad:
        raise ConfigError(f"--context: {', '.join(map(repr, bad))} is not a slice context; use integers 0 to "
                          f"{MAX_CONTEXT} (neighbouring slices on each side)")
    return [int(p) for p in parts]


def configurations(archs: list[str], contexts: list[int]) -> list[Configuration]:
    """Every architecture crossed with every context, in the order given, each once; a 3-D architecture takes
    context 0 only and appears once whatever the contexts. ConfigError for an unknown name or context."""
    parse_archs(",".join(archs))
    parse_contexts(",".join(map(str, contexts)))
    plan: list[Configuration] = []
    for arch in archs:
        if arch in VOLUMETRIC:
            candidates = [Configuration(arch, arch, 0)]
        else:
            candidates = [Configuration(f"{arch}-k{k}", arch, k) for k in contexts]
        for c in candidates:
            if c not in plan:
                plan.append(c)
    return plan


def onnx_parameters(path: Path) -> int:
    """Weights in an exported model: the elements of its floating-point initializers (integer initializers are
    shapes and indices that the converter writes, not parameters)."""
    import onnx

    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    model = onnx.load(str(path))
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if t.data_type in floating)


def compare(data: Path, fmt: str, out: Path, cfg_path: Path | None, archs: list[str], contexts: list[int],
            cache: Path | None = None, progress: bool = True) -> dict:
    """Train, export and score every configuration of `archs` x `contexts` on the cases under `data`, each in
    out/<name>/ (run/, model.onnx, evaluation/); write comparison.csv, .json and .png into `out` (the first two
    after every configuration, so an interrupted comparison keeps what it measured). A configuration that fails
    is recorded with its reason and the next one runs. Returns what comparison.json holds.

    ConfigError for unknown architectures or contexts and for an unreadable training config, and the data set's
    own error when its cases cannot be listed or prepared (before anything trains); KeyboardInterrupt once the
    results so far are written, when training is interrupted."""
    started = time.monotonic()
    plan = configurations(archs, contexts)
    base = load_training_config(cfg_path)  # a broken file stops the comparison before anything trains
    prepare_seconds = _prepare_cache(data, fmt, base, cache, progress)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": {"data": str(data), "format": fmt, "out": str(out),
                          "config": None if cfg_path is None else str(cfg_path), "archs": list(archs),
                          "contexts": list(contexts), "cache": None if cache is None else str(cache)},
              "livernode_version": __version__,
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "prepare_seconds": prepare_seconds, "test_cases": None, "same_split": True, "wall_seconds": 0.0,
              "configurations": []}
    for i, c in enumerate(plan, 1):
        log.info("[%d/%d] %s: training, export and evaluation", i, len(plan), c.name)
        t0 = time.monotonic()
        interrupted = False
        try:
            entry = _run_one(c, data, fmt, out / c.name, cfg_path, cache, progress)
        except Exception as exc:  # one configuration's failure is its own row; the others still run
            interrupted = isinstance(exc, TrainingInterrupted)
            if not isinstance(exc, LivernodeError):
                log.exception("%s failed", c.name)
            reason = str(exc) if isinstance(exc, LivernodeError) else f"{type(exc).__name__}: {exc}"
            entry = {"name": c.name, "arch": c.arch, "context": c.context, "status": "failed", "reason": reason}
        finally:
            _forget_models()
        entry["seconds"] = round(time.monotonic() - t0, 1)
        if entry["status"] == "ok":
            if result["test_cases"] is None:
                result["test_cases"] = entry["test_cases"]
            elif entry["test_cases"] != result["test_cases"]:  # the split is seeded by cases and seed alone
                result["same_split"] = False
                log.warning("%s was tested on %s, the first configuration on %s", c.name, entry["test_cases"],
                            result["test_cases"])
            log.info("[%d/%d] %s: done in %.1f s: liver Dice %s, tumour Dice %s (delivered, global)", i, len(plan),
                     c.name, entry["seconds"], _fmt(_metric(entry, "delivered", "liver", "dice_global")),
                     _fmt(_metric(entry, "delivered", "tumour", "dice_global")))
        else:
            log.error("[%d/%d] %s: failed after %.1f s: %s", i, len(plan), c.name, entry["seconds"],
                      entry["reason"])
        result["configurations"].append(entry)
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        _write_tables(out, result)
        if interrupted:
            raise KeyboardInterrupt
    plot(result, out / "comparison.png")
    return result


def _prepare_cache(data: Path, fmt: str, cfg, cache: Path | None, progress: bool) -> float:
    """Prepare every case once, before the first configuration: otherwise the first one's training time would
    include it and the others' would not. Data that cannot be read stops the comparison here, since every
    configuration would fail on it alike. Seconds it took."""
    from livernode.training.cache import prepare
    from livernode.training.datasets import list_cases
    from livernode.training.train import spec_from_config

    t0 = time.monotonic()
    prepare(list_cases(data, fmt), spec_from_config(cfg.preprocess), cache, progress=progress)
    return round(time.monotonic() - t0, 1)


def _overrides(c: Configuration) -> dict:
    # Set through the config, like every other key, so a TOML's [model] context never leaks into a row that
    # says otherwise.
    return {"model.arch": c.arch, "model.context": c.context}


def _run_one(c: Configuration, data: Path, fmt: str, folder: Path, cfg_path: Path | None, cache: Path | None,
             progress: bool) -> dict:
    from livernode.export.onnx_export import export_run
    from livernode.training.evaluate import evaluate
    from livernode.training.train import train

    cfg = load_training_config(cfg_path, _overrides(c))
    trained = train(data, fmt, folder / "run", cfg, cache=cache, progress=progress)
    summary = json.loads((trained.run / "run.json").read_text())
    test = list(summary["data"]["cases"]["test"])
    if not test:
        raise EvaluationError("the split leaves no test case (split.test = 0): nothing to compare on")
    model = export_run(trained.run, folder / "model.onnx").path
    report = evaluate(model, data, fmt, folder / "evaluation", cases=test)
    return {"name": c.name, "arch": c.arch, "context": c.context, "status": "ok", "reason": "",
            "run": str(trained.run), "model": str(model), "parameters": onnx_parameters(model),
            "train_seconds": summary["train_seconds"], "epochs": summary["epochs_run"],
            "best_epoch": summary["best_epoch"], "test_cases": test,
            "infer_seconds_per_study": report["timing"]["infer_seconds_mean"], "timing": report["timing"],
            "providers": report["providers"], "skipped": report["skipped"],
            "summary": {"delivered": report["summary"], "network": report["network_summary"]},
            "cases": report["cases"]}


def _forget_models() -> None:
    """Drop the finished configuration's Keras graph, so memory does not grow with the configurations."""
    tf = sys.modules.get("tensorflow")  # not imported: nothing was built, and nothing to import it for
    if tf is not None:
        tf.keras.backend.clear_session()


def _metric(entry: dict, output: str, structure: str, key: str) -> float:
    value = entry.get("summary", {}).get(output, {}).get(structure, {}).get(key)
    return math.nan if value is None else float(value)


def rows(result: dict) -> list[dict]:
    """comparison.csv: one row per configuration and output (delivered, network); one per failed configuration."""
    out = []
    for e in result["configurations"]:
        base = {"configuration": e["name"], "arch": e["arch"], "context": e["context"], "status": e["status"],
                "reason": e["reason"]}
        if e["status"] != "ok":
            out.append(base)
            continue
        for output in ("delivered", "network"):
            row = {**base, "output": output, "parameters": e["parameters"], "train_seconds": e["train_seconds"],
                   "epochs": e["epochs"], "best_epoch": e["best_epoch"],
                   "infer_seconds_per_study": e["infer_seconds_per_study"], "test_cases": len(e["test_cases"])}
            for s in STRUCTURES:
                row.update({f"{s}_{m}": _metric(e, output, s, key) for m, key in METRICS})
            row.update({f"tumour_{k}": _metric(e, output, "tumour", k) for k in LESIONS})
            out.append(row)
    return out


def _write_tables(out: Path, result: dict) -> None:
    def cell(v):  # six significant digits say more than anyone measures; NaN (undefined) is left empty
        return ("" if math.isnan(v) else f"{v:.6g}") if isinstance(v, float) else v

    with replacing(out / "comparison.csv") as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows({k: cell(v) for k, v in r.items()} for r in rows(result))
    write_text(out / "comparison.json", json.dumps(result, indent=1, default=_json_default).replace("NaN", "null"))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _fmt(v, digits: int = 3) -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


TABLE = (("configuration", "configuration", 18), ("output", "output", 9), ("parameters", "parameters", 10),
         ("train s", "train_seconds", 8), ("epochs", "epochs", 6), ("s/study", "infer_seconds_per_study", 8),
         ("liver Dice", "liver_dice_global", 10), ("liver mean", "liver_dice_mean", 10),
         ("liver ASSD", "liver_assd_mm", 10), ("liver HD95", "liver_hd95_mm", 10),
         ("tumour Dice", "tumour_dice_global", 11), ("tumour mean", "tumour_dice_mean", 11),
         ("recall", "tumour_lesion_recall", 7), ("precision", "tumour_lesion_precision", 9))


def format_table(result: dict) -> str:
    """The comparison as a fixed-width table (Dice global and mean per case, surface distances in mm, lesion
    recall and precision); comparison.csv holds every column."""
    lines = [" ".join(f"{h:>{w}}" for h, _, w in TABLE)]
    for r in rows(result):
        if r["status"] != "ok":
            lines.append(f"{r['configuration']:>18} failed: {r['reason']}")
            continue
        lines.append(" ".join(f"{_fmt(r.get(k), 1 if k == 'train_seconds' else 3):>{w}}" for _, k, w in TABLE))
    ok = [e for e in result["configurations"] if e["status"] == "ok"]
    lines.append(f"\n{len(ok)} of {len(result['configurations'])} configurations scored on "
                 f"{len(result['test_cases'] or [])} test cases in {result['wall_seconds']:.0f} s; delivered = "
                 "post-processed (what PACS receives), network = raw labels")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """comparison.png: global Dice of liver and tumour per configuration, delivered and raw, above the training
    time and the inference time per study, every bar labelled with its value."""
    from livernode.training.plots import _plt

    plt = _plt()
    entries = result["configurations"]
    names = [e["name"] for e in entries]
    x = np.arange(len(entries))
    fig = plt.figure(figsize=(max(9.0, 2.2 * len(entries) + 3), 8.5))
    grid = fig.add_gridspec(2, 2, height_ratios=(1.5, 1))
    ax = fig.add_subplot(grid[0, :])
    series = (("liver, delivered", "delivered", "liver", "#2e9d46", None),
              ("liver, raw network", "network", "liver", "#9fd8a9", "//"),
              ("tumour, delivered", "delivered", "tumour", "#d7301f", None),
              ("tumour, raw network", "network", "tumour", "#f4a38f", "//"))
    width = 0.8 / len(series)
    for j, (label, output, structure, colour, hatch) in enumerate(series):
        values = [_metric(e, output, structure, "dice_global") for e in entries]
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, np.nan_to_num(values), width, label=label,
                      color=colour, hatch=hatch, edgecolor="white")
        shown = [_fmt(v, 2) if e["status"] == "ok" else "" for e, v in zip(entries, values, strict=True)]
        ax.bar_label(bars, labels=shown, fontsize=8, padding=2)
    for k, e in enumerate(entries):
        if e["status"] != "ok":
            ax.text(k, 0.5, "failed", ha="center", va="center", color="grey", fontsize=12, rotation=90)
    ax.set_xticks(x, [f"{e['name']}\n{e['parameters'] / 1e6:.1f} M parameters" if e.get("parameters") else
                      f"{e['name']}\nfailed" for e in entries])
    ax.set_ylim(0, 1.22)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("global Dice on the test cases")
    ax.set_title("Segmentation quality (delivered = post-processed, as PACS receives it; raw = network labels)",
                 fontsize=10)
    ax.legend(loc="upper center", ncols=4, fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    trained = [float(e["train_seconds"]) for e in entries if e.get("train_seconds") is not None]
    unit, scale = next((u for u in (("hours", 3600.0), ("minutes", 60.0)) if max(trained, default=0) >= 3 * u[1]),
                       ("seconds", 1.0))
    timings = (("training time", "train_seconds", unit, scale, "#4a6fa5", "{:.1f}" if scale > 1 else "{:.0f} s"),
               ("inference per study", "infer_seconds_per_study", "seconds per study", 1.0, "#8c6bb1", "{:.2f} s"))
    for col, (title, key, unit, scale, colour, form) in enumerate(timings):
        tx = fig.add_subplot(grid[1, col])
        values = [float(e[key]) / scale if e.get(key) is not None else math.nan for e in entries]
        bars = tx.bar(x, np.nan_to_num(values), 0.6, color=colour)
        tx.bar_label(bars, labels=["n/a" if math.isnan(v) else form.format(v) for v in values], fontsize=8,
                     padding=2)
        tx.set_xticks(x, names, rotation=20, ha="right")
        tx.set_ylabel(unit)
        tx.set_title(title)
        tx.margins(y=0.2)
        tx.grid(axis="y", alpha=0.3)
    tested = len(result["test_cases"] or [])
    fig.suptitle(f"Architecture comparison on {tested} held-out test case{'s' if tested != 1 else ''} "
                 f"({result['command']['format']}: {Path(result['command']['data']).name})", fontsize=13)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
