"""Benchmark part 2, ingest: instances per second received by `livernode serve` (durable: every instance
checked, fsynced, renamed, its directory fsynced and indexed before it is acknowledged) against dcmtk storescp
(which does not fsync), with the same files and the same sender, dcmtk storescu, over 1 and 4 simultaneous
associations. Every dcmtk tool runs with TCP_NODELAY=1.

A third receiver explains the gap: the floor of any pynetdicom receiver, bench/bare_scp.py, which writes each
instance durably in the same way and does nothing else (no checks, no index, no audit)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench.common import ENV, PY, free_port, log, stop, storescu, wait_port

REPEATS = 2


def _storescp(out: Path, port: int) -> subprocess.Popen:
    out.mkdir(parents=True)
    return subprocess.Popen(["/usr/bin/storescp", "--fork", "-aet", "LIVERNODE", "-od", str(out), str(port)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _bare(out: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([PY, str(Path(__file__).with_name("bare_scp.py")), str(out), str(port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _livernode(state: Path, port: int, model: Path) -> subprocess.Popen:
    # A long quiet period: the study is not processed while the benchmark measures reception alone.
    return subprocess.Popen([PY, "-m", "livernode.cli", "serve", "--model", str(model), "--providers", "cpu",
                             "--state", str(state), "--port", str(port), "--bind", "127.0.0.1",
                             "--study-timeout", "3600", "--metrics-port", "0"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _receive(peer: str, start, files: list[Path], parallel: int, out: Path) -> float:
    """Seconds for storescu to send `files` to a fresh receiver; checks that all of them were stored."""
    port = free_port()
    proc = start(out, port)
    try:
        wait_port(port, proc)
        seconds = storescu(port, files, parallel)
    finally:
        stop(proc)
    spool = out / "spool" / "instances"
    received = list(spool.rglob("*.dcm")) if spool.exists() else [p for p in out.iterdir() if p.is_file()]
    if len(received) != len(files):
        raise RuntimeError(f"{peer} stored {len(received)} of {len(files)} instances")
    shutil.rmtree(out)
    return seconds


def run(files: list[Path], model: Path, work: Path) -> list[dict]:
    """Best of REPEATS rounds; each round runs every receiver once, so a burst of load hits all of them."""
    peers = (("storescp", _storescp), ("bare pynetdicom", _bare), ("livernode", lambda d, p: _livernode(d, p, model)))
    rows = []
    for parallel in (1, 4):
        seconds = {peer: float("inf") for peer, _ in peers}
        for i in range(REPEATS):
            for peer, start in peers:
                took = _receive(peer, start, files, parallel, work / f"ingest-{peer}-{parallel}-{i}")
                seconds[peer] = min(seconds[peer], took)
        for peer, _ in peers:
            log(f"ingest: {peer}, {parallel} association(s): {len(files) / seconds[peer]:.0f} instances/s")
        rows.append({"associations": parallel, "instances": len(files),
                     "storescp_per_s": len(files) / seconds["storescp"],
                     "livernode_per_s": len(files) / seconds["livernode"],
                     "bare_pynetdicom_per_s": len(files) / seconds["bare pynetdicom"],
                     "ratio_bare_pynetdicom_vs_storescp": seconds["storescp"] / seconds["bare pynetdicom"],
                     "ratio_vs_bare_pynetdicom": seconds["bare pynetdicom"] / seconds["livernode"],
                     "ratio_vs_storescp": seconds["storescp"] / seconds["livernode"]})
    return rows
