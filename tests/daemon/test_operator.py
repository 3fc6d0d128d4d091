import subprocess
import sys

from livernode.daemon.ingest_scp import StoreSCP
from livernode.daemon.spool import Spool
from livernode.daemon.store import Store

CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage: counts towards a study


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "livernode.cli", *args], capture_output=True, text=True, timeout=60)


def test_status_and_retry_of_dead_letters_and_failed_studies(tmp_path):
    store = Store(tmp_path / "index.sqlite")
    store.add_instance("1.1", "9.9", "8.8", CT, "a", now=0)
    store.start_processing("9.9")
    store.finish("9.9", 1, failed_reason="no usable CT series")
    store.add_instance("1.2", "7.7", "6.6", CT, "b", now=0)
    store.start_processing("7.7")
    store.finish("7.7", 1)
    store.enqueue("7.7", "PACS@127.0.0.1:4242", ["seg", "sr"])
    ids = [row[0] for row in store.outbox()]
    store.mark_failed(ids, "association failed", backoff_s=1, max_attempts=1)
    r = _cli("status", "--state", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "failed" in r.stdout and "no usable CT series" in r.stdout and "dead" in r.stdout
    r = _cli("retry", "7.7", "--state", str(tmp_path))
    assert "2 outbox item(s) queued for sending again" in r.stdout
    assert {row[4] for row in store.outbox()} == {"pending"}
    store.enqueue("9.9", "PACS@127.0.0.1:4242", ["old-seg"])  # a failed study with an earlier result owed
    r = _cli("retry", "9.9", "--state", str(tmp_path))
    assert "queued for reprocessing; 1 earlier outbox item(s) queued for sending again" in r.stdout, r.stdout
    assert store.due_studies(30, 600) == ["9.9"]
    store.start_processing("9.9")
    store.finish("9.9", 1, failed_reason="no usable CT series (Abdomen MIP: MIP: a projection)",
                 series='[{"description": "Abdomen MIP", "images": 40, "chosen": false, "accepted": false, '
                        '"reason": "MIP: a projection, not CT values at one place", "liver_share": null}]')
    r = _cli("status", "--state", str(tmp_path), "--study", "9.9")
    assert r.returncode == 0 and "Abdomen MIP" in r.stdout and "MIP: a projection" in r.stdout, r.stdout + r.stderr
    r = _cli("retry", "1.2.3", "--state", str(tmp_path))
    assert r.returncode != 0 and "not known to this node" in r.stderr


def test_echo(tmp_path):
    scp = StoreSCP("LIVERNODE", "127.0.0.1", 0, Spool(tmp_path / "s"), Store(tmp_path / "i.sqlite"))
    scp.start()
    try:
        r = _cli("echo", f"LIVERNODE@127.0.0.1:{scp.port}")
        assert r.returncode == 0 and "C-ECHO succeeded" in r.stdout
    finally:
        scp.stop()
    r = _cli("echo", f"LIVERNODE@127.0.0.1:{scp.port}")
    assert r.returncode == 1 and "association failed" in r.stdout
    r = _cli("version")
    assert r.returncode == 0 and "onnxruntime" in r.stdout and "CPUExecutionProvider" in r.stdout
    assert "tensorflow 2." in r.stdout and "GPUs for training: none" in r.stdout  # this machine has no GPU


def test_check_reports_each_item(tmp_path):
    scp = StoreSCP("PACS", "127.0.0.1", 0, Spool(tmp_path / "s"), Store(tmp_path / "i.sqlite"))
    scp.start()
    try:
        cfg = tmp_path / "node.toml"
        cfg.write_text(f'[send]\ndestinations = ["PACS@127.0.0.1:{scp.port}", "GONE@127.0.0.1:1"]\n'
                       f'[node]\nport = {scp.port}\n')  # the port is taken by the stand-in PACS
        r = _cli("check", "--config", str(cfg))
    finally:
        scp.stop()
    assert r.returncode == 1
    assert any(ln.startswith("config") and "pass" in ln for ln in r.stdout.splitlines())
    assert any(ln.startswith("model") and "FAIL" in ln and "inference.model is not set" in ln
               for ln in r.stdout.splitlines())
    assert any(ln.startswith("dicom port") and "FAIL" in ln for ln in r.stdout.splitlines())
    assert any(f"PACS@127.0.0.1:{scp.port}" in ln and "pass" in ln for ln in r.stdout.splitlines())
    assert any("GONE@127.0.0.1:1" in ln and "FAIL" in ln for ln in r.stdout.splitlines())
    assert any(ln.startswith("training GPUs") and "sees 0: none" in ln for ln in r.stdout.splitlines())
    bad = tmp_path / "bad.toml"
    bad.write_text("[nodes]\nport = 1\n")
    r = _cli("check", "--config", str(bad))
    assert r.returncode == 1 and "unknown key 'nodes'" in r.stdout
