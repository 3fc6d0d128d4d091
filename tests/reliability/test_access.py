"""Access control at the C-STORE SCP: an allow-list of calling AE titles, the called AE title, and TLS 1.2+ with
mutual authentication. Real peers: dcmtk storescu (plain and TLS) and Python's ssl for what dcmtk will not do
(an old protocol version, a peer that connects and stays silent). Every refusal is audited."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time

import pytest

from livernode.daemon.ingest_scp import StoreSCP, server_tls_context
from livernode.daemon.metrics import AuditLog
from livernode.daemon.spool import Spool
from livernode.daemon.store import Store
from tests.peers import ENV, wait_for
from tests.reliability.conftest import audit_events


def _scp(tmp_path, **kwargs) -> StoreSCP:
    server = StoreSCP("LIVERNODE", "127.0.0.1", 0, Spool(tmp_path / "spool"), Store(tmp_path / "index.sqlite"),
                      audit=AuditLog(tmp_path / "audit.jsonl"), **kwargs)
    server.start()
    return server


def _storescu(port, files, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/storescu", "-v", *args, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, env=ENV, timeout=60)


def _stored(scp) -> int:
    return len(list(scp.spool.instances.rglob("*.dcm")))


@pytest.fixture()
def one_file(synth_dirs):
    return sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[:1]


def test_calling_and_called_ae_titles(tmp_path, one_file, figure):
    scp = _scp(tmp_path, allowed_calling=["MODALITY", "PACS"])
    try:
        ok = _storescu(scp.port, one_file, "-aet", "MODALITY", "-aec", "LIVERNODE")
        intruder = _storescu(scp.port, one_file, "-aet", "INTRUDER", "-aec", "LIVERNODE")
        misaddressed = _storescu(scp.port, one_file, "-aet", "PACS", "-aec", "OTHERNODE")
    finally:
        scp.stop()
    assert ok.returncode == 0, ok.stderr
    assert "Association Rejected" in intruder.stderr and "Calling AE Title Not Recognized" in intruder.stderr
    assert "Association Rejected" in misaddressed.stderr and "Called AE Title Not Recognized" in misaddressed.stderr
    assert _stored(scp) == 1
    rejected = [e for e in audit_events(tmp_path / "audit.jsonl") if e["event"] == "association_rejected"]
    assert [(e["calling_ae"], e["reason"]) for e in rejected] == [
        ("INTRUDER", "calling AE title 'INTRUDER' is not on the allow-list"),
        ("PACS", "called AE title 'OTHERNODE' is not ours (LIVERNODE)")]
    figure("accepted", len([e for e in audit_events(tmp_path / "audit.jsonl")
                            if e["event"] == "association_accepted"]))
    figure("rejected_and_audited", len(rejected))


@pytest.fixture()
def tls_scp(tmp_path, pki):
    scp = _scp(tmp_path, tls=server_tls_context(pki / "server.pem", pki / "server.key", pki / "ca.pem"))
    yield scp
    scp.stop()


def test_mutual_tls(tls_scp, tmp_path, pki, one_file, figure):
    scp = tls_scp
    trusted = ("-aec", "LIVERNODE", "+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf",
               str(pki / "ca.pem"))
    # A peer that connects and says nothing must not hold the others off while its handshake waits.
    silent = socket.create_connection(("127.0.0.1", scp.port))
    t = time.monotonic()
    ok = _storescu(scp.port, one_file, *trusted)
    trusted_s = time.monotonic() - t
    silent.setblocking(False)
    try:
        silent_open = silent.recv(1, socket.MSG_PEEK) != b""  # b"": the node gave up on it and closed it
    except BlockingIOError:
        silent_open = True  # nothing to read and not closed: its handshake is still waiting
    silent.close()
    untrusted = _storescu(scp.port, one_file, "-aec", "LIVERNODE", "+tls", str(pki / "rogue.key"),
                          str(pki / "rogue.pem"), "+cf", str(pki / "ca.pem"))
    anonymous = _storescu(scp.port, one_file, "-aec", "LIVERNODE", "+tla", "+cf", str(pki / "ca.pem"))
    plain = _storescu(scp.port, one_file, "-aec", "LIVERNODE")
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(pki / "ca.pem"))
    old.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", scp.port)) as raw:
            with old.wrap_socket(raw, server_hostname="127.0.0.1"):
                tls11 = "connected"
    except (ssl.SSLError, OSError) as exc:
        tls11 = f"refused: {exc}"
    assert ok.returncode == 0, ok.stderr
    # Had the silent peer held the accept loop, the trusted peer would have got in only once the node gave up on
    # the silent one's handshake and closed it.
    assert silent_open, "a silent peer held the listener"
    for r in (untrusted, anonymous, plain):
        assert r.returncode != 0 and "Association Request Failed" in r.stderr, r.stderr[-1500:]
    assert tls11.startswith("refused")
    assert _stored(scp) == 1
    def audited():  # each refusal is audited by its connection's own thread
        events = audit_events(tmp_path / "audit.jsonl")
        return events if len([e for e in events if e["event"] == "connection_refused"]) >= 4 else None
    events = wait_for(audited, 30, "the refusals audited")
    accepted = [e for e in events if e["event"] == "association_accepted"]
    assert len(accepted) == 1 and accepted[0]["tls"] and accepted[0]["peer_certificate"] == "commonName=client"
    refused = [e for e in events if e["event"] == "connection_refused"]
    assert len(refused) >= 4, refused  # untrusted, anonymous, plain, TLS 1.1 (and the silent peer, if it timed out)
    reasons = " ".join(e["reason"] for e in refused)
    assert "certificate" in reasons.lower() and "TLS handshake failed" in reasons
    figure("trusted_store_s_while_a_peer_is_silent", round(trusted_s, 2))
    figure("refused_and_audited", len(refused))
    figure("tls_1_1", "refused")
