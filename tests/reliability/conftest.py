"""Reliability tests record the figures they measure; RELIABILITY.md quotes them. The figures of the last run are
written to build/reliability-figures.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.peers import make_pki

FIGURES: dict[str, dict] = {}
OUT = Path(__file__).resolve().parents[2] / "build" / "reliability-figures.json"


@pytest.fixture()
def figure(request):
    """figure(name, value): record a measured figure under the test's name."""
    def record(name: str, value) -> None:
        FIGURES.setdefault(request.node.name, {})[name] = value
    return record


def pytest_sessionfinish(session, exitstatus):
    if FIGURES:
        OUT.parent.mkdir(exist_ok=True)
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
