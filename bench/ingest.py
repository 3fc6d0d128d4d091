"""Benchmark part 2, ingest: instances per second received by `livernode serve` (durable: every instance
checked, fsynced, renamed, its directory fsynced and indexed before it is acknowledged) against dcmtk storescp
(which does not fsync), with the same files and the same sender, dcmtk storescu, over 1 and 4 simultaneous
associations. Every dcmtk tool runs with TCP_NODELAY=1.

Two more receivers explain the gap. bench/bare_scp.py is the floor of any pynetdicom receiver: it writes each
instance durably in the same way and does nothing else (no checks, no index, no audit). bench/raw_scp.py writes
the same way on livernode's own upper layer (livernode/daemon/upper_layer.py), which the node's receivers use:
the difference between it and the node is the node's own steps per instance.

livernode runs with one receiver process (`--workers 1`, in the node's own process) and with two (`--workers 2`,
receivers.py), and the CPU seconds the node's processes spend per instance (from /proc, all of them together)
give the projection for more cores: with the work CPU-bound and spread over N receivers on N cores, N divided by
the CPU seconds per instance, with the sender on the same machine (its own CPU seconds per instance added, as
here) and with the sender elsewhere (a PACS on its own machine). The same CPU per instance bounds what 2
processes could gain over 1 here (`ceiling_2_processes_vs_1`, with 4 associations): at most a core each, and no
more than this machine's cores shared with storescu, against what 1 process reached (whose threads share one
interpreter lock)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from pathlib import Path

from bench.common import ENV, PY, free_port, log, stop, storescp, storescu, wait_port

REPEATS = 2
CORES = len(os.sched_getaffinity(0))  # the cores this process (and what it starts) may run on


def _storescp(out: Path, port: int) -> subprocess.Popen:
    out.mkdir(parents=True)
    return storescp(out, port, "--fork", aet="LIVERNODE")


def _floor(script: str):
    """A starter for one of the floors (bench/bare_scp.py, bench/raw_scp.py): `python SCRIPT OUT PORT`."""
    def start(out: Path, port: int) -> subprocess.Popen:
        return subprocess.Popen([PY, str(Path(__file__).with_name(script)), str(out), str(port)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return start


def _livernode(state: Path, port: int, model: Path, workers: int) -> subprocess.Popen:
    # A long quiet period: the study is not processed while the benchmark measures reception alone.
    return subprocess.Popen([PY, "-m", "livernode.cli", "serve", "--model", str(model), "--providers", "cpu",
                             "--state", str(state), "--port", str(port), "--bind", "127.0.0.1",
                             "--study-timeout", "3600", "--metrics-port", "0", "--workers", str(workers)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for t in os.listdir(f"/proc/{p}/task")
                     for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of `pids` so far."""
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _ready(proc: subprocess.Popen, workers: int) -> None:
    """Wait until the node's receivers have started (the parent binds first; a connection waits meanwhile, which
    would count start-up time as reception)."""
    import time

    end = time.monotonic() + 60
    while len(_tree(proc.pid)) < (1 if workers == 1 else workers + 2) and time.monotonic() < end:
        time.sleep(0.1)  # the receivers and multiprocessing's resource tracker
    time.sleep(1.0)  # their imports and the server thread


def _receive(peer: str, start, files: list[Path], parallel: int, out: Path, cpu: dict | None = None) -> float:
    """Seconds for storescu to send `files` to a fresh receiver; checks that all of them were stored. `cpu` gets
    the CPU seconds of the receiver's processes and of the senders during the transfer."""
    port = free_port()
    proc = start(out, port)
    try:
        wait_port(port, proc)
        if cpu is not None:
            _ready(proc, cpu["workers"])
            pids = _tree(proc.pid)
            before, sent_before = _cpu_s(pids), resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds = storescu(port, files, parallel)
        if cpu is not None:
            sent = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu["receiver_s"] = _cpu_s(pids) - before
            cpu["sender_s"] = sent.ru_utime + sent.ru_stime - sent_before.ru_utime - sent_before.ru_stime
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
    peers = (("storescp", _storescp), ("bare pynetdicom", _floor("bare_scp.py")), ("raw socket", _floor("raw_scp.py")),
             ("livernode", lambda d, p: _livernode(d, p, model, 1)),
             ("livernode 2 processes", lambda d, p: _livernode(d, p, model, 2)))
    rows = []
    for parallel in (1, 4):
        seconds = {peer: float("inf") for peer, _ in peers}
        cpu: dict[str, dict] = {}
        for i in range(REPEATS):
            for peer, start in peers:
                # CPU seconds of every receiver but storescp, whose forked children are gone when it is read
                use = {"workers": 2 if "2 processes" in peer else 1} if peer != "storescp" else None
                took = _receive(peer, start, files, parallel, work / f"ingest-{peer.replace(' ', '-')}-{parallel}-{i}",
                                use)
                if took < seconds[peer]:
                    seconds[peer] = took
                    if use is not None:
                        cpu[peer] = use
        for peer, _ in peers:
            log(f"ingest: {peer}, {parallel} association(s): {len(files) / seconds[peer]:.0f} instances/s")
        n = len(files)
        recv2, send2 = cpu["livernode 2 processes"]["receiver_s"] / n, cpu["livernode 2 processes"]["sender_s"] / n
        rows.append({"associations": parallel, "instances": n,
                     "storescp_per_s": n / seconds["storescp"],
                     "livernode_per_s": n / seconds["livernode"],
                     "livernode_2_processes_per_s": n / seconds["livernode 2 processes"],
                     "bare_pynetdicom_per_s": n / seconds["bare pynetdicom"],
                     "raw_socket_per_s": n / seconds["raw socket"],
                     "ratio_raw_socket_vs_storescp": seconds["storescp"] / seconds["raw socket"],
                     "ratio_bare_pynetdicom_vs_storescp": seconds["storescp"] / seconds["bare pynetdicom"],
                     "ratio_vs_bare_pynetdicom": seconds["bare pynetdicom"] / seconds["livernode"],
                     "ratio_vs_storescp": seconds["storescp"] / seconds["livernode"],
                     "ratio_2_processes_vs_storescp": seconds["storescp"] / seconds["livernode 2 processes"],
                     "ratio_2_processes_vs_1": seconds["livernode"] / seconds["livernode 2 processes"],
                     "cpu_ms_per_instance": {peer: {"node": 1000 * c["receiver_s"] / n, "sender": 1000 * c["sender_s"] / n}
                                             for peer, c in cpu.items()},
                     # N cores, CPU-bound: N / CPU seconds per instance (2 processes' profile)
                     "projected_per_s": {str(cores): {"sender_on_the_same_machine": cores / (recv2 + send2),
                                                      "sender_elsewhere": cores / recv2}
                                         for cores in (2, 4, 8)},
                     # the most 2 processes could gain over 1 on this machine (with more than one association): a
                     # core each, but no more than the cores the node shares with storescu, at the measured CPU
                     # per instance, against what 1 process reached
                     **({"ceiling_2_processes_vs_1": min(2 / recv2, CORES / (recv2 + send2))
                         / (n / seconds["livernode"])} if parallel > 1 else {})})
    return rows
