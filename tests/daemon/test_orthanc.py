"""A real PACS round trip: Orthanc (Debian package) sends a study to livernode as auto-routing would, and the SEG
and SR come back into the same study in Orthanc."""

import json
import urllib.request

import pytest

from tests.daemon.test_serve_e2e import free_port, start_node, stop_node, wait_for, wait_port
from tests.peers import logged_popen, loopback_env

pytestmark = pytest.mark.slow


def _rest(port, path, data=None, method=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body


@pytest.fixture()
def orthanc(tmp_path):
    http, dicom, node_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "orthanc.json"
    cfg.write_text(json.dumps({
        "Name": "livernode-test", "StorageDirectory": str(tmp_path / "orthanc-db"),
        "IndexDirectory": str(tmp_path / "orthanc-db"), "HttpPort": http, "DicomPort": dicom,
        "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomModalities": {"livernode": ["LIVERNODE", "127.0.0.1", node_port]}, "Plugins": [],
    }))
    proc = logged_popen(["/usr/sbin/Orthanc", str(cfg)], tmp_path / "orthanc.log", loopback_env())  # 127.0.0.1 only
    wait_port(http, proc)
    yield http, dicom, node_port
    proc.terminate()
    proc.wait(timeout=30)


def test_orthanc_routes_a_study_and_gets_seg_and_sr_back(tmp_path, orthanc, exported, trained_run):
    http, dicom, node_port = orthanc
    root, _ = trained_run
    for f in sorted((root / "data" / "case_003" / "ct").glob("*.dcm")):
        _rest(http, "/instances", f.read_bytes(), "POST")
    [study_id] = _rest(http, "/studies")
    node = start_node(tmp_path, exported, "--port", str(node_port), "--destination", f"ORTHANC@127.0.0.1:{dicom}")
    try:
        wait_port(node_port, node)
        job = _rest(http, "/modalities/livernode/store", json.dumps({"Resources": [study_id]}).encode(), "POST")
        assert job  # Orthanc answers once the C-STORE to livernode finished

        def modalities():
            series = _rest(http, f"/studies/{study_id}/series")
            found = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
            return found if {"SEG", "SR"} <= set(found) else None
        found = wait_for(modalities, 180, "SEG and SR in the Orthanc study")
    finally:
        stop_node(node)
    assert found == ["CT", "SEG", "SR"]
    assert len(_rest(http, "/studies")) == 1  # the results joined the same study
