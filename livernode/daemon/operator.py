"""Operator commands: status tables, retry, C-ECHO, version. They read the same state folder the node uses."""

from __future__ import annotations

import time
from pathlib import Path

from livernode import __version__
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


def status_text(state: Path) -> str:
    store = open_store(state)
    with store.transaction() as db:
        studies = db.execute("SELECT study_instance_uid, state, instances, processed_instances, generation, reason, "
                             "last_received_at FROM studies ORDER BY last_received_at DESC").fetchall()
        jobs = db.execute("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state").fetchall()
        outbox = db.execute("SELECT destination, state, count(*), max(attempts), max(last_error) FROM outbox "
                            "GROUP BY destination, state ORDER BY destination, state").fetchall()
    now = time.time()
    study_rows = [(uid, st, n, done, gen, f"{now - last:.0f} s ago", reason[:60])
                  for uid, st, n, done, gen, reason, last in studies]
    parts = ["Studies", _table(["study", "state", "instances", "processed", "generation", "last instance",
                                "reason"], study_rows),
             "", "Jobs", _table(["state", "count"], jobs),
             "", "Outbox", _table(["destination", "state", "items", "max attempts", "last error"],
                                  [(d, s, n, a, (e or "")[:60]) for d, s, n, a, e in outbox])]
    return "\n".join(parts)


def retry(state: Path, study_uid: str) -> str:
    """Reprocess a study (failed or done) and re-queue its dead or pending sends for an immediate attempt."""
    store = open_store(state)
    with store.transaction() as db:
        found = db.execute("SELECT count(*) FROM studies WHERE study_instance_uid = ?", (study_uid,)).fetchone()[0]
        if not found:
            raise ConfigError(f"study {study_uid}: not known to this node")
        requeued = db.execute("UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = 0 "
                              "WHERE study_instance_uid = ? AND state IN ('dead', 'pending')", (study_uid,)).rowcount
        if requeued == 0:  # nothing left to send: produce the results again
            db.execute("UPDATE studies SET processed_instances = 0, state = 'receiving', last_received_at = 0 "
                       "WHERE study_instance_uid = ?", (study_uid,))
            return f"study {study_uid}: queued for reprocessing"
    return f"study {study_uid}: {requeued} outbox item(s) queued for sending again"


def echo(target: str, calling_ae: str = "LIVERNODE", timeout: float = 10) -> tuple[bool, str]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    dest = Destination.parse(target)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
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


def version_text() -> str:
    import numpy
    import onnxruntime
    import pydicom
    import pynetdicom

    return (f"livernode {__version__}\n  onnxruntime {onnxruntime.__version__} "
            f"(providers: {', '.join(onnxruntime.get_available_providers())})\n"
            f"  pydicom {pydicom.__version__}, pynetdicom {pynetdicom.__version__}, numpy {numpy.__version__}")
