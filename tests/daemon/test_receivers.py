"""Receiver processes (`node.workers` > 1): several processes accept on one port, write one spool and one index,
and count into one /metrics; a dead receiver is replaced, a dead node leaves none behind. dcmtk storescu and
storescp are the peers; the node is `livernode serve` in its own process."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from livernode.daemon.metrics import AuditLog
from livernode.fsutil import atomic_write
from livernode.imaging.synth import synthesize
from tests.peers import (at_pacs, free_port, log_text, metric, restamp, scrape, start_node, stop_node, storescu, wait_for,
                         wait_port)

pytestmark = pytest.mark.slow


def _receivers(node_pid: int) -> set[int]:
    """The node's receiver processes (its children running a multiprocessing spawn with our target), not its SR
    helper (named livernode-sr)."""
    out = set()
    for pid in subprocess.run(["pgrep", "-P", str(node_pid)], capture_output=True, text=True).stdout.split():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            comm = Path(f"/proc/{pid}/comm").read_bytes().strip()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmd and comm != b"livernode-sr":
            out.add(int(pid))
    return out


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie has stopped running
    except FileNotFoundError:
        return True


def _node(tmp_path: Path, exported: Path, pacs_port: int, port: int, *extra: str, log_format: str = "text"):
    metrics_port = free_port()
    node = start_node(tmp_path / "state", exported, "--port", str(port), "--workers", "2", "--metrics-port",
                      str(metrics_port), "--destination", f"PACS@127.0.0.1:{pacs_port}", *extra,
                      log_format=log_format)
    wait_port(port, node)
    wait_for(lambda: "served by 2 receiver processes" in log_text(node), 60, "both receivers accepting")
    return node, metrics_port


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[list[Path]]:
    root = tmp_path_factory.mktemp("receivers")
    synthesize(root / "src", cases=1, slices=8, size=64, seed=11, layout="dicom")
    template = sorted((root / "src" / "case_000" / "ct").glob("*.dcm"))
    return [restamp(template, root / f"study-{k}") for k in range(3)]


def test_two_receivers_store_every_instance_once_and_count_into_one_metrics(tmp_path, exported, pacs, studies):
    """Three studies over eight simultaneous associations, one of them sent twice at the same moment: every
    instance is on disk and in the index once, /metrics and the audit count each once, and both processes took
    associations."""
    pacs_port, pacs_out = pacs
    port = free_port()
    node, metrics_port = _node(tmp_path, exported, pacs_port, port)
    try:
        assert len(wait_for(lambda: len(r := _receivers(node.pid)) == 2 and r, 30, "two receivers")) == 2
        jobs = [files[i::2] for files in studies for i in range(2)] + [studies[0][::2], studies[0][1::2]]
        results: list[subprocess.CompletedProcess] = []
        threads = [threading.Thread(target=lambda f=f: results.append(storescu(port, f, check=False)))
                   for f in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.returncode for r in results] == [0] * len(jobs), [r.stderr[-500:] for r in results]
        wait_for(lambda: at_pacs(pacs_out, 2 * len(studies)), 180, "SEG and SR of the three studies")
        _, text = scrape(metrics_port)
        _, health = scrape(metrics_port, "/healthz")
    finally:
        err = stop_node(node)
    assert "Traceback" not in err, err[-3000:]
    unique = sum(len(files) for files in studies)
    with sqlite3.connect(tmp_path / "state" / "index.sqlite") as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT sop_instance_uid) FROM instances").fetchone() == \
            (unique, unique)
    assert len(list((tmp_path / "state" / "spool" / "instances").rglob("*.dcm"))) == unique
    assert not list((tmp_path / "state" / "spool").rglob("*.tmp"))
    assert metric(text, 'livernode_instances_received_total{source="c-store"}') == unique
    events = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "instance_received" for e in events) == unique
    accepted = [e for e in events if e["event"] == "association_accepted"]
    assert len(accepted) == len(jobs)
    assert len({e["process"] for e in accepted}) == 2, "one receiver took every association"
    assert "2 receiver processes" in json.loads(health)["checks"]["listener"]["detail"]


def test_a_dead_receiver_is_replaced_and_a_dead_node_leaves_none(tmp_path, exported, pacs, studies):
    pacs_port, pacs_out = pacs
    port = free_port()
    node, metrics_port = _node(tmp_path, exported, pacs_port, port)
    try:
        first = wait_for(lambda: len(r := _receivers(node.pid)) == 2 and r, 30, "two receivers")
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        now = wait_for(lambda: len(r := _receivers(node.pid)) == 2 and victim not in r and r, 30, "a new receiver")
        assert len(now & first) == 1
        wait_for(lambda: scrape(metrics_port, "/healthz")[0] == 200, 30, "a healthy listener again")
        storescu(port, studies[1])
        wait_for(lambda: at_pacs(pacs_out, 2), 120, "the study sent after the replacement")
        node.send_signal(signal.SIGKILL)
        node.wait(30)
        wait_for(lambda: all(_gone(p) for p in now), 10, "the receivers gone with the node")
        # nothing holds the port: a new node binds it at once and takes a study
        again, _ = _node(tmp_path, exported, pacs_port, port)
        try:
            storescu(port, studies[2])
            wait_for(lambda: at_pacs(pacs_out, 4), 120, "the study sent to the restarted node")
        finally:
            err = stop_node(again)
    finally:
        if node.poll() is None:
            stop_node(node)
    assert f"receiver process {victim} exited with status -9; starting another" in log_text(node)
    assert "Traceback" not in err, err[-3000:]


def test_a_reloaded_free_space_threshold_reaches_the_receivers(tmp_path, exported, pacs, studies):
    """SIGHUP with study.min_free_mb above the free space: the receivers answer 0xA700 (they read the threshold
    the node holds, not a copy made when they started). The node logs JSON, and so do its receivers."""
    pacs_port, _ = pacs
    port = free_port()
    config = tmp_path / "livernode.toml"
    config.write_text("[study]\nmin_free_mb = 0\n")
    node, _ = _node(tmp_path, exported, pacs_port, port, "--config", str(config), log_format="json")
    try:
        config.write_text("[study]\nmin_free_mb = 1e12\n")
        node.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in log_text(node), 30, "the reload")
        r = storescu(port, studies[0][:2], check=False)
    finally:
        log = stop_node(node)
    assert "Received Store Response (Refused: OutOfResources)" in r.stderr and "(Success)" not in r.stderr, \
        r.stderr[-2000:]
    # only receivers serve C-STORE here, so the refusals were logged by them: as JSON, like the node's own lines
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    refusals = [rec for rec in records if rec["logger"] == "livernode.daemon.ingest_scp" and
                "free space below the threshold" in rec["message"]]
    assert refusals and len(refusals) == r.stderr.count("Refused: OutOfResources"), log[-3000:]
    assert all(rec["level"] == "ERROR" for rec in refusals)
    assert not [line for line in log.splitlines() if "free space below" in line and not line.startswith("{")]
    assert any(rec["message"].startswith("C-STORE on 127.0.0.1") for rec in records)


def _write_all(paths: list[str], tag: bytes, out) -> None:
    out.put((tag, [atomic_write(Path(p), tag * 1000, replace=False) for p in paths]))


def _audit_lines(path: str, k: int) -> None:
    audit = AuditLog(Path(path), max_bytes=3000, backups=200)
    threads = [threading.Thread(target=lambda t=t: [audit.write("instance_received", n=k * 10000 + t * 1000 + i)
                                                    for i in range(100)]) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_two_processes_writing_one_path_store_it_once_and_audit_lines_are_never_lost(tmp_path):
    ctx = mp.get_context("spawn")
    paths = [str(tmp_path / "spool" / f"{i}.dcm") for i in range(60)]
    out = ctx.Queue()
    procs = [ctx.Process(target=_write_all, args=(paths, tag, out)) for tag in (b"a", b"b")]
    for p in procs:
        p.start()
    created = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert all(a != b for a, b in zip(created[b"a"], created[b"b"])), "a path was created by both, or by neither"
    for path, by_a in zip(paths, created[b"a"]):
        assert Path(path).read_bytes() == (b"a" if by_a else b"b") * 1000  # whole, from the one that created it
    assert not list((tmp_path / "spool").glob(".*"))

    procs = [ctx.Process(target=_audit_lines, args=(str(tmp_path / "audit.jsonl"), k)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    files = sorted(tmp_path.glob("audit.jsonl*"))
    numbers = [json.loads(line)["n"] for f in files for line in f.read_text().splitlines()]
    assert len(files) > 10 and all(f.stat().st_size <= 3000 for f in files)
    assert sorted(numbers) == sorted(k * 10000 + t * 1000 + i for k in range(2) for t in range(2) for i in range(100))
