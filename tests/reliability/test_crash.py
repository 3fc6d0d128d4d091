"""SIGKILL while receiving, while processing and while sending: after a restart every acknowledged instance is on
disk byte-identical, and each study is processed and delivered exactly once.

"Exactly once" is read from the index, not from a pause: once the study is done with every instance processed and
its outbox sent, nothing is left that could be delivered again."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests.peers import at_pacs, PacsStandIn, free_port, start_node, stop_node, storescu, wait_for, wait_port
from tests.reliability.conftest import db_rows, settled

pytestmark = pytest.mark.slow
QUIET_S = 6  # longer than sending the second half takes, so the study is complete when it is processed


def received(out: Path):
    return at_pacs(out, 2)


def _kill(node) -> None:
    node.send_signal(signal.SIGKILL)
    node.wait(timeout=10)




def test_sigkill_while_receiving(tmp_path, exported, trained_run, pacs, figure):
    root, _ = trained_run
    pacs_port, pacs_out = pacs
    port, state = free_port(), tmp_path / "state"
    args = ("--port", str(port), "--destination", f"PACS@127.0.0.1:{pacs_port}", "--study-timeout", str(QUIET_S))
    files = sorted((root / "data" / "case_001" / "ct").glob("*.dcm"))
    half = len(files) // 2
    node = start_node(state, exported, *args)
    wait_port(port, node)
    storescu(port, files[:half])  # acknowledged ...
    _kill(node)  # ... then the node dies without any chance to clean up
    node = start_node(state, exported, *args)
    try:
        wait_port(port, node)
        storescu(port, files[half:])
        got = wait_for(lambda: received(pacs_out), 180, "SEG and SR at the PACS")
        wait_for(lambda: settled(state), 60, "the study settled")
        jobs = db_rows(state, "SELECT id FROM jobs")
        time.sleep(QUIET_S + 1)  # a second quiet period: a late second processing would start in it
    finally:
        stop_node(node)
    assert db_rows(state, "SELECT id FROM jobs") == jobs
    assert len([p for p in pacs_out.iterdir() if p.is_file()]) == 2  # processed and delivered exactly once
    seg = hd.seg.segread(next(f for f in got if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SEG"))
    referenced = {str(u[2]) for u in seg.get_source_image_uids()}
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    stored = list((state / "spool" / "instances").rglob("*.dcm"))
    assert len(stored) == len(files)  # every acknowledged instance is on disk, byte-identical
    originals = sorted(pydicom.dcmread(f).PixelData for f in files)
    assert sorted(pydicom.dcmread(p).PixelData for p in stored) == originals
    figure("acknowledged_before_kill", half)
    figure("instances_on_disk_after_restart", len(stored))
    figure("objects_at_pacs", len([p for p in pacs_out.iterdir() if p.is_file()]))


# Each inference batch (2 slices) of the first node takes this much longer, so its 120-slice job runs for at least
# 6 s on a machine of any speed and the kill, sent within milliseconds of the job's start, lands inside it.
SLOW = {"LIVERNODE_TEST_BATCH_DELAY": "0.1"}


def test_sigkill_while_processing(tmp_path, exported, long_study, pacs, figure):
    pacs_port, pacs_out = pacs
    port, state = free_port(), tmp_path / "state"
    args = ("--port", str(port), "--destination", f"PACS@127.0.0.1:{pacs_port}", "--study-timeout", "0.5")
    node = start_node(state, exported, *args, faults=SLOW)
    wait_port(port, node)
    storescu(port, long_study)
    wait_for(lambda: db_rows(state, "SELECT 1 FROM jobs WHERE state = 'running'"), 60, "the job to start", 0.01)
    _kill(node)
    assert not [p for p in pacs_out.iterdir() if p.is_file()]
    node = start_node(state, exported, *args)
    try:
        got = wait_for(lambda: received(pacs_out), 180, "SEG and SR at the PACS")
        wait_for(lambda: settled(state), 60, "the study settled")
    finally:
        stop_node(node)
    assert len([p for p in pacs_out.iterdir() if p.is_file()]) == 2
    jobs = db_rows(state, "SELECT generation, state FROM jobs ORDER BY id")
    assert jobs == [(1, "interrupted"), (1, "done")], jobs  # the killed attempt is recorded, its redo counts once
    seg = hd.seg.segread(next(f for f in got if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SEG"))
    assert {str(u[2]) for u in seg.get_source_image_uids()} == \
        {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in long_study}
    figure("jobs", [f"{g}:{s}" for g, s in jobs])
    figure("objects_at_pacs", len([p for p in pacs_out.iterdir() if p.is_file()]))


def test_sigkill_while_sending(tmp_path, exported, trained_run, figure):
    root, _ = trained_run
    pacs = PacsStandIn(hold_first_s=4.0)  # holds its answer to the first C-STORE: the kill lands then
    port, state = free_port(), tmp_path / "state"
    args = ("--port", str(port), "--destination", f"PACS@127.0.0.1:{pacs.port}", "--study-timeout", "0.5")
    files = sorted((root / "data" / "case_002" / "ct").glob("*.dcm"))
    node = start_node(state, exported, *args)
    try:
        wait_port(port, node)
        storescu(port, files)
        wait_for(pacs.first.is_set, 120, "the first result at the PACS", 0.01)
        _kill(node)
        node = start_node(state, exported, *args)
        wait_for(lambda: len({uid for _, uid in pacs.received}) == 2 and settled(state), 120, "the results delivered")
    finally:
        stop_node(node)
        pacs.server.shutdown()
    jobs = db_rows(state, "SELECT generation, state FROM jobs ORDER BY id")
    assert jobs == [(1, "done")], jobs  # processed once: the restart resends, it does not recompute
    assert len({uid for _, uid in pacs.received}) == 2  # one SEG and one SR, the same objects (same SOP Instance UIDs)
    # The instance in flight at the kill had no answer, so it is sent again: at least once, and the PACS
    # recognises the repeat by its SOP Instance UID.
    assert 2 <= len(pacs.received) <= 3
    figure("c_store_requests_at_pacs", len(pacs.received))
    figure("distinct_objects_at_pacs", len({uid for _, uid in pacs.received}))


def test_sigkill_between_writing_results_and_queueing_them(tmp_path, exported, trained_run, pacs, figure):
    """Killed after the SEG and SR are written and before the outbox row that names them is committed: after a
    restart every outbox item names a complete, readable result, and the study is delivered once."""
    from livernode.imaging.dicomio import read_dataset

    pacs_port, pacs_out = pacs
    port, state = free_port(), tmp_path / "state"
    args = ("--port", str(port), "--destination", f"PACS@127.0.0.1:{pacs_port}", "--study-timeout", "0.5")
    files = sorted((trained_run[0] / "data" / "case_003" / "ct").glob("*.dcm"))
    node = start_node(state, exported, *args, faults={"LIVERNODE_TEST_KILL_AT_QUEUE": "1"})
    wait_port(port, node)
    storescu(port, files)
    assert node.wait(timeout=120) == -signal.SIGKILL  # it died at the moment under test
    assert db_rows(state, "SELECT count(*) FROM outbox") == [(0,)]
    written = sorted(p.name for p in (state / "results").rglob("*") if p.is_file())
    node = start_node(state, exported, *args)
    try:
        wait_for(lambda: received(pacs_out), 120, "SEG and SR at the PACS")
        wait_for(lambda: settled(state), 60, "the study settled")
    finally:
        stop_node(node)
    paths = [Path(p) for (p,) in db_rows(state, "SELECT path FROM outbox")]
    assert len(paths) == 2
    for p in paths:  # every queued result exists and is whole: read with every element's length checked
        ds = read_dataset(p)
        assert ds.Modality in ("SEG", "SR")
    assert len([p for p in pacs_out.iterdir() if p.is_file()]) == 2
    figure("results_written_before_the_kill", written)
    figure("outbox_items_after_restart_all_readable", len(paths))
