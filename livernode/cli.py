"""Command line: argument parsing only; each subcommand calls one API function."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from livernode import __version__
from livernode.errors import LivernodeError
from livernode.logs import configure_logging

log = logging.getLogger("livernode")
DESCRIPTION = ("livernode segments the liver and liver tumours in abdominal CT. Offline it makes phantoms, trains, "
               "exports, evaluates and compares models (synth, train, export, evaluate, compare) and segments "
               "archives (batch); online it is a DICOM node that takes studies by C-STORE or from a folder and "
               "returns a DICOM SEG, an SR, summary.json and a preview to PACS (serve, infer), with tools to run it "
               "(status, retry, purge, echo, check, version). `livernode demo` runs it all end to end on phantoms.")


def _synth(a: argparse.Namespace) -> int:
    from livernode.errors import ConfigError
    from livernode.imaging.synth import synthesize
    from livernode.imaging.synth_study import MIN_SPAN_SLICES

    if a.layout == "study" and a.slices < MIN_SPAN_SLICES:
        raise ConfigError(f"--layout study: --slices is the study's span in 1 mm slices and must be at least "
                          f"{MIN_SPAN_SLICES} (to reach above and below the liver), not {a.slices}")

    paths = synthesize(a.out, cases=a.cases, slices=a.slices, size=a.size, seed=a.seed, layout=a.layout)
    print(f"wrote {len(paths)} {a.layout} cases to {a.out}")
    return 0


def _train(a: argparse.Namespace) -> int:
    from livernode.config import load_training_config
    from livernode.training.train import train

    cfg = load_training_config(a.config, {"preprocess.size": a.size, "train.epochs": a.epochs,
                                          "train.steps_per_epoch": a.steps_per_epoch,
                                          "model.arch": a.arch, "model.backbone": a.backbone,
                                          "model.encoder_weights": a.encoder_weights,
                                          "model.context": a.context, "split.seed": a.seed})
    if a.logical_cpus:  # before TensorFlow touches its devices: MirroredStrategy without GPUs
        from livernode.training.distribute import split_cpu
        from livernode.training.model import import_tf

        split_cpu(import_tf()[1], a.logical_cpus)
    r = train(a.data, a.format, a.out, cfg, resume=a.resume, cache=a.cache, workers=a.workers,
              pipeline_workers=a.pipeline_workers, strategy=a.strategy, precision=a.precision, folds=a.folds,
              fold=a.fold)
    if not r.chief:
        print(f"trained {r.epochs_run} epochs in {r.seconds:.0f} s as a worker; the chief's --out holds the run")
        return 0
    print(f"trained {r.epochs_run} epochs in {r.seconds:.0f} s; best epoch {r.best_epoch}; "
          f"test Dice liver {r.test_dice_liver:.4f}, tumour {r.test_dice_tumour:.4f}; run folder {r.run}")
    return 0


def _cache_args(p: argparse.ArgumentParser, out: bool = False) -> None:
    p.add_argument("--out" if out else "--cache", dest="cache", type=Path,
                   help="prepared cache folder (default: $LIVERNODE_CACHE or ~/.cache/livernode/prepared)")
    p.add_argument("--workers", type=int, help="processes preparing cases (default: the number of cores)")


def _prepare(a: argparse.Namespace) -> int:
    from livernode.config import load_training_config
    from livernode.training.cache import default_cache_dir, prepare
    from livernode.training.datasets import list_cases
    from livernode.training.train import spec_from_config

    cfg = load_training_config(a.config, {"preprocess.size": a.size})
    t0 = time.monotonic()
    refs = list_cases(a.data, a.format)
    p = prepare(refs, spec_from_config(cfg.preprocess), a.cache, a.workers)
    slices = sum(c.n for c in p.cases.values())
    size = sum(c.nbytes() for c in p.cases.values())
    print(f"{len(p.cases)} cases ({slices} slices, {size / 2**20:.1f} MiB) in {a.cache or default_cache_dir()}: "
          f"{p.built} prepared now in {time.monotonic() - t0:.1f} s, {len(p.cases) - p.built} were ready; "
          f"{len(p.skipped)} skipped")
    return 0


def _export(a: argparse.Namespace) -> int:
    from livernode.export.onnx_export import export_run

    r = export_run(a.run, a.out, fp16=a.fp16)
    print(f"exported {r.path} ({r.path.stat().st_size / 1e6:.1f} MB); parity on {r.parity.slices} validation slices: "
          f"max |keras - onnx| = {r.parity.max_abs_diff:.2e}, argmax agreement {100 * r.parity.agreement:.4f} %")
    return 0


def _fuse(a: argparse.Namespace) -> int:
    from livernode.export.fused import fuse_file

    agreement = fuse_file(a.model, a.out)
    print(f"fused {a.out} ({a.out.stat().st_size / 1e6:.1f} MB): int16 HU in, uint8 labels out; labels equal to the "
          f"host path on {100 * agreement:.4f} % of the voxels of a 512x512 phantom")
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from livernode.training.evaluate import evaluate, format_table

    report = evaluate(a.model, a.data, a.format, a.out)
    print(format_table(report))
    print(f"metrics written to {a.out / 'metrics.json'} and {a.out / 'metrics.csv'}")
    return 0


def _compare(a: argparse.Namespace) -> int:
    from livernode.training.compare import compare, format_table, parse_archs, parse_contexts

    result = compare(a.data, a.format, a.out, a.config, parse_archs(a.archs), parse_contexts(a.context),
                     cache=a.cache)
    print(format_table(result))
    print(f"comparison written to {a.out / 'comparison.csv'}, comparison.json and comparison.png")
    failed = [e["name"] for e in result["configurations"] if e["status"] != "ok"]
    if failed:
        print(f"livernode compare: {len(failed)} configuration(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _infer(a: argparse.Namespace) -> int:
    from livernode.daemon.pipeline import infer_folder

    rules = None
    if a.config is not None:
        from livernode.config import load_daemon_config

        rules = load_daemon_config(a.config).selection
    r = infer_folder(a.study, a.model, a.out, providers=a.providers, rules=rules)
    f = r.findings
    print(f"liver {f.liver_volume_ml:.1f} mL{'' if not f.liver_touches_scan_edge else ' (cut off by the scan edge)'}, "
          f"{len(f.lesions)} lesion(s), tumour {f.tumour_volume_ml:.1f} mL ({f.tumour_burden_percent:.2f} % of liver)")
    print(f"wrote {r.seg_path}, {r.sr_path}, {r.summary_path}, {r.preview_path}")
    return 0


def _batch(a: argparse.Namespace) -> int:
    from livernode.batch import run_batch

    r = run_batch(a.root, a.model, a.out, workers=a.workers, ray_address=a.ray, resume=a.resume)
    print(f"{r.studies} studies, {r.processed} processed in {r.seconds:.0f} s ({r.studies_per_hour:.0f} studies/h): "
          f"{r.done} done, {r.failed} failed, {r.up_to_date} complete and up to date; {r.files_skipped} files "
          f"skipped (not DICOM, or without a study UID)")
    print(f"wrote {r.csv_path}" + (f" and {r.parquet_path}" if r.parquet_path else ""))
    return 1 if r.failed else 0


def _serve(a: argparse.Namespace) -> int:
    from livernode.config import load_daemon_config
    from livernode.daemon.service import serve

    overrides = {
        "inference.model": a.model, "inference.providers": a.providers, "node.ae_title": a.ae_title,
        "node.bind": a.bind, "node.port": a.port, "paths.state": a.state, "paths.watch": a.watch,
        "paths.output": a.output, "send.destinations": a.destination, "study.quiet_seconds": a.study_timeout,
        "observability.metrics_port": a.metrics_port, "node.workers": a.workers}
    return serve(load_daemon_config(a.config, overrides), lambda: load_daemon_config(a.config, overrides))


def _status(a: argparse.Namespace) -> int:
    from livernode.daemon.operator import status_text

    print(status_text(_state(a), a.study, a.limit))
    return 0


def _retry(a: argparse.Namespace) -> int:
    from livernode.daemon.operator import retry

    print(retry(_state(a), a.study_uid))
    return 0


def _purge(a: argparse.Namespace) -> int:
    from livernode.daemon.operator import purge

    print(purge(a.config, a.state, a.dry_run))
    return 0


def _echo(a: argparse.Namespace) -> int:
    from livernode.daemon.operator import echo

    ok, text = echo(a.target, a.calling_ae)
    print(text)
    return 0 if ok else 1


def _check(a: argparse.Namespace) -> int:
    from livernode.daemon.operator import check, check_study

    if a.study is not None:
        ok, table = check_study(a.study, a.config, {"inference.model": a.model})
        print(table)
        return 0 if ok else 1
    ok, table = check(a.config, {"inference.model": a.model})
    print(table)
    return 0 if ok else 1


def _version(a: argparse.Namespace) -> int:
    from livernode.daemon.operator import version_text

    print(version_text())
    return 0


def _state(a: argparse.Namespace) -> Path:
    if a.state is not None:
        return a.state
    from livernode.config import load_daemon_config

    return load_daemon_config(a.config).paths.state


def _demo(a: argparse.Namespace) -> int:
    from livernode.demo import run_demo

    return run_demo(a.workdir, fresh=a.fresh)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livernode", description=DESCRIPTION,
                                epilog="`livernode COMMAND --help` for one command; README.md for the whole story.")
    p.add_argument("--version", action="version", version=f"livernode {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write synthetic abdominal CT phantoms with ground truth")
    s.add_argument("out", type=Path)
    s.add_argument("--cases", type=int, default=4)
    s.add_argument("--slices", type=int, default=48)
    s.add_argument("--size", type=int, default=512, help="matrix size in pixels (field of view stays realistic)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layout", choices=["dicom", "chaos", "lits", "study"], default="dicom",
                   help="study: a whole study per case as PACS sends it (phases, kernels, MIP, reformat, localizer, "
                        "dose screen; --slices counts 1 mm slices, at least 240)")
    s.set_defaults(func=_synth)

    t = sub.add_parser("train", help="train the U-Net on a data set")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--format", choices=["chaos", "lits", "dicom"], required=True)
    t.add_argument("--out", type=Path, required=True, help="run folder")
    t.add_argument("--config", type=Path, help="training TOML (config/training.toml documents every key)")
    t.add_argument("--size", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--steps-per-epoch", type=int)
    t.add_argument("--arch", choices=["resnet34-unet", "unet", "vnet"],
                   help="resnet34-unet (default): U-Net with a segmentation-models encoder; unet: the original U-Net; "
                        "vnet: a 3-D V-Net on patches resampled to [volume] spacing_mm")
    t.add_argument("--context", type=int, metavar="K",
                   help="2-D architectures: feed each slice with K neighbours on each side as channels (2.5-D)")
    t.add_argument("--backbone", help="resnet34-unet's encoder (any segmentation-models backbone name)")
    t.add_argument("--encoder-weights", help="local .h5 file with ImageNet weights for the backbone")
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (every epoch, and on Ctrl-C)")
    _cache_args(t)
    t.add_argument("--pipeline-workers", type=int, default=4, help="batches made in parallel (default 4)")
    t.add_argument("--strategy", choices=["auto", "default", "mirrored", "multi-worker"], default="auto",
                   help="auto: every GPU of this machine, or the machines in TF_CONFIG (default auto)")
    t.add_argument("--precision", choices=["auto", "mixed", "float32"], default="auto",
                   help="auto: mixed (float16 compute) on a GPU, float32 on the CPU")
    t.add_argument("--folds", type=int, help="patient-level cross-validation: this many folds ...")
    t.add_argument("--fold", type=int, help="... and this one (0 to folds-1) is the test set")
    t.add_argument("--logical-cpus", type=int, help=argparse.SUPPRESS)  # tests: MirroredStrategy over CPU parts
    t.set_defaults(func=_train)

    pr = sub.add_parser("prepare", help="write a data set's cases at training resolution into the prepared cache")
    pr.add_argument("--data", type=Path, required=True)
    pr.add_argument("--format", choices=["chaos", "lits", "dicom"], required=True)
    pr.add_argument("--config", type=Path, help="training TOML: its [preprocess] section decides the entries")
    pr.add_argument("--size", type=int)
    _cache_args(pr, out=True)
    pr.set_defaults(func=_prepare)

    e = sub.add_parser("export", help="export a run's best checkpoint to ONNX with an embedded manifest")
    e.add_argument("run", type=Path)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--fp16", action="store_true", help="store weights in float16 (inputs and outputs stay float32)")
    e.set_defaults(func=_export)

    fu = sub.add_parser("fuse", help="put an exported model's preprocessing and restoring into its ONNX graph "
                        "(int16 HU in, uint8 labels out), checked against the host path")
    fu.add_argument("model", type=Path)
    fu.add_argument("--out", type=Path, required=True)
    fu.set_defaults(func=_fuse)

    v = sub.add_parser("evaluate", help="score an ONNX model on a labelled data set")
    v.add_argument("--model", type=Path, required=True)
    v.add_argument("--data", type=Path, required=True)
    v.add_argument("--format", choices=["chaos", "lits", "dicom"], required=True)
    v.add_argument("--out", type=Path, required=True)
    v.set_defaults(func=_evaluate)

    cm = sub.add_parser("compare", help="train, export and score several architectures on the same data and split")
    cm.add_argument("--data", type=Path, required=True)
    cm.add_argument("--format", choices=["chaos", "lits", "dicom"], required=True)
    cm.add_argument("--out", type=Path, required=True, help="folder for comparison.csv/.json/.png and one per "
                                                            "configuration (run/, model.onnx, evaluation/)")
    cm.add_argument("--archs", default="unet,resnet34-unet,vnet", help="comma-separated: resnet34-unet, unet, vnet "
                                                                       "(default: all three)")
    cm.add_argument("--context", default="0", help="comma-separated slice contexts 0..3 for the 2-D architectures "
                                                   "(vnet runs once, without context; default 0)")
    cm.add_argument("--config", type=Path, help="training TOML shared by every configuration")
    cm.add_argument("--cache", type=Path, help="prepared cache folder (default: $LIVERNODE_CACHE or "
                                               "~/.cache/livernode/prepared)")
    cm.set_defaults(func=_compare)

    i = sub.add_parser("infer", help="segment one study folder with the daemon's pipeline, no network")
    i.add_argument("study", type=Path)
    i.add_argument("--model", type=Path, required=True)
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--providers", choices=["auto", "cpu", "cuda"], default="auto")
    i.add_argument("--config", type=Path, help="daemon TOML whose [selection] rules choose the series, as the node")
    i.set_defaults(func=_infer)

    bt = sub.add_parser("batch", help="segment every study under a folder (an archive) with the node's pipeline, "
                                      "on local processes or on Ray; studies.csv holds a row per study")
    bt.add_argument("root", type=Path, help="folder searched for DICOM files, grouped by Study Instance UID")
    bt.add_argument("--model", type=Path, required=True)
    bt.add_argument("--out", type=Path, required=True, help="one folder per study (named by a digest of its UID) "
                                                            "and studies.csv")
    bt.add_argument("--workers", type=int, default=1, help="worker processes (or CPU actors on Ray), each with one "
                                                           "ONNX Runtime thread (default 1)")
    bt.add_argument("--ray", metavar="ADDRESS|local", help="run on Ray actors: 'local' starts Ray on this machine "
                                                           "(127.0.0.1 only), ADDRESS joins a cluster (host:port)")
    bt.add_argument("--resume", action="store_true", help="skip studies whose results are complete and up to date "
                                                          "for this model and these files")
    bt.set_defaults(func=_batch)

    sv = sub.add_parser("serve", help="run the DICOM node (C-STORE receiver and/or watched folder)")
    sv.add_argument("--config", type=Path, help="daemon TOML (config/livernode.toml documents every key)")
    sv.add_argument("--model", type=Path)
    sv.add_argument("--providers", choices=["auto", "cpu", "cuda"])
    sv.add_argument("--ae-title")
    sv.add_argument("--bind")
    sv.add_argument("--port", type=int)
    sv.add_argument("--state", "--spool", dest="state", type=Path, help="folder for spool, index and results")
    sv.add_argument("--watch", type=Path)
    sv.add_argument("--output", type=Path)
    sv.add_argument("--destination", action="append", help="AET@HOST:PORT, repeatable")
    sv.add_argument("--study-timeout", type=float, help="quiet seconds after which a study is complete")
    sv.add_argument("--metrics-port", type=int, help="port of /metrics and /healthz on 127.0.0.1 (default 9464)")
    sv.add_argument("--workers", type=int, help="C-STORE receiver processes on the port (node.workers; default: the "
                    "number of cores, at most 4; 1: in the node's own process)")
    sv.set_defaults(func=_serve)

    for name, helptext, func in (("status", "studies, jobs and outbox of a node as tables", _status),
                                 ("retry", "reprocess a study or re-send its results (dead letters included)", _retry)):
        op = sub.add_parser(name, help=helptext)
        if name == "retry":
            op.add_argument("study_uid")
        else:
            op.add_argument("--study", metavar="UID", help="one study: its jobs and why each series was (not) chosen")
            op.add_argument("--limit", type=int, default=50, help="how many of the most recent studies to list")
        op.add_argument("--state", type=Path, help="the node's state folder (default: from --config)")
        op.add_argument("--config", type=Path)
        op.set_defaults(func=func)
    pg = sub.add_parser("purge", help="apply the retention policy now: remove delivered and failed studies past "
                                      "their time (the daemon does this on its own timer)")
    pg.add_argument("--config", type=Path)
    pg.add_argument("--state", type=Path, help="the node's state folder (default: from --config)")
    pg.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    pg.set_defaults(func=_purge)
    ec = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    ec.add_argument("target", help="AET@HOST:PORT")
    ec.add_argument("--calling-ae", default="LIVERNODE")
    ec.set_defaults(func=_echo)
    sub.add_parser("version", help="versions and ONNX Runtime providers").set_defaults(func=_version)
    ck = sub.add_parser("check", help="validate config, model, providers, ports and destinations; pass/fail table")
    ck.add_argument("--config", type=Path)
    ck.add_argument("--model", type=Path)
    ck.add_argument("--study", type=Path, metavar="DIR",
                    help="print the series decision for a study folder instead (rules and coverage pass, no SEG)")
    ck.set_defaults(func=_check)

    d = sub.add_parser("demo", help="run the offline half end to end on phantoms (what `make demo` runs)")
    d.add_argument("--workdir", type=Path, default=Path("demo"))
    d.add_argument("--fresh", action="store_true", help="ignore the cached model and train again")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except LivernodeError as exc:
        print(f"livernode {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"livernode {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
