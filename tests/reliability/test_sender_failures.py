"""The sender cannot die silently: a PACS that refuses the SR's presentation context, a result file that is lost
or damaged, and a destination removed by a reload each fail only their own items, and sending goes on."""

from __future__ import annotations

import pydicom
import pytest
from pynetdicom.sop_class import SegmentationStorage

from livernode.config import load_daemon_config
from tests.peers import at_pacs, PacsStandIn, free_port, restamp, start_storescp, stop_process, storescu, wait_for
from tests.reliability.conftest import audit_events

pytestmark = pytest.mark.slow
FAST_RETRY = {"send__backoff_seconds": 0.2, "send__max_attempts": 2, "send__timeout_seconds": 5}


def _uid(files) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _items(node, study: str) -> dict[str, tuple]:
    """Modality -> (state, attempts, last error) of a study's outbox items."""
    return {pydicom.dcmread(r[3], stop_before_pixels=True).Modality: (r[4], r[5], r[7])
            for r in node.store.outbox() if r[1] == study}


def test_pacs_refusing_sr_gets_the_seg_and_the_next_study(running_node, trained_run, tmp_path, figure):
    pacs = PacsStandIn(sop_classes=[SegmentationStorage])  # accepts SEG, not Comprehensive 3D SR
    try:
        node = running_node(send__destinations=[f"PACS@127.0.0.1:{pacs.port}"], **FAST_RETRY)
        first = sorted((trained_run[0] / "data" / "case_000" / "ct").glob("*.dcm"))
        storescu(node.scp.port, first)
        wait_for(lambda: _items(node, _uid(first)).get("SR", ("",))[0] == "dead", 120, "the SR a dead letter")
        second = restamp(first, tmp_path / "second")
        storescu(node.scp.port, second)
        wait_for(lambda: len(pacs.received) == 2, 120, "the second study's SEG at the PACS")
        wait_for(lambda: _items(node, _uid(second)).get("SR", ("",))[0] == "dead", 120, "its SR a dead letter")
    finally:
        pacs.shutdown()
    first_items = _items(node, _uid(first))
    assert first_items["SEG"][:2] == ("sent", 1)
    state, attempts, error = first_items["SR"]
    assert (state, attempts) == ("dead", 2)
    assert "does not accept Comprehensive 3D SR Storage (1.2.840.10008.5.1.4.1.1.88.34)" in error, error
    assert [c for c, _ in pacs.received] == [SegmentationStorage] * 2  # one SEG per study, never an SR
    assert node.liveness.problems() == {}
    dead = [e for e in audit_events(tmp_path / "state" / "audit.jsonl") if e["event"] == "send_failed" and
            e["dead_letter"]]
    assert len(dead) == 2 and all("Comprehensive 3D SR Storage" in e["error"] for e in dead)
    figure("seg_delivered", [first_items["SEG"][0], _items(node, _uid(second))["SEG"][0]])
    figure("sr_outcome", f"{state} after {attempts} attempts: {error[:90]}")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_lost_result_file_is_reprocessed_not_resent(running_node, trained_run, tmp_path, damage, figure):
    pacs_port, pacs_out = free_port(), tmp_path / "pacs"  # the PACS is down at first: the results wait
    node = running_node(send__destinations=[f"PACS@127.0.0.1:{pacs_port}"],
                        **{**FAST_RETRY, "send__max_attempts": 20})
    files = sorted((trained_run[0] / "data" / "case_001" / "ct").glob("*.dcm"))
    study = _uid(files)
    storescu(node.scp.port, files)
    wait_for(lambda: all(a >= 1 for _, a, _ in _items(node, study).values()) and len(_items(node, study)) == 2, 120,
             "a first failed attempt")
    seg = next((tmp_path / "state" / "results").glob("*/gen-1/seg.dcm"))
    if damage == "missing":
        seg.unlink()
    else:
        seg.write_bytes(seg.read_bytes()[:300])
    pacs = start_storescp(pacs_port, pacs_out)
    try:
        got = wait_for(lambda: at_pacs(pacs_out, 2), 120, "SEG and SR")
        # storescp has written the files before the node has its answers and marks the items sent
        wait_for(lambda: "pending" not in [r[4] for r in node.store.outbox()], 30, "the sent items recorded")
    finally:
        stop_process(pacs)
    states = sorted(r[4] for r in node.store.outbox())
    assert states == ["sent", "sent", "superseded", "superseded"], states
    assert [j[:2] for j in node.store.jobs(study)] == [(1, "done"), (2, "done")]  # processed again, once
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SeriesNumber for p in got}
    assert sent == {9003, 9004}  # the second generation's SEG and SR
    lost = [e for e in audit_events(tmp_path / "state" / "audit.jsonl") if e["event"] == "result_lost"]
    assert len(lost) == 1 and "seg.dcm" in lost[0]["error"]
    figure(f"{damage}_seg", f"outbox {states}; jobs {[j[:2] for j in node.store.jobs(study)]}")


def test_destination_removed_by_reload_dead_letters_and_sending_goes_on(running_node, trained_run, tmp_path,
                                                                        figure):
    gone = f"PACS@127.0.0.1:{free_port()}"  # down, and about to be removed from the configuration
    pacs = PacsStandIn()
    try:
        node = running_node(send__destinations=[gone], send__backoff_seconds=1.0, send__max_attempts=10)
        files = sorted((trained_run[0] / "data" / "case_002" / "ct").glob("*.dcm"))
        storescu(node.scp.port, files)
        wait_for(lambda: len(node.store.outbox()) == 2, 120, "results queued")
        node.reload(load_daemon_config(None, {"send.destinations": [f"PACS@127.0.0.1:{pacs.port}"],
                                              "send.backoff_seconds": 0.2, "send.max_attempts": 3,
                                              "study.quiet_seconds": 0.3}))
        wait_for(lambda: {r[4] for r in node.store.outbox()} == {"dead"}, 60, "the removed destination's items dead")
        second = restamp(files, tmp_path / "second")
        storescu(node.scp.port, second)
        wait_for(lambda: len(pacs.received) == 2, 120, "the next study at the new destination")
    finally:
        pacs.shutdown()
    errors = {r[7] for r in node.store.outbox() if r[4] == "dead"}
    assert any("no longer a configured destination" in e for e in errors), errors
    assert node.liveness.problems() == {}
    figure("removed_destination_items", sorted(r[4] for r in node.store.outbox()))
