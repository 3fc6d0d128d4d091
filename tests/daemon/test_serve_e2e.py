"""End to end with real peers on loopback: dcmtk storescu -> livernode serve -> dcmtk storescp as PACS,
and the same through the watched folder."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests import peers
from tests.peers import ENV, free_port, stop_node, wait_for, wait_port

pytestmark = pytest.mark.slow


def start_node(tmp_path, model, *args):
    return peers.start_node(tmp_path / "state", model, *args)


def received(out: Path):
    return peers.at_pacs(out, 2)


def check_results(files, study_dir: Path, model: Path, tmp_path: Path) -> None:
    by_modality = {pydicom.dcmread(f, stop_before_pixels=True).Modality: f for f in files}
    assert set(by_modality) == {"SEG", "SR"}
    for f in files:
        r = subprocess.run(["/usr/bin/dciodvfy", str(f)], capture_output=True, text=True)
        assert not [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")], f
    ct = pydicom.dcmread(next((study_dir / "ct").glob("*.dcm")), stop_before_pixels=True)
    seg = hd.seg.segread(by_modality["SEG"])
    assert seg.StudyInstanceUID == ct.StudyInstanceUID
    # the same study through `livernode infer` gives the same masks
    ref_out = tmp_path / "infer"
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "infer", str(study_dir / "ct"), "--model", str(model),
                        "--out", str(ref_out), "--providers", "cpu"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = hd.seg.segread(ref_out / "seg.dcm")
    uids = [str(u[2]) for u in ref.get_source_image_uids()]
    a = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    b = ref.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    assert a.any() and np.array_equal(a, b)  # something was segmented, and it is the same


def test_cstore_in_seg_and_sr_out(tmp_path, exported, trained_run, pacs):
    root, _ = trained_run
    pacs_port, pacs_out = pacs
    port, metrics_port = free_port(), free_port()
    node = start_node(tmp_path, exported, "--port", str(port), "--destination", f"PACS@127.0.0.1:{pacs_port}",
                      "--metrics-port", str(metrics_port))
    try:
        wait_port(port, node)
        study = root / "data" / "case_002"
        files = sorted((study / "ct").glob("*.dcm"))
        r = subprocess.run(["/usr/bin/storescu", "-aec", "LIVERNODE", "127.0.0.1", str(port), *map(str, files)],
                           capture_output=True, text=True, env=ENV, timeout=120)
        assert r.returncode == 0, r.stderr
        got = wait_for(lambda: received(pacs_out), 180, "SEG and SR at the PACS")
        import urllib.request

        def scrape():
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            return text if 'livernode_send_attempts_total{destination=' in text else None
        metrics = wait_for(scrape, 30, "send metrics")
        health_status, health = peers.scrape(metrics_port, "/healthz")
    finally:
        err = stop_node(node)
    check_results(got, study, exported, tmp_path)
    assert "delivered to PACS" in err
    assert f'livernode_instances_received_total{{source="c-store"}} {float(len(files))}' in metrics
    assert 'livernode_stage_seconds_count{stage="infer"} 1.0' in metrics
    assert 'livernode_studies{state="done"} 1.0' in metrics
    assert "livernode_model_info{" in metrics
    assert health_status == 200, health
    checks = json.loads(health)["checks"]
    assert sorted(checks) == ["index", "listener", "model", "retention", "sender", "spool", "worker"]
    assert all(c["ok"] for c in checks.values()) and f"127.0.0.1:{port}" in checks["listener"]["detail"]
    audit = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    events = [a["event"] for a in audit]
    assert events.count("instance_received") == len(files)
    assert "association_accepted" in events and "result_sent" in events


def test_watched_folder_in_results_out(tmp_path, exported, trained_run):
    root, _ = trained_run
    watch, output = tmp_path / "inbox", tmp_path / "results"
    node = start_node(tmp_path, exported, "--watch", str(watch), "--output", str(output))
    try:
        study = root / "data" / "case_003"
        deep = watch / "a" / "b"
        deep.mkdir(parents=True)
        for f in (study / "ct").glob("*.dcm"):
            shutil.copy(f, deep / f.name)
        (watch / "notes.txt").write_text("not DICOM")

        def done():
            return [p for p in output.rglob("seg.dcm")] if output.exists() else None
        wait_for(done, 180, "results in the output folder")
    finally:
        err = stop_node(node)
    result_dir = next(output.rglob("seg.dcm")).parent
    assert {p.name for p in result_dir.iterdir()} >= {"seg.dcm", "sr.dcm", "summary.json", "preview.png"}
    check_results([result_dir / "seg.dcm", result_dir / "sr.dcm"], study, exported, tmp_path)
    rejected = tmp_path / "state" / "rejected"
    reasons = list(rejected.glob("*.reason"))
    assert len(reasons) == 1 and "notes.txt" in reasons[0].read_text(), err
    assert not list(watch.rglob("*.dcm"))  # every instance was taken into the spool
