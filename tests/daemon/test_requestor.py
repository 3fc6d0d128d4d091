"""livernode's requestor (livernode/daemon/requestor.py) against dcmtk's storescp and pynetdicom as real peers, and
against a peer written here byte by byte (PS3.8 section 9.3, its own encoders) that answers wrongly on purpose."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from livernode.daemon import requestor
from livernode.daemon.send import Destination, SendError, send_files
from livernode.daemon.upper_layer import ProtocolError
from livernode.imaging.dicomio import dataset_offset
from tests.peers import free_port, start_storescp, stop_process

CT, SEG = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.66.4"
EXPLICIT = "1.2.840.10008.1.2.1"


def _ct_file(synth_dirs) -> Path:
    return sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[0]


def _associate(port: int, contexts, **kw) -> requestor.Requestor:
    return requestor.associate("127.0.0.1", port, called="PACS", calling="LIVERNODE", contexts=contexts,
                               timeout=kw.pop("timeout", 10), implementation_uid="1.2.3.4", version_name="TEST", **kw)


def test_dataset_offset_with_and_without_the_group_length(synth_dirs):
    from pydicom.filereader import _read_file_meta_info, read_preamble

    raw = _ct_file(synth_dirs).read_bytes()
    with open(_ct_file(synth_dirs), "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        expected = f.tell()
    assert 132 < expected < len(raw) and dataset_offset(raw) == expected
    group, element = struct.unpack_from("<HH", raw, 132)
    assert (group, element) == (2, 0)
    without = raw[:132] + raw[144:]  # the same file meta, without (0002,0000)
    assert dataset_offset(without) == expected - 12 and without[expected - 12:] == raw[expected:]
    (length,) = struct.unpack_from("<I", raw, 140)
    for wrong in (length - 2, length + 2, length + 1000):  # a group length that the elements do not end at
        with pytest.raises(ValueError, match="group length"):
            dataset_offset(raw[:140] + struct.pack("<I", wrong) + raw[144:])
    for bad in (b"", raw[:100], b"\0" * 128 + b"DICX" + raw[132:], raw[:140], raw[:expected - 3]):
        with pytest.raises(ValueError):
            dataset_offset(bad)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"])
def test_dataset_offset_of_implicit_and_deflated_files(synth_dirs, tmp_path, syntax):
    """The dataset after the file meta, as pydicom reads it back from those bytes alone in that transfer syntax; a
    deflated dataset whose first bytes look like a group 0002 element is cut at the group length."""
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    ds = pydicom.dcmread(_ct_file(synth_dirs))
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    data = raw[dataset_offset(raw):]
    if syntax.endswith(".99"):
        data = zlib.decompress(data, -15)
    back = read_dataset(DicomBytesIO(data), syntax == "1.2.840.10008.1.2", True)
    assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PixelData == ds.PixelData
    if syntax.endswith(".99"):
        lookalike = raw[:dataset_offset(raw)] + b"\x02\x00\x10\x00UI\x02\x00xx" + raw[dataset_offset(raw):]
        assert dataset_offset(lookalike) == dataset_offset(raw)


def test_a_dataset_reaches_storescp_whole_in_small_pdus(synth_dirs, tmp_path):
    """storescp takes PDUs of at most 4 KiB: a 0.5 MB slice goes out as some 130 fragments, and the file storescp
    writes holds the same dataset bytes."""
    ds = pydicom.dcmread(_ct_file(synth_dirs))
    ds.Rows = ds.Columns = 512
    ds.PixelData = np.random.default_rng(0).integers(-1024, 2000, (512, 512), np.int16).tobytes()
    path = tmp_path / "ct512.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    data = memoryview(raw)[dataset_offset(raw):]
    port, out = free_port(), tmp_path / "pacs"
    pacs = start_storescp(port, out, "--max-pdu", "4096")
    writes = []
    try:
        assoc = _associate(port, [(CT, EXPLICIT), (SEG, EXPLICIT)], on_sent=lambda: writes.append(1))
        assert assoc.max_pdu == 4096 and set(assoc.accepted) == {(CT, EXPLICIT), (SEG, EXPLICIT)}
        rsp = assoc.store(CT, ds.SOPInstanceUID, EXPLICIT, data)
        assert rsp == requestor.StoreResponse(0x0000, "")
        assoc.release()
        assert not assoc.established
    finally:
        log = stop_process(pacs)
    [got] = list(out.iterdir())
    received = got.read_bytes()
    assert len(data) > 400_000 and received[dataset_offset(received):] == bytes(data), log
    assert len(writes) >= len(data) // requestor.WRITE_BYTES  # progress as the PDUs went out


def test_a_rejected_association_says_why(synth_dirs):
    ae = AE(ae_title="PACS")
    ae.require_called_aet = True
    ae.add_supported_context(CTImageStorage, EXPLICIT)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        with pytest.raises(requestor.AssociationRejected, match="permanent.*called AE title not recognised") as err:
            requestor.associate("127.0.0.1", server.server_address[1], called="NOTPACS", calling="LIVERNODE",
                                contexts=[(CT, EXPLICIT)], timeout=10, implementation_uid="1.2.3.4")
        assert err.value.codes == (1, 1, 7)
        dest = Destination("NOTPACS", "127.0.0.1", server.server_address[1])
        with pytest.raises(SendError, match=r"association rejected \(permanent\): called AE title not recognised"):
            send_files([_ct_file(synth_dirs)], dest)
    finally:
        server.shutdown()


# -- a peer that answers as each test tells it ------------------------------------------------------------------

def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _read(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf
    head = exactly(6)
    return head[0], exactly(struct.unpack(">I", head[2:])[0])


def _response(message_id: int, status: int, command: int = 0x8001, comment: bytes = b"") -> bytes:
    def el(element, value):
        return struct.pack("<HHI", 0, element, len(value)) + value
    body = (el(0x0002, CT.encode()) + el(0x0100, struct.pack("<H", command)) + el(0x0120, struct.pack("<H", message_id))
            + el(0x0800, struct.pack("<H", 0x0101)) + el(0x0900, struct.pack("<H", status))
            + (el(0x0902, comment) if comment else b""))
    data = el(0x0000, struct.pack("<I", len(body))) + body
    return _pdu(4, struct.pack(">IBB", len(data) + 2, 1, 0x03) + data)


class Peer:
    """Accepts one association: context 1 (CT, explicit VR little endian) accepted unless `refuse`, PDUs of at most
    `max_pdu` (0: no limit); reads one C-STORE and answers it with `answer(message_id)` (bytes to send, or None to
    stay silent), then records every PDU type it gets until the connection closes, answering a release request
    (after one of its own first, where it is to `collide`). `ts` and `app`: what its answer names instead."""

    def __init__(self, answer, refuse: bool = False, max_pdu: int = 16384, collide: bool = False,
                 ts: str = EXPLICIT, app: bytes = b"1.2.840.10008.3.1.1.1") -> None:
        self.answer, self.refuse, self.max_pdu, self.collide = answer, refuse, max_pdu, collide
        self.ts, self.app = ts, app
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.after, self.fragments, self.dataset = [], [], b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            kind, rq = _read(conn)
            assert kind == 1
            result = 3 if self.refuse else 0
            ctx = _item(0x21, bytes([1, 0, result, 0]) + _item(0x40, self.ts.encode()))
            user = _item(0x50, _item(0x51, struct.pack(">I", self.max_pdu)) + _item(0x52, b"9.8.7"))
            conn.sendall(_pdu(2, rq[:68] + _item(0x10, self.app) + ctx + user))
            message_id = None
            try:
                while not self.refuse:
                    kind, body = _read(conn)
                    if kind != 4:
                        self.after.append(kind)
                        return
                    assert self.max_pdu == 0 or len(body) <= self.max_pdu
                    size, cid, control = struct.unpack_from(">IBB", body)
                    assert size == len(body) - 4 and cid == 1  # one fragment a PDU
                    if control & 1:
                        message_id = struct.unpack_from("<H", body, body.index(struct.pack("<HH", 0, 0x0110)) + 8)[0]
                        continue
                    self.fragments.append(len(body) - 6)
                    self.dataset += body[6:]
                    if control & 2:
                        reply = self.answer(message_id)
                        if reply:
                            conn.sendall(reply)
                        break
                while True:
                    kind, body = _read(conn)
                    self.after.append(kind)
                    if kind == 5:
                        if self.collide:
                            conn.sendall(_pdu(5, bytes(4)))
                            self.after.append(_read(conn)[0])
                        conn.sendall(_pdu(6, bytes(4)))
            except (ConnectionError, OSError):
                pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.mark.parametrize("max_pdu", [16384, 1000, 0, 0xFFFFFFFF])
def test_fragments_fill_the_peers_pdus_and_the_status_and_comment_come_back(max_pdu):
    """Fragments as large as the peer's maximum allows, up to LARGEST_SENT where it sets none (0) or a larger one
    (a write that must finish within the timeout is not a whole dataset)."""
    peer = Peer(lambda mid: _response(mid, 0xA700, comment=b"OUT OF RESOURCES"), max_pdu=max_pdu)
    data = bytes(range(256)) * 2400  # 614400 bytes
    try:
        assoc = _associate(peer.port, [(CT, EXPLICIT)])
        assert assoc.store(CT, "1.2.3", EXPLICIT, data) == requestor.StoreResponse(0xA700, "OUT OF RESOURCES")
        assoc.release()
    finally:
        peer.close()
    step = min(max_pdu or requestor.LARGEST_SENT, requestor.LARGEST_SENT) - 6
    assert peer.dataset == data and peer.fragments == [step] * (len(data) // step) + [len(data) % step]
    assert peer.after == [5]  # A-RELEASE-RQ


def test_a_response_in_two_pdus_and_a_release_collision():
    def two_pdus(mid):
        whole = _response(mid, 0x0000)
        command = whole[12:]
        half = len(command) // 2
        return b"".join(_pdu(4, struct.pack(">IBB", len(part) + 2, 1, control) + part)
                        for part, control in ((command[:half], 0x01), (command[half:], 0x03)))
    peer = Peer(two_pdus, collide=True)
    try:
        assoc = _associate(peer.port, [(CT, EXPLICIT)])
        assert assoc.store(CT, "1.2.3", EXPLICIT, b"\x08\x00\x16\x00UI\x04\x001.2\0").status == 0x0000
        assoc.release()
    finally:
        peer.close()
    assert peer.after == [5, 6]  # our A-RELEASE-RQ, then our answer to the peer's own


@pytest.mark.parametrize("answer", ["another transfer syntax", "another application context", "max PDU 8"])
def test_an_answer_that_does_not_fit_the_request_is_aborted(answer):
    peer = Peer(lambda mid: None, **{"another transfer syntax": {"ts": "1.2.840.10008.1.2"},
                                     "another application context": {"app": b"1.2.3"},
                                     "max PDU 8": {"max_pdu": 8}}[answer])
    try:
        with pytest.raises(requestor.AssociationFailed, match="transfer syntax|application context|largest PDU"):
            _associate(peer.port, [(CT, EXPLICIT)])
    finally:
        peer.close()
    assert peer.after == [7]  # A-ABORT


@pytest.mark.parametrize("how", ["another message", "not a response", "aborts", "silent"])
def test_a_wrong_or_missing_response_ends_the_association(how):
    answers = {
        "another message": lambda mid: _response(mid + 1, 0),
        "not a response": lambda mid: _response(mid, 0, command=0x0001),
        "aborts": lambda mid: _pdu(7, bytes([0, 0, 2, 0])),
        "silent": lambda mid: None,
    }
    peer = Peer(answers[how])
    try:
        assoc = _associate(peer.port, [(CT, EXPLICIT)], timeout=1)
        t = time.monotonic()
        expected = {"aborts": ConnectionAbortedError, "silent": TimeoutError}.get(how, ProtocolError)
        with pytest.raises(expected):
            assoc.store(CT, "1.2.3", EXPLICIT, b"\x08\x00\x16\x00UI\x04\x001.2\0")
        assert not assoc.established and time.monotonic() - t < 5
        assoc.release()  # nothing more goes out
    finally:
        peer.close()
    assert peer.after == ([] if how == "aborts" else [7]), peer.after  # A-ABORT, unless the peer aborted first


def test_a_refused_context_is_named_and_nothing_is_stored():
    peer = Peer(lambda mid: None, refuse=True)
    try:
        assoc = _associate(peer.port, [(CT, EXPLICIT)])
        assert assoc.accepted == {} and assoc.refused == {(CT, EXPLICIT): "abstract syntax not supported"}
        with pytest.raises(KeyError):
            assoc.store(CT, "1.2.3", EXPLICIT, b"")
        assoc.release()
    finally:
        peer.close()


def test_a_peer_that_closes_instead_of_answering_fails_the_association():
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        _read(conn)
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(requestor.AssociationFailed, match="closed"):
            _associate(listener.getsockname()[1], [(CT, EXPLICIT)])
    finally:
        listener.close()
