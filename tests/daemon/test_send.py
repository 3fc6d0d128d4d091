"""Send-back against a real pynetdicom peer: success and refusal statuses, and TLS with client certificates."""

import ssl
import subprocess

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from livernode.config import TlsConfig
from livernode.daemon.send import Destination, SendError, send_files


def _peer(status: int, tls=None):
    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    got = []

    def on_store(event):
        got.append(event.request.AffectedSOPInstanceUID)
        return status
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)],
                             ssl_context=tls)
    return server, got


def _files(synth_dirs):
    return sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[:3]


def test_success_warning_and_refusal(synth_dirs):
    for status, ok in ((0x0000, True), (0xB007, True), (0xA700, False)):
        server, got = _peer(status)
        try:
            dest = Destination("PACS", "127.0.0.1", server.server_address[1])
            if ok:
                send_files(_files(synth_dirs), dest)
                assert len(got) == 3
            else:
                with pytest.raises(SendError, match="refused with status 0xA700"):
                    send_files(_files(synth_dirs), dest)
        finally:
            server.shutdown()


def test_unreachable_destination_is_a_send_error(synth_dirs):
    with pytest.raises(SendError, match="association"):
        send_files(_files(synth_dirs), Destination("PACS", "127.0.0.1", 1), timeout=5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=test-ca")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'127.0.0.1' if name == 'server' else 'livernode'}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return d


def test_tls_with_client_certificate(synth_dirs, pki):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    server, got = _peer(0x0000, tls=server_ctx)
    port = server.server_address[1]
    try:
        tls = TlsConfig(ca_file=pki / "ca.pem", cert_file=pki / "client.pem", key_file=pki / "client.key")
        send_files(_files(synth_dirs), Destination("PACS", "127.0.0.1", port, tls))
        assert len(got) == 3
        with pytest.raises(SendError):  # no client certificate: the peer refuses the handshake
            send_files(_files(synth_dirs), Destination("PACS", "127.0.0.1", port, TlsConfig(ca_file=pki / "ca.pem")),
                       timeout=5)
        with pytest.raises(SendError):  # plain DICOM to a TLS port
            send_files(_files(synth_dirs), Destination("PACS", "127.0.0.1", port), timeout=5)
    finally:
        server.shutdown()
