"""Operator commands: status tables, retry, C-ECHO, version. They read the same state folder the node uses."""

from __future__ import annotations

import time
from pathlib import Path

from livernode import __version__
from livernode.daemon import netclock  # noqa: F401 - importing it puts pynetdicom's timers on the monotonic clock
from livernode.daemon.send import Destination
from livernode.daemon.store import Store
from livernode.errors import ConfigError


def open_store(state: Path) -> Store:
    path = Path(state) / "index.sqlite"
    if not path.exists():
        raise ConfigError(f"{path}: no index here; point --state at the node's state folder")
    return Store(path)


def _table(headers: list[str], rows: list[tuple]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def status_text(state: Path, study: str | None = None, limit: int = 50) -> str:
    """The `limit` most recent studies, jobs and outbox as tables; with `study`, that study's jobs and why each
    series was (not) chosen."""
    store = open_store(state)
    if study is not None:
        return study_text(store, study)
    studies = store.recent(limit)
    jobs, outbox, total = store.summary()
    now = time.time()
    study_rows = [(uid, st, n, done, gen, f"{now - last:.0f} s ago", reason[:60])
                  for uid, st, n, done, gen, reason, last in studies]
    shown = f"Studies (the {len(studies)} most recent of {total})" if total > len(studies) else "Studies"
    parts = [shown, _table(["study", "state", "instances", "processed", "generation", "last instance", "reason"],
                           study_rows),
             "", "Jobs", _table(["state", "count"], jobs),
             "", "Outbox", _table(["destination", "state", "items", "max attempts", "last error"],
                                  [(d, s, n, a, (e or "")[:60]) for d, s, n, a, e in outbox])]
    return "\n".join(parts)


def study_text(store: Store, study: str) -> str:
    row = store.study(study)
    if row is None:
        raise ConfigError(f"study {study}: not known to this node")
    jobs = [(g, st, n, (reason or "")[:90]) for g, st, n, reason in store.jobs(study)]
    series = [(d.get("description") or "-", d.get("images"), "yes" if d.get("chosen") else "",
               _share(d.get("liver_share")), d.get("reason", "")) for d in store.last_series(study)]
    return "\n".join([f"Study {study}: {row.state}, {row.instances} instances, generation {row.generation}"
                      + (f": {row.reason}" if row.reason else ""),
                      "", "Jobs", _table(["generation", "state", "instances", "reason"], jobs),
                      "", "Series (last finished job)",
                      _table(["description", "images", "chosen", "liver", "reason"], series)])


def _share(share) -> str:
    return "" if share is None else f"{100 * share:.0f} %"


def check_study(study_dir: Path, cfg_path: Path | None, overrides: dict | None = None) -> tuple[bool, str]:
    """The series decision for a study folder, as the node would make it (site rules and the model's coverage
    pass included), without segmenting it: a rule tester."""
    from livernode.config import load_daemon_config
    from livernode.daemon.coverage import coverage_pass
    from livernode.daemon.select import NoUsableSeries, select_series
    from livernode.errors import InputError
    from livernode.imaging.dicomio import dicom_files, read_dataset
    from livernode.inference.runner import Segmenter

    cfg = load_daemon_config(cfg_path, overrides)
    if cfg.inference.model is None:
        raise ConfigError("no model: set inference.model in the config or pass --model (the coverage pass runs it)")
    headers, unreadable = [], []
    for path in dicom_files(Path(study_dir)):
        try:
            headers.append((str(path), read_dataset(path, pixels=False)))
        except InputError as exc:
            unreadable.append(str(exc))
    if not headers:
        raise ConfigError(f"{study_dir}: no readable DICOM files")
    seg = Segmenter(cfg.inference.model, providers=cfg.inference.providers)
    rules = cfg.selection
    try:
        chosen, decisions = select_series(headers, rules, coverage_pass(seg, rules.coverage_step_mm))
    except NoUsableSeries as exc:
        chosen, decisions = [], exc.decisions
    rows = [(d.description or "-", d.images, f"{d.slice_thickness_mm:g} mm" if d.slice_thickness_mm else "",
             d.kernel or "-", _share(d.liver_share), "yes" if d.chosen else "", d.reason) for d in decisions]
    text = _table(["description", "images", "thickness", "kernel", "liver", "chosen", "reason"], rows)
    rule_text = f"prefer {list(rules.prefer)}, avoid {list(rules.avoid)}, segment_all {rules.segment_all}"
    extra = f"\n{len(unreadable)} unreadable file(s), first: {unreadable[0]}" if unreadable else ""
    return bool(chosen), f"{text}\n\nrules: {rule_text}; {len(chosen)} series would be segmented{extra}"


def purge(cfg_path: Path | None, state: Path | None, dry_run: bool) -> str:
    """`livernode purge`: apply the retention policy of the config once (as the daemon does on its timer)."""
    from livernode.config import load_daemon_config
    from livernode.daemon.metrics import AuditLog
    from livernode.daemon.retention import Retention

    cfg = load_daemon_config(cfg_path)
    folder = Path(state) if state is not None else Path(cfg.paths.state)
    store = open_store(folder)
    obs = cfg.observability
    audit = AuditLog(folder / obs.audit_log if obs.audit_log is not None else None,
                     max_bytes=int(obs.audit_max_mb * 1e6), backups=obs.audit_backups)
    report = Retention(cfg.retention, store, folder, audit).purge(dry_run=dry_run)
    rows = [(uid, why) for uid, why in report.studies]
    return f"{report.summary()}\n" + (_table(["study", "why"], rows) if rows else "nothing is due")


def retry(state: Path, study_uid: str) -> str:
    """Re-queue a study's dead or pending sends for an immediate attempt; when nothing is owed (a failed study,
    or one delivered long ago), reprocess it."""
    store = open_store(state)
    row = store.study(study_uid)
    if row is None:
        raise ConfigError(f"study {study_uid}: not known to this node")
    requeued = store.requeue_outbox(study_uid)
    if requeued == 0 or row.state == "failed":  # nothing left to send, or no result at all: produce them again
        store.requeue_study(study_uid)
        sending = f"; {requeued} earlier outbox item(s) queued for sending again" if requeued else ""
        return f"study {study_uid}: queued for reprocessing{sending}"
    return f"study {study_uid}: {requeued} outbox item(s) queued for sending again"


def echo(target: str, calling_ae: str = "LIVERNODE", timeout: float = 10) -> tuple[bool, str]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    dest = Destination.parse(target)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    t = time.perf_counter()
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        return False, f"{dest}: association {'rejected' if assoc.is_rejected else 'failed'}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    ms = 1000 * (time.perf_counter() - t)
    code = getattr(status, "Status", None)
    if code != 0x0000:
        return False, f"{dest}: C-ECHO answered {'nothing' if code is None else f'0x{code:04X}'}"
    return True, f"{dest}: C-ECHO succeeded in {ms:.0f} ms"


_TF_GPUS = ("import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'; import tensorflow as tf; "
            "print(tf.__version__); [print(d.name) for d in tf.config.list_physical_devices('GPU')]")


def training_gpus() -> tuple[str, list[str]] | None:
    """(TensorFlow version, the GPUs it sees) when the train extra is installed, else None. Asked in a child
    process: the daemon itself never imports TensorFlow."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("tensorflow") is None:
        return None
    try:
        r = subprocess.run([sys.executable, "-c", _TF_GPUS], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = r.stdout.split()
    return (lines[0], lines[1:]) if r.returncode == 0 and lines else None


def _training_line() -> str:
    found = training_gpus()
    if found is None:
        return "  tensorflow: not installed (training needs the 'train' extra)"
    version, gpus = found
    return f"  tensorflow {version} (GPUs for training: {', '.join(gpus) if gpus else 'none'})"


def version_text() -> str:
    import numpy
    import onnxruntime
    import pydicom
    import pynetdicom

    return (f"livernode {__version__}\n  onnxruntime {onnxruntime.__version__} "
            f"(providers: {', '.join(onnxruntime.get_available_providers())})\n"
            f"{_training_line()}\n"
            f"  pydicom {pydicom.__version__}, pynetdicom {pynetdicom.__version__}, numpy {numpy.__version__}")


def check(cfg_path: Path | None, overrides: dict | None = None) -> tuple[bool, str]:
    """Validate the config, load the model, list providers, check the ports, C-ECHO every destination."""
    import socket

    from livernode.config import load_daemon_config
    from livernode.errors import LivernodeError
    from livernode.inference.runner import Segmenter

    rows: list[tuple[str, str, str]] = []

    def add(what: str, ok: bool, detail: str) -> bool:
        rows.append((what, "pass" if ok else "FAIL", detail))
        return ok

    try:
        cfg = load_daemon_config(cfg_path, overrides)
        add("config", True, str(cfg_path or "defaults"))
    except LivernodeError as exc:
        add("config", False, str(exc))
        return False, _table(["check", "result", "detail"], rows)
    if cfg.inference.model is None:
        add("model", False, "inference.model is not set")
    else:
        try:
            seg = Segmenter(cfg.inference.model, providers=cfg.inference.providers)
            m = seg.manifest
            add("model", True, f"{cfg.inference.model.name}: {m.architecture.name} {m.architecture.backbone}, "
                f"{m.input.preferred_size} px, trained on {m.training_data}, sha256 {m.weights_sha256[:12]}"
                + (f"; {m.research_use}" if m.research_use else ""))
            add("providers", True, ", ".join(seg.providers_used))
        except LivernodeError as exc:
            add("model", False, str(exc))
    found = training_gpus()  # informational: the node itself never needs TensorFlow
    if found is not None:
        add("training GPUs", True, f"TensorFlow {found[0]} sees {len(found[1])}: {', '.join(found[1]) or 'none'}")
    for what, host, port in (("dicom port", cfg.node.bind, cfg.node.port),
                             ("metrics port", cfg.observability.metrics_bind, cfg.observability.metrics_port)):
        if port is None:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
                add(what, True, f"{host}:{port} is free")
            except OSError as exc:
                add(what, False, f"{host}:{port}: {exc.strerror}")
    state = Path(cfg.paths.state)
    add("state folder", state.exists() or state.parent.exists(), str(state.resolve()))
    for d in cfg.send.destinations:
        dest = Destination.from_config(d)
        ok, text = echo(str(dest)) if dest.tls is None else (True, f"{dest}: TLS destination, not echoed")
        add(f"destination {dest}", ok, text)
    ok = all(r[1] == "pass" for r in rows)
    return ok, _table(["check", "result", "detail"], rows)
