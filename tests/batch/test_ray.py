"""`livernode batch` on Ray, without GPUs and on loopback only: `--ray local` through the real command line, and a
cluster of two simulated machines that each declare one GPU (`ray.cluster_utils.Cluster`, every node on 127.0.0.1,
token authentication on). Ray is imported only inside the tests, after the environment that keeps it on loopback
is set (`livernode.raycluster.connect` explains why)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from livernode import raycluster
from livernode.batch import CSV_NAME, MARKER, run_batch
from livernode.raycluster import listeners, listeners_beyond_loopback, process_tree
from tests.batch.conftest import read_rows

pytestmark = pytest.mark.ray
SAME = ("series", "liver_ml", "tumour_ml", "burden_percent", "lesions", "slices")
# One token for the whole module, as an operator has one: a process keeps the first token it loads.
TOKEN = secrets.token_hex(32)


def serves_jobs_api(port: int) -> bool:
    """True when something on 127.0.0.1:`port` answers Ray's job-listing request with JSON (the Jobs API)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=0.5) as r:
            json.loads(r.read())
            return True
    except Exception:  # refused, an HTTP error, a gRPC port answering in HTTP/2, a body that is not JSON
        return False


def published(out: Path) -> list[Path]:
    return sorted(out.glob(f"[!.]*/{MARKER}"))


def test_ray_local_gives_the_results_of_local_processes(archive, liver_model, tmp_path):
    """`--ray local` on four studies: the same series, volumes, lesions and SEG pixels as local processes; while it
    runs, every socket of the Ray processes listens on 127.0.0.1 and none serves the Jobs API; the token Ray
    checks is one it generated for this machine."""
    root = archive.subset(tmp_path / "in", set(archive.good[:4]))
    local = run_batch(root, liver_model, tmp_path / "local", progress=False)
    assert local.done == 4
    home, out = tmp_path / "home", tmp_path / "ray"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)  # where Ray writes the token it generates
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen([sys.executable, "-m", "livernode.cli", "batch", str(root), "--model",
                                 str(liver_model), "--out", str(out), "--ray", "local", "--workers", "2"],
                                stdout=so, stderr=se, env=env)
        seen, jobs_api = set(), []
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                now = listeners(proc.pid)
                seen.update(now)
                if now and published(out) and not jobs_api:  # the actors are at work
                    jobs_api = [serves_jobs_api(port) for _, port, _, _ in now]
                time.sleep(0.1)
            assert proc.wait(timeout=60) == 0, (tmp_path / "stderr").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    names = {name for _, _, _, name in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # the check did see Ray's servers
    assert [s for s in seen if not (s[0].startswith("127.") or s[0].startswith("::ffff:127."))] == []
    assert jobs_api and not any(jobs_api)
    assert (home / ".ray" / "auth_token").stat().st_size > 0
    rows, ray_rows = read_rows(local.csv_path), read_rows(out / CSV_NAME)
    assert [{k: r[k] for k in SAME} for r in ray_rows] == [{k: r[k] for k in SAME} for r in rows]
    assert {r["status"] for r in ray_rows} == {"done"} and all(" actor " in r["worker"] for r in ray_rows)
    for r in rows:
        a, b = (pydicom.dcmread(d / r["study"] / "seg.dcm") for d in (tmp_path / "local", out))
        assert a.PixelData == b.PixelData and a.NumberOfFrames == b.NumberOfFrames


@pytest.fixture()
def cluster(monkeypatch):
    """A head and a second node, each with 1 CPU and 1 simulated GPU, on 127.0.0.1, with a token in the
    environment as an operator would set it."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: see raycluster.connect
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    c = Cluster()
    try:
        c.add_node(node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=1, num_gpus=1)
        second = c.add_node(node_ip_address="127.0.0.1", num_cpus=1, num_gpus=1)
        c.wait_for_nodes()
        yield c, second
    finally:
        c.shutdown()


def test_one_actor_per_gpu_on_each_machine(cluster, archive, liver_model, tmp_path, monkeypatch):
    """Placement: two actors, one per simulated GPU, on different nodes, each with its GPU in
    CUDA_VISIBLE_DEVICES; ONNX Runtime runs on the CPU there. The studies are decoded in other processes (CPU
    tasks), and with one study in flight per actor no more than two are ever between decoding and results. Nothing
    listens beyond loopback, and a client with another token is turned away."""
    c, _ = cluster
    monkeypatch.setattr(raycluster, "IN_FLIGHT_PER_ACTOR", 1)
    root = archive.subset(tmp_path / "in", set(archive.good[:6]))
    report = run_batch(root, liver_model, tmp_path / "out", ray_address=c.address, progress=False)
    assert report.done == 6
    assert report.peak_in_flight == 2
    assert len(report.workers) == 2
    assert len({w["node_id"] for w in report.workers}) == 2
    for w in report.workers:
        assert len(w["gpu_ids"]) == 1 and w["cuda_visible_devices"] == str(w["gpu_ids"][0])
        assert w["providers"] == ["CPUExecutionProvider"]
    rows = read_rows(report.csv_path)
    assert {r["worker"] for r in rows} <= {w["worker"] for w in report.workers}
    decoders = {int(r["decoded_on"].split(":")[1]) for r in rows}
    assert decoders and not decoders & {w["pid"] for w in report.workers}
    assert all(float(r["select_s"]) > 0 and float(r["infer_s"]) > 0 for r in rows)
    assert {r["providers"] for r in rows} == {"CPUExecutionProvider"}
    assert {name for _, _, _, name in listeners(os.getpid())} >= {"gcs_server", "raylet"}
    assert listeners_beyond_loopback(os.getpid()) == []

    env = dict(os.environ, RAY_AUTH_TOKEN=secrets.token_hex(32))
    probe = subprocess.Popen([sys.executable, "-c", f"import ray; ray.init(address='{c.address}'); print('joined')"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        refused = ""
        for line in probe.stdout:  # Ray retries for 20 s; the first refusal is enough
            if "Unauthenticated" in line or "joined" in line:
                refused = line
                break
        assert "InvalidAuthToken" in refused, refused
    finally:
        probe.kill()
        probe.wait(timeout=30)


def test_a_machine_lost_mid_batch(cluster, archive, liver_model, tmp_path, monkeypatch, caplog):
    """The second node goes away as the driver hands its actor a second study (the first may still be running
    there): what it held runs again on the other actor, and every study (six good, two broken) ends exactly once,
    in studies.csv and in the output folder. The moment is taken from the driver itself; a study on these small
    volumes takes tens of milliseconds, too short to be caught from outside."""
    c, second = cluster
    keys = set(archive.good[:6]) | {archive.not_ct, archive.too_few}
    root = archive.subset(tmp_path / "in", keys)
    out = tmp_path / "out"
    raylet = second.all_processes["raylet"][0].process.pid
    state: dict = {"handed": 0}
    caplog.set_level("INFO", logger=raycluster.log.name)

    def on_second(n: int) -> bool:
        """Actor `n` runs on the second node (its process is the raylet's): from its "ready" log line."""
        for r in caplog.records:
            if r.getMessage().startswith(f"Ray actor {n} ready: "):
                return int(r.args[1].split(":")[1].split()[0]) in process_tree(raylet)
        return False

    class Handed(raycluster._Flight):
        def __setattr__(self, name, value):
            if name == "actor" and value >= 0 and "removed" not in state and on_second(value):
                state["handed"] += 1
                if state["handed"] == 2:
                    state["beyond_loopback"] = listeners_beyond_loopback(os.getpid())  # the driver connected too
                    c.remove_node(second)
                    state["removed"] = True
            super().__setattr__(name, value)

    monkeypatch.setattr(raycluster, "_Flight", Handed)
    report = run_batch(root, liver_model, out, ray_address=c.address, progress=False)
    assert state.get("removed"), f"the second node's actor was handed {state['handed']} studies, not 2"
    assert state["beyond_loopback"] == []
    rows = read_rows(report.csv_path)
    assert sorted(r["study"] for r in rows) == sorted(keys)  # each study once
    status = {r["study"]: r["status"] for r in rows}
    assert {status[k] for k in archive.good[:6]} == {"done"}
    assert status[archive.not_ct] == status[archive.too_few] == "failed"
    assert sorted(m.parent.name for m in published(out)) == sorted(archive.good[:6])
    assert max(int(r["attempts"]) for r in rows) >= 2  # a study lost with the node ran again
    assert report.processed == 8
