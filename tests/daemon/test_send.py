"""Send-back against a real pynetdicom peer: success and refusal statuses, and TLS with client certificates."""

import socket
import ssl
import threading

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from livernode.config import TlsConfig
from livernode.daemon.send import Destination, SendError, send_datasets, send_files
from tests.peers import make_pki


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


def test_a_file_goes_out_as_its_own_bytes_and_a_dataset_in_memory_is_encoded(synth_dirs, monkeypatch):
    """An instance read from a file reaches the peer as the file's bytes after its file meta, without being
    encoded again; a dataset changed since it was read (its file meta no longer names it) and one with no file
    behind it are encoded by pydicom (through pynetdicom's encoder)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    from livernode.daemon import send

    encoded = []
    real_encode = send.encode
    monkeypatch.setattr(send, "encode", lambda ds, *a: encoded.append(ds) or real_encode(ds, *a))
    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    got = {}

    def on_store(event):
        got[event.request.AffectedSOPInstanceUID] = bytes(event.request.DataSet.getvalue())
        return 0x0000
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        dest = Destination("PACS", "127.0.0.1", server.server_address[1])
        files = _files(synth_dirs)
        changed = pydicom.dcmread(files[1])
        changed.SOPInstanceUID = pydicom.uid.generate_uid()  # edited since it was read
        in_memory = pydicom.dcmread(files[2])
        in_memory.SOPInstanceUID = pydicom.uid.generate_uid()
        outcomes = send_datasets([pydicom.dcmread(files[0]), changed, in_memory], ["file", "changed", "memory"],
                                 dest, files=[files[0], files[1], None])
        assert [o.stored for o in outcomes] == [True, True, True]
        assert [ds.SOPInstanceUID for ds in encoded] == [changed.SOPInstanceUID, in_memory.SOPInstanceUID]
        with open(files[0], "rb") as f:
            read_preamble(f, False)
            _read_file_meta_info(f)
            body = f.read()
        sent = pydicom.dcmread(files[0])
        assert len(body) > 1000 and got[sent.SOPInstanceUID] == body
        for ds in (changed, in_memory):
            back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(got[ds.SOPInstanceUID]), force=True)
            assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PixelData == ds.PixelData
    finally:
        server.shutdown()


def test_unreachable_destination_is_a_send_error(synth_dirs):
    with pytest.raises(SendError, match="association"):
        send_files(_files(synth_dirs), Destination("PACS", "127.0.0.1", 1), timeout=5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


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


@pytest.mark.parametrize("tls", [False, True])
def test_a_peer_that_accepts_and_stays_silent_costs_one_timeout(synth_dirs, pki, tls):
    """Connect, TLS handshake and association each wait at most the timeout; without a connect timeout a silent
    TLS peer held the sender for good."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # accepts connections (the kernel does) and never says a word
    dest = Destination("PACS", "127.0.0.1", silent.getsockname()[1],
                       TlsConfig(ca_file=pki / "ca.pem") if tls else None)
    files = _files(synth_dirs)
    result = []
    sender = threading.Thread(target=lambda: result.append(
        send_datasets([pydicom.dcmread(f) for f in files], [f.name for f in files], dest, timeout=1)), daemon=True)
    sender.start()
    sender.join(60)  # far beyond one timeout: only a send with no timeout at all is still running
    silent.close()
    assert not sender.is_alive(), "the send never returned"
    [outcomes] = result
    assert [o.stored for o in outcomes] == [False] * 3 and "association failed" in outcomes[0].error
