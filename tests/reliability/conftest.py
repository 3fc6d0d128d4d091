"""Reliability tests record the figures they measure; RELIABILITY.md quotes them. The figures of the last run are
written to build/reliability-figures.json."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
from filelock import FileLock

from tests.peers import RECEIVERS, make_pki

FIGURES: dict[str, dict] = {}
OUT = Path(__file__).resolve().parents[2] / "build" / "reliability-figures.json"


@pytest.fixture()
def figure(request):
    """figure(name, value): record a measured figure under the test's name."""
    def record(name: str, value) -> None:
        FIGURES.setdefault(request.node.name, {})[name] = value
    return record


def pytest_sessionfinish(session, exitstatus):
    """Each pytest-xdist worker merges its own figures in: one at a time (a file lock), so none is lost."""
    if FIGURES:
        OUT.parent.mkdir(exist_ok=True)
        with FileLock(str(OUT) + ".lock"):
            previous = json.loads(OUT.read_text()) if OUT.exists() else {}
            previous.update(FIGURES)
            OUT.write_text(json.dumps(previous, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def scp(tmp_path):
    """The livernode C-STORE SCP in-process on a free loopback port, auditing to tmp_path/audit.jsonl."""
    from livernode.daemon.ingest_scp import StoreSCP
    from livernode.daemon.metrics import AuditLog
    from livernode.daemon.spool import Spool
    from livernode.daemon.store import Store

    server = StoreSCP("LIVERNODE", "127.0.0.1", 0, Spool(tmp_path / "spool"), Store(tmp_path / "index.sqlite"),
                      audit=AuditLog(tmp_path / "audit.jsonl"))
    server.start()
    yield server
    server.stop()


def audit_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def files_outside(root: Path, *allowed: Path) -> list[Path]:
    """Every file under `root` that is not inside one of `allowed`."""
    return [p for p in root.rglob("*") if p.is_file() and not any(a in p.parents for a in allowed)]


def db_rows(state: Path, query: str, *args) -> list:
    """Rows of a query on a node's index, read the way an operator's tool would (its own connection)."""
    with sqlite3.connect(state / "index.sqlite", timeout=30) as db:
        return db.execute(query, args).fetchall()


def settled(state: Path) -> bool:
    """Every study processed with all its instances and every result sent: nothing more can go out."""
    return bool(db_rows(state, "SELECT 1 FROM studies")) and not db_rows(
        state, "SELECT 1 FROM studies WHERE state != 'done' OR instances != processed_instances") and not db_rows(
        state, "SELECT 1 FROM outbox WHERE state != 'sent'") and not db_rows(
        state, "SELECT 1 FROM jobs WHERE state = 'running'")


@pytest.fixture(scope="session")
def long_study(tmp_path_factory) -> list[Path]:
    """A study of 120 slices of 128x128."""
    from livernode.imaging.synth import synthesize

    root = tmp_path_factory.mktemp("long")
    synthesize(root, cases=1, slices=120, size=128, seed=31, layout="dicom")
    return sorted((root / "case_000" / "ct").glob("*.dcm"))


@pytest.fixture()
def running_node(tmp_path, exported):
    """make(**config overrides) -> a Service running as `livernode serve` runs it (run_forever: worker, sender and
    watchdog threads), in this process, on loopback, with state in tmp_path/state and /metrics on a free port."""
    from livernode.config import load_daemon_config
    from livernode.daemon.service import Service

    made = []

    def make(**overrides):
        cfg = load_daemon_config(None, {
            "inference.model": exported, "inference.providers": "cpu", "node.port": 0, "node.bind": "127.0.0.1",
            "paths.state": tmp_path / "state", "study.quiet_seconds": 0.3, "observability.metrics_port": 0,
            "node.workers": int(RECEIVERS),
            **{k.replace("__", "."): v for k, v in overrides.items()}})
        service = Service(cfg)
        service.start()
        thread = threading.Thread(target=service.run_forever, kwargs={"poll_s": 0.1}, daemon=True)
        thread.start()
        made.append((service, thread))
        return service
    yield make
    for service, thread in made:
        service.stop()
        thread.join(60)
