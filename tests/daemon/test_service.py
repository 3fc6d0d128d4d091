"""The worker in-process: failed jobs carry a reason and do not stop the node; late instances reprocess."""

import json
import logging
import os
import subprocess

import pydicom
import pytest

from livernode.config import load_daemon_config
from livernode.daemon.service import Service
from tests.daemon.test_sr_process import wait_gone

pytestmark = pytest.mark.slow
ENV = dict(os.environ, TCP_NODELAY="1")


@pytest.fixture()
def service(tmp_path, exported):
    cfg = load_daemon_config(None, {"inference.model": exported, "inference.providers": "cpu", "node.port": 0,
                                    "node.bind": "127.0.0.1", "paths.state": tmp_path / "state",
                                    "paths.output": tmp_path / "out", "study.quiet_seconds": 0,
                                    "observability.metrics_port": 0})
    s = Service(cfg)
    s.start()
    yield s
    s.stop()


def _send(port, files):
    r = subprocess.run(["/usr/bin/storescu", "-aec", "LIVERNODE", "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr


def _study_uid(files):
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_unprocessable_study_fails_with_reason_and_node_keeps_serving(service, trained_run, tmp_path):
    root, _ = trained_run
    short = sorted((root / "data" / "case_000" / "ct").glob("*.dcm"))[:3]
    _send(service.scp.port, short)
    service.run_once()
    row = service.store.study(_study_uid(short))
    assert row.state == "failed" and "3 slices, fewer than 8" in row.reason
    good = sorted((root / "data" / "case_001" / "ct").glob("*.dcm"))
    _send(service.scp.port, good)
    service.run_once()
    assert service.store.study(_study_uid(good)).state == "done"


def test_late_instances_reprocess_into_superseding_series(service, synth_dirs, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    files = sorted((synth_dirs["dicom"] / "case_002" / "ct").glob("*.dcm"))  # 12 slices
    _send(service.scp.port, files[:-1])
    service.run_once()
    _send(service.scp.port, files[-1:])
    service.run_once()
    row = service.store.study(_study_uid(files))
    assert row.generation == 2 and row.processed_instances == len(files)
    assert "reprocessing (generation 2) because 1 instance(s) arrived after the last result" in caplog.text
    gens = sorted(p.name for p in (tmp_path / "out").glob("*/gen-*"))
    assert gens == ["gen-1", "gen-2"]
    second = next((tmp_path / "out").glob("*/gen-2"))
    summary = json.loads((second / "summary.json").read_text())
    assert summary["volume"]["slices"] == len(files)
    first_seg = pydicom.dcmread(next((tmp_path / "out").glob("*/gen-1")) / "seg.dcm", stop_before_pixels=True)
    second_seg = pydicom.dcmread(second / "seg.dcm", stop_before_pixels=True)
    assert second_seg.SeriesNumber > first_seg.SeriesNumber
    assert second_seg.SeriesInstanceUID != first_seg.SeriesInstanceUID


def test_cuda_requested_without_cuda_fails_loudly(exported, synth_dirs, tmp_path):
    import sys

    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the loud failure is for machines without it")
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "infer", str(synth_dirs["dicom"] / "case_000"),
                        "--model", str(exported), "--out", str(tmp_path / "o"), "--providers", "cuda"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "providers = 'cuda'" in r.stderr


def test_the_sr_process_builds_the_sr_beside_the_seg_and_ends_with_the_node(exported, synth_dirs, tmp_path, caplog,
                                                                             monkeypatch):
    """`inference.sr_process = true` (the default from 2 cores on): the node's helper, started with it,
    writes the SR that goes out with the SEG, and is gone once the node has stopped."""
    cfg = load_daemon_config(None, {"inference.model": exported, "inference.providers": "cpu", "node.port": 0,
                                    "node.bind": "127.0.0.1", "paths.state": tmp_path / "state",
                                    "paths.output": tmp_path / "out", "study.quiet_seconds": 0,
                                    "observability.metrics_port": 0, "inference.sr_process": True})
    s = Service(cfg)
    s.start()
    try:
        pid = s.sr_process.pid()  # started (and warmed up) by start
        assert pid != os.getpid()

        def not_here(*args, **kwargs):
            raise AssertionError("the SR was built in the node's own process")
        monkeypatch.setattr("livernode.daemon.pipeline.build_sr", not_here)  # the helper has its own modules
        monkeypatch.setattr("livernode.daemon.sr.build_sr", not_here)
        files = sorted((synth_dirs["dicom"] / "case_001" / "ct").glob("*.dcm"))
        _send(s.scp.port, files)
        s.run_once(send=False)
        assert s.store.study(_study_uid(files)).state == "done"
        out = next((tmp_path / "out").glob("*/gen-1"))
        seg = pydicom.dcmread(out / "seg.dcm", stop_before_pixels=True)
        sr = pydicom.dcmread(out / "sr.dcm")
        evidence = [item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence]
        assert seg.SOPInstanceUID in evidence and len(evidence) == len(files) + 1
        assert str(sr.PatientID) == str(seg.PatientID) and len(sr.ContentSequence) > 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["timings_s"]["sr"] > 0
        assert s.sr_process.pid() == pid  # the same helper built it, with no fallback
        assert "SR process" not in caplog.text
    finally:
        s.stop()
    assert wait_gone(pid)
