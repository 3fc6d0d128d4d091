"""The node with `[inference] backend = "ray"`: dcmtk storescu -> livernode serve, whose worker hands studies to Ray
actors (a local Ray bound to 127.0.0.1, token authentication on) -> dcmtk storescp as PACS. After a SIGKILL of the
node mid-study nothing is delivered twice."""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.peers import at_pacs, free_port, restamp, start_node, stop_node, storescu, wait_for, wait_port
from tests.reliability.conftest import db_rows, settled

# Ray is not imported here: it reads RAY_AUTH_MODE once, when first imported, and tests/batch sets it for the
# clusters it starts in this process.
pytestmark = [pytest.mark.slow, pytest.mark.ray,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the ray extra is not installed")]

# The cluster's token for these tests: a local Ray would otherwise write one into ~/.ray of whoever runs them.
RAY_ENV = {"RAY_AUTH_TOKEN": secrets.token_hex(16)}
CONFIG = """
[inference]
backend = "ray"
ray_address = "local"
ray_actors = 2
"""


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "livernode.toml"
    path.write_text(CONFIG)
    return path


def _objects(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.is_file()] if out.is_dir() else []


def test_studies_go_through_ray_actors_and_come_back_to_the_pacs(tmp_path, exported, trained_run, pacs):
    from livernode.raycluster import listeners_beyond_loopback

    root, _ = trained_run
    pacs_port, pacs_out = pacs
    port, state = free_port(), tmp_path / "state"
    studies = [restamp(sorted((root / "data" / c / "ct").glob("*.dcm")), tmp_path / c) for c in ("case_001", "case_002")]
    node = start_node(state, exported, "--config", str(_config(tmp_path)), "--port", str(port), "--destination",
                      f"PACS@127.0.0.1:{pacs_port}", env=RAY_ENV)
    try:
        wait_port(port, node, timeout=180)  # READY once the actors have loaded the model
        beyond = listeners_beyond_loopback(node.pid)
        for files in studies:
            storescu(port, files)
        wait_for(lambda: at_pacs(pacs_out, 4), 240, "SEG and SR of both studies at the PACS")
        wait_for(lambda: settled(state), 60, "both studies settled")
    finally:
        log = stop_node(node)
    assert beyond == []  # nothing of Ray (nor of the node) listens beyond 127.0.0.1
    assert "Ray backend: 2 actor(s)" in log
    objects = _objects(pacs_out)
    assert len(objects) == 4
    by_study: dict[str, list[str]] = {}
    for f in objects:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds.Modality)
    sent = {str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID) for files in studies}
    assert set(by_study) == sent and all(sorted(m) == ["SEG", "SR"] for m in by_study.values())
    # the SEG an actor made equals what this process computes from the same slices and model
    from livernode.imaging.dicomio import read_ct_series
    from livernode.imaging.postprocess import postprocess
    from livernode.inference.runner import Segmenter

    seg_file = next(f for f in objects if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SEG")
    seg = hd.seg.segread(seg_file)
    files = next(fs for fs in studies if str(pydicom.dcmread(fs[0], stop_before_pixels=True).StudyInstanceUID)
                 == seg.StudyInstanceUID)
    vol = read_ct_series(files)
    expected = postprocess(Segmenter(exported, providers="cpu").segment(vol.hu), vol.spacing).labels
    back = seg.get_pixels_by_source_instance(list(vol.sop_instance_uids), segment_numbers=[1, 2],
                                             assert_missing_frames_are_empty=True)
    got = np.where(back[..., 1] > 0, 2, np.where(back[..., 0] > 0, 1, 0))
    assert np.array_equal(got, expected)


def test_sigkill_of_the_node_mid_study_delivers_nothing_twice(tmp_path, exported, trained_run, pacs):
    from livernode.raycluster import process_tree

    root, _ = trained_run
    pacs_port, pacs_out = pacs
    port, state = free_port(), tmp_path / "state"
    files = restamp(sorted((root / "data" / "case_003" / "ct").glob("*.dcm")), tmp_path / "study")
    args = ("--config", str(_config(tmp_path)), "--port", str(port), "--destination", f"PACS@127.0.0.1:{pacs_port}")
    node = start_node(state, exported, *args, env=RAY_ENV)
    wait_port(port, node, timeout=180)
    storescu(port, files)
    wait_for(lambda: db_rows(state, "SELECT 1 FROM jobs WHERE state = 'running'"), 60, "the study handed to Ray")
    tree = process_tree(node.pid)  # the node and the Ray processes it started
    node.send_signal(signal.SIGKILL)  # the node dies with the study on an actor ...
    node.wait(timeout=10)
    for pid in tree - {node.pid}:  # ... and, as systemd's KillMode=control-group does, everything it started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = len(_objects(pacs_out))
    node = start_node(state, exported, *args, env=RAY_ENV)
    try:
        wait_port(port, node, timeout=180)
        wait_for(lambda: at_pacs(pacs_out, 2), 240, "SEG and SR at the PACS")
        wait_for(lambda: settled(state), 60, "the study settled")
        jobs = db_rows(state, "SELECT id FROM jobs")
        time.sleep(3)  # a late second processing would start within the quiet period
    finally:
        stop_node(node)
    assert before in (0, 2)  # the killed node either delivered the study whole or not at all ...
    assert len(_objects(pacs_out)) == 2  # ... and it is at the PACS exactly once
    assert db_rows(state, "SELECT id FROM jobs") == jobs
    states = [s for (s,) in db_rows(state, "SELECT state FROM jobs ORDER BY id")]
    assert states[-1] == "done" and states.count("done") == 1


def _actor_pids(root: int) -> list[int]:
    from livernode.raycluster import process_tree

    pids = []
    for pid in process_tree(root):
        try:
            if "NodeActor" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                pids.append(pid)
        except OSError:
            pass
    return pids


def test_a_lost_actor_makes_its_study_due_again_and_it_is_delivered_once(tmp_path, exported, long_study, pacs):
    """The actors' processes are killed while one holds a 120-slice study (seconds of decoding and inference): the
    study's job ends as interrupted, the study is due again, and it reaches the PACS once."""
    pacs_port, pacs_out = pacs
    port, state = free_port(), tmp_path / "state"
    files = long_study
    node = start_node(state, exported, "--config", str(_config(tmp_path)), "--port", str(port), "--destination",
                      f"PACS@127.0.0.1:{pacs_port}", env=RAY_ENV)
    try:
        wait_port(port, node, timeout=180)
        actors = wait_for(lambda: _actor_pids(node.pid), 60, "the actors' processes")
        storescu(port, files)
        wait_for(lambda: db_rows(state, "SELECT 1 FROM jobs WHERE state = 'running'"), 60, "the study on an actor")
        for pid in actors:  # the machine (or the actor's process) dies mid-study
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: at_pacs(pacs_out, 2), 240, "SEG and SR at the PACS")
        wait_for(lambda: settled(state), 60, "the study settled")
    finally:
        log = stop_node(node)
    jobs = db_rows(state, "SELECT state, reason FROM jobs ORDER BY id")
    assert [s for s, _ in jobs] == ["interrupted", "done"], jobs
    assert "its Ray actor was lost" in jobs[0][1] and "processed again" in log
    assert len(_objects(pacs_out)) == 2
