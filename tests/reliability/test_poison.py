"""Poison studies end: a study whose processing kills the node again and again fails after `study.max_attempts`
interrupted runs, and an exception inside the pipeline fails only its own study. Either way the next study is
delivered normally."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pydicom
import pytest

from livernode.daemon import pipeline
from tests.peers import at_pacs, ENV, free_port, restamp, start_node, stop_node, storescu, wait_for, wait_port
from tests.reliability.conftest import audit_events, db_rows

pytestmark = pytest.mark.slow
# Every inference batch of the nodes that get killed takes this much longer, so each kill, sent within
# milliseconds of a new job appearing, lands inside that job on a machine of any speed.
SLOW = {"LIVERNODE_TEST_BATCH_DELAY": "0.1"}


def _uid(files) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _at_pacs(out, n):
    return at_pacs(out, n)


def test_study_killed_three_times_fails_and_the_next_is_delivered(tmp_path, exported, long_study, trained_run, pacs,
                                                                    figure):
    pacs_port, pacs_out = pacs
    port, state = free_port(), tmp_path / "state"
    args = ("--port", str(port), "--destination", f"PACS@127.0.0.1:{pacs_port}", "--study-timeout", "0.5")
    poison = _uid(long_study)
    restarts = []
    for attempt in range(1, 4):
        node = start_node(state, exported, *args, faults=SLOW)
        t0 = time.monotonic()
        if attempt == 1:
            wait_port(port, node)
            storescu(port, long_study)
        wait_for(lambda: db_rows(state, "SELECT count(*) FROM jobs WHERE state = 'running'") == [(1,)] and
                 db_rows(state, "SELECT count(*) FROM jobs")[0][0] == attempt, 120, f"job {attempt} running", 0.01)
        restarts.append(round(time.monotonic() - t0, 1))
        node.send_signal(signal.SIGKILL)  # the OOM killer, a segfault in a library, a power cut
        node.wait(timeout=10)
    node = start_node(state, exported, *args)  # the fourth start: the study is not tried again
    try:
        wait_port(port, node)
        [(st, reason)] = db_rows(state, "SELECT state, reason FROM studies WHERE study_instance_uid = ?", poison)
        good = sorted((trained_run[0] / "data" / "case_001" / "ct").glob("*.dcm"))
        storescu(port, good)
        got = wait_for(lambda: _at_pacs(pacs_out, 2), 180, "the next study's SEG and SR")
    finally:
        log = stop_node(node)
    assert st == "failed" and reason.startswith("interrupted 3 times"), (st, reason)
    assert "interrupted 3 times (limit study.max_attempts = 3)" in log
    jobs = db_rows(state, "SELECT state FROM jobs WHERE study_instance_uid = ? ORDER BY id", poison)
    assert [j for (j,) in jobs] == ["interrupted"] * 3
    assert {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in got} == {_uid(good)}
    status = subprocess.run([sys.executable, "-m", "livernode.cli", "status", "--state", str(state)],
                            capture_output=True, text=True, env=ENV, timeout=60)
    assert poison in status.stdout and "interrupted 3 times" in status.stdout, status.stdout
    failed = [e for e in audit_events(state / "audit.jsonl") if e["event"] == "study_failed"]
    assert [e["study_instance_uid"] for e in failed] == [poison]
    figure("interrupted_jobs", len(jobs))
    figure("seconds_from_start_to_running_job", restarts)
    figure("poison_study", f"{st}: {reason[:40]}")
    figure("next_study_delivered", len(got))


def test_exception_in_the_pipeline_fails_only_its_study(running_node, trained_run, tmp_path, pacs, monkeypatch,
                                                        figure):
    pacs_port, pacs_out = pacs
    real = pipeline.postprocess
    calls = []

    def poisoned(labels, spacing, **kw):  # the first study hits a bug (here, in post-processing); later ones do not
        calls.append(labels.shape)
        if len(calls) == 1:
            raise IndexError("injected: index 7 is out of bounds for axis 0 with size 7")
        return real(labels, spacing, **kw)
    monkeypatch.setattr(pipeline, "postprocess", poisoned)
    node = running_node(send__destinations=[f"PACS@127.0.0.1:{pacs_port}"])
    root, _ = trained_run
    first = sorted((root / "data" / "case_000" / "ct").glob("*.dcm"))
    storescu(node.scp.port, first)
    wait_for(lambda: (r := node.store.study(_uid(first))) and r.state == "failed", 120, "the first study failed")
    second = restamp(first, tmp_path / "second")  # the same images as another study: this time no fault
    storescu(node.scp.port, second)
    got = wait_for(lambda: _at_pacs(pacs_out, 2), 120, "the second study's SEG and SR")
    row = node.store.study(_uid(first))
    assert row.reason == "IndexError: injected: index 7 is out of bounds for axis 0 with size 7"
    assert {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in got} == {_uid(second)}
    assert node.liveness.problems() == {}  # the worker thread lives on
    assert node.metrics.registry.get_sample_value("livernode_study_failures_total", {"cause": "exception"}) == 1
    events = audit_events(tmp_path / "state" / "audit.jsonl")
    assert [e["reason"] for e in events if e["event"] == "study_failed"] == [row.reason]
    figure("failed_reason", row.reason)
    figure("next_study_delivered", len(got))
