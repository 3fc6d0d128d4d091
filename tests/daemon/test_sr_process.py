"""The SR built in a helper process beside the SEG (livernode/daemon/sr_process.py): the same document as the SR
built after the SEG from the whole SEG and source headers, written by a real spawned process; a helper that dies
or is stopped costs no SR."""

import copy
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
import pydicom
import pytest

from livernode.config import load_daemon_config
from livernode.daemon import sr as srmod
from livernode.daemon import sr_process
from livernode.daemon.seg import write_result_seg
from livernode.daemon.sr import SrJob
from livernode.daemon.sr_process import SrProcess, sr_beside
from livernode.imaging.segwrite import Algorithm
from tests.daemon.test_receivers import _gone as gone
from tests.daemon.test_sr_fast import _differences, _findings, _source

ALGORITHM = Algorithm("livernode test", "1 (abc)")
SR_KW = dict(series_uid="1.2.3.6", sop_uid="1.2.3.7", series_number=9002, note=" (liver cut off)",
             description="research use only")


@pytest.fixture
def made(synth_dirs, tmp_path):
    """(the SEG's object model as `on_model` receives it, the SEG as written, source headers, findings)."""
    source = _source(synth_dirs)
    findings = _findings(len(source))
    models = []  # copied when called: the writer goes on changing its object model afterwards
    seg = write_result_seg(source, findings.labels, tmp_path / "seg.dcm", algorithm=ALGORITHM, series_uid="1.2.3.4",
                           sop_uid="1.2.3.5", on_model=lambda m: models.append(copy.deepcopy(m)))
    assert len(models) == 1 and models[0].SOPInstanceUID == "1.2.3.5"
    assert "PerFrameFunctionalGroupsSequence" in models[0] and "PerFrameFunctionalGroupsSequence" not in seg
    return models[0], seg, source, findings


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if gone(pid):
            return True
        time.sleep(0.05)
    return gone(pid)


def _uids_blanked(ds):
    """`ds` with every UID content item's value (tracking and observer UIDs, made afresh by each build) blanked."""
    for elem in ds.iterall():
        if elem.tag == 0x0040A124:
            elem.value = "0"
    return ds


def test_the_job_builds_the_sr_the_whole_seg_and_headers_build(made, tmp_path, monkeypatch):
    model, seg, source, findings = made
    counter = itertools.count(1)
    monkeypatch.setattr(srmod, "generate_uid", lambda: f"2.25.{next(counter)}")
    srmod.write_sr(srmod.build_sr(seg, source, findings, ALGORITHM, **SR_KW), tmp_path / "after.dcm")
    counter = itertools.count(1)  # the same UIDs again
    job = SrJob.of(model, source, findings, ALGORITHM, tmp_path / "beside.dcm", **SR_KW)
    assert job.findings.labels.size == 0 and len(job.source) == len(source)
    assert all(len(ds) <= len(srmod.SOURCE_READ) for ds in job.source)
    assert job.run() > 0
    after, beside = pydicom.dcmread(tmp_path / "after.dcm"), pydicom.dcmread(tmp_path / "beside.dcm")
    assert len(beside.ContentSequence) > 0
    assert _differences(after, beside) == []
    assert _differences(after.file_meta, beside.file_meta) == []


def test_a_spawned_helper_writes_the_sr(made, tmp_path):
    model, seg, source, findings = made
    helper = SrProcess()
    try:
        pid = helper.pid()
        assert pid != os.getpid()
        assert open(f"/proc/{pid}/comm", "rb").read().strip() == sr_process.NAME
        job = SrJob.of(model, source, findings, ALGORITHM, tmp_path / "beside.dcm", **SR_KW)
        future = helper.submit(job, "series test")
        assert future is not None
        assert helper.wait(future, job, "series test") > 0
        assert helper.pid() == pid  # one helper, kept between jobs
    finally:
        helper.stop()
    srmod.write_sr(srmod.build_sr(seg, source, findings, ALGORITHM, **SR_KW), tmp_path / "after.dcm")
    after, beside = pydicom.dcmread(tmp_path / "after.dcm"), pydicom.dcmread(tmp_path / "beside.dcm")
    assert len(beside.ContentSequence) > 0
    assert _differences(_uids_blanked(after), _uids_blanked(beside)) == []


def test_a_killed_helper_costs_no_sr(made, tmp_path, caplog):
    model, seg, source, findings = made
    helper = SrProcess()
    try:
        pid = helper.pid()
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # until the pool has noticed
            if helper._pool is not None and helper._pool._broken:
                break
            time.sleep(0.05)
        job = SrJob.of(model, source, findings, ALGORITHM, tmp_path / "sr.dcm", **SR_KW)
        with caplog.at_level(logging.WARNING):
            future = helper.submit(job, "series 1234abcd")
            if future is None:  # refused: the pipeline builds the SR itself, after the SEG
                job.run()
            else:  # taken before the pool knew: the job fails there and is built here
                helper.wait(future, job, "series 1234abcd")
        assert pydicom.dcmread(tmp_path / "sr.dcm").SOPInstanceUID == "1.2.3.7"
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("series 1234abcd" in m and "SR process" in m and "BrokenProcessPool" in m for m in warned), warned
        new = helper.pid()  # a new helper takes the next job
        assert new != pid
        second = SrJob.of(model, source, findings, ALGORITHM, tmp_path / "sr2.dcm", **SR_KW)
        assert helper.wait(helper.submit(second, "series 2"), second, "series 2") > 0
        assert (tmp_path / "sr2.dcm").stat().st_size > 0
    finally:
        helper.stop()


def test_a_stopped_helper_takes_no_job(made, tmp_path):
    model, _, source, findings = made
    helper = SrProcess()
    pid = helper.pid()
    helper.stop()
    assert wait_gone(pid)
    job = SrJob.of(model, source, findings, ALGORITHM, tmp_path / "sr.dcm", **SR_KW)
    assert helper.submit(job, "series x") is None
    with pytest.raises(RuntimeError):
        helper.pid()


def test_the_helper_is_on_by_setting_or_by_cores(monkeypatch):
    assert sr_beside(True) and not sr_beside(False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert not sr_beside(None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(sr_process.MIN_CORES)))
    assert sr_beside(None)
    assert load_daemon_config(None, {"inference.model": "m.onnx"}).inference.sr_process is None


def test_the_helper_dies_with_a_killed_node(tmp_path):
    """A node killed with SIGKILL leaves no helper behind (PR_SET_PDEATHSIG, as its receivers)."""
    script = ("from livernode.daemon.sr_process import SrProcess\n"
              "import sys, time\n"
              "h = SrProcess()\n"
              "print(h.pid(), flush=True)\n"
              "time.sleep(600)\n")
    node = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(node.stdout.readline())
        os.kill(pid, 0)  # running
    finally:
        node.kill()
        node.wait(30)
    assert wait_gone(pid)
