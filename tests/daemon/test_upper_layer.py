"""The receivers' own DICOM upper layer (livernode/daemon/upper_layer.py), spoken to byte by byte: these tests
build their PDUs with their own encoders (PS3.8 section 9.3) rather than the module's, so that both sides are not
wrong in the same way. dcmtk and pynetdicom peers talk to it in test_ingest_scp.py and the reliability suite."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
import tracemalloc

import pydicom
import pytest

from livernode.daemon import ingest_scp, upper_layer
from tests.peers import encoded, wait_for
from tests.reliability.conftest import audit_events, scp  # noqa: F401 - scp: the receiver under test

APP = b"1.2.840.10008.3.1.1.1"
CT, MR, VERIFICATION = b"1.2.840.10008.5.1.4.1.1.2", b"1.2.840.10008.5.1.4.1.1.4", b"1.2.840.10008.1.1"
IMPLICIT, EXPLICIT, JPEG_BASELINE = b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.4.50"


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _rq(contexts, called=b"LIVERNODE", calling=b"RAWTEST", version=1, app=APP) -> bytes:
    items = _item(0x10, app)
    for cid, abstract, syntaxes in contexts:
        items += _item(0x20, bytes([cid, 0, 0, 0]) + _item(0x30, abstract) +
                       b"".join(_item(0x40, ts) for ts in syntaxes))
    items += _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))
    return _pdu(1, struct.pack(">HH", version, 0) + called.ljust(16) + calling.ljust(16) + bytes(32) + items)


def _recv_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU, or None when the node closed the connection."""
    head = b""
    while len(head) < 6:
        got = sock.recv(6 - len(head))
        if not got:
            return None
        head += got
    length, body = struct.unpack(">I", head[2:6])[0], b""
    while len(body) < length:
        got = sock.recv(length - len(body))
        if not got:
            return None
        body += got
    return head[0], body


def _ac_results(body: bytes) -> dict[int, tuple[int, bytes]]:
    """Presentation context id -> (result, transfer syntax) from an A-ASSOCIATE-AC's body."""
    out, at = {}, 68
    while at < len(body):
        kind, length = body[at], struct.unpack(">H", body[at + 2:at + 4])[0]
        if kind == 0x21:
            value = body[at + 4:at + 4 + length]
            out[value[0]] = (value[2], value[8:].rstrip(b"\0"))
        at += 4 + length
    return out


def _associate(port: int, contexts=((1, CT, (EXPLICIT,)), (3, VERIFICATION, (IMPLICIT,))), **kwargs):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(_rq(contexts, **kwargs))
    return sock, _recv_pdu(sock)


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0, element, len(value)) + value


def _command(field: int, message_id: int, sop_class: bytes = CT, sop_instance: bytes | None = None) -> bytes:
    body = _element(0x0002, sop_class) + _element(0x0100, struct.pack("<H", field)) + \
        _element(0x0110, struct.pack("<H", message_id)) + \
        _element(0x0800, struct.pack("<H", 0x0101 if sop_instance is None else 0x0000))
    if sop_instance is not None:
        body += _element(0x0700, struct.pack("<H", 0)) + _element(0x1000, sop_instance)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _pdata(cid: int, control: int, value: bytes) -> bytes:
    return _pdu(4, struct.pack(">IBB", len(value) + 2, cid, control) + value)


def _response(sock) -> dict[int, bytes]:
    """The command elements of the node's answer."""
    kind, body = _recv_pdu(sock)
    assert kind == 4 and body[5] == 0x03, (kind, body[:6])
    data, out, at = body[6:], {}, 0
    while at < len(data):
        _, element, length = struct.unpack("<HHI", data[at:at + 8])
        out[element] = data[at + 8:at + 8 + length]
        at += 8 + length
    return out


def _status(rsp: dict[int, bytes]) -> int:
    return struct.unpack("<H", rsp[0x0900])[0]


def _stored(scp) -> list:
    return sorted(scp.spool.instances.rglob("*.dcm"))


def _audited(tmp_path, event: str, n: int) -> list[dict]:
    def enough():
        events = [e for e in audit_events(tmp_path / "audit.jsonl") if e["event"] == event]
        return events if len(events) >= n else None
    return wait_for(enough, 30, f"{n} {event} events audited")


def test_presentation_contexts_are_negotiated_in_the_acceptors_order(scp, tmp_path):
    contexts = [(1, CT, (IMPLICIT, EXPLICIT)), (3, CT, (JPEG_BASELINE,)), (5, MR, (EXPLICIT,)),
                (7, VERIFICATION, (IMPLICIT,))]
    sock, (kind, body) = _associate(scp.port, contexts)
    with sock:
        assert kind == 2, "not an A-ASSOCIATE-AC"
        results = _ac_results(body)
        # the node prefers Explicit VR Little Endian even where the peer lists Implicit first
        assert results[1] == (0, EXPLICIT)
        assert results[3][0] == 4  # transfer syntaxes not supported
        assert results[5][0] == 3  # abstract syntax not supported
        assert results[7] == (0, IMPLICIT)
        assert body[4:20] == b"LIVERNODE".ljust(16) and body[20:36] == b"RAWTEST".ljust(16)
        sock.sendall(_pdata(7, 0x03, _command(0x0030, 1, VERIFICATION)))
        rsp = _response(sock)
        assert _status(rsp) == 0 and struct.unpack("<H", rsp[0x0120])[0] == 1
        sock.sendall(_pdu(5, bytes(4)))  # A-RELEASE-RQ
        assert _recv_pdu(sock)[0] == 6
        assert _recv_pdu(sock) is None
    accepted = _audited(tmp_path, "association_accepted", 1)
    assert accepted[0]["calling_ae"] == "RAWTEST" and not accepted[0]["tls"]


@pytest.mark.parametrize("request_kwargs, codes, reason", [
    ({"version": 2}, (1, 2, 2), "protocol version"),
    ({"app": b"1.2.3.4"}, (1, 1, 2), "application context"),
    ({"called": b"SOMEONE"}, (1, 1, 7), "called AE title 'SOMEONE' is not ours"),
])
def test_association_requests_it_cannot_serve_are_rejected_with_the_standards_codes(scp, tmp_path, request_kwargs,
                                                                                     codes, reason):
    sock, answer = _associate(scp.port, **request_kwargs)
    with sock:
        assert answer is not None and answer[0] == 3, answer  # A-ASSOCIATE-RJ
        assert tuple(answer[1][1:4]) == codes
        assert _recv_pdu(sock) is None
    rejected = _audited(tmp_path, "association_rejected", 1)
    assert reason in rejected[0]["reason"] and rejected[0]["calling_ae"] == "RAWTEST"


def test_one_association_over_the_limit_is_rejected_as_transient(scp, tmp_path, monkeypatch):
    """The limit counts associations; a connection that has not asked for one does not take a place."""
    monkeypatch.setattr(ingest_scp, "MAX_ASSOCIATIONS", 1)
    with socket.create_connection(("127.0.0.1", scp.port), timeout=30):
        first, answer = _associate(scp.port)
        with first:
            assert answer[0] == 2
            second, refused = _associate(scp.port)
            with second:
                assert refused[0] == 3 and tuple(refused[1][1:4]) == (2, 3, 2)  # transient, presentation, limit
    rejected = _audited(tmp_path, "association_rejected", 1)
    assert "too many associations" in rejected[0]["reason"]


def test_connections_that_do_not_ask_for_an_association_are_bounded(scp, monkeypatch):
    """At most MAX_PENDING of them are held; a PDU other than an association request, or one longer than
    CONTROL_PDU_MAX, before an association is refused from its header, without reading what it announces."""
    monkeypatch.setattr(upper_layer, "MAX_PENDING", 2)
    silent = [socket.create_connection(("127.0.0.1", scp.port), timeout=30) for _ in range(2)]
    try:
        wait_for(lambda: len(scp.acceptor.associations) == 2, 30, "two connections held")
        with socket.create_connection(("127.0.0.1", scp.port), timeout=30) as third:
            assert third.recv(10) == b""  # closed at once
    finally:
        for sock in silent:
            sock.close()
    wait_for(lambda: not scp.acceptor.associations, 30, "the silent connections let go")
    for header in (struct.pack(">BBI", 4, 0, 0xFFFFFFF0), struct.pack(">BBI", 1, 0, 1 << 30)):
        with socket.create_connection(("127.0.0.1", scp.port), timeout=30) as sock:
            sock.sendall(header)
            abort = _recv_pdu(sock)
            assert abort is not None and abort[0] == 7, abort
    sock, answer = _associate(scp.port)
    with sock:
        assert answer[0] == 2


def test_stopping_lets_associations_finish_then_aborts_the_rest(scp):
    sock, answer = _associate(scp.port)
    with sock:
        assert answer[0] == 2
        scp.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", scp.port), timeout=5).close()
        sock.sendall(_pdata(3, 0x03, _command(0x0030, 1, VERIFICATION)))  # the association goes on
        assert _status(_response(sock)) == 0
        t = time.monotonic()
        scp.finish(0.5)
        assert time.monotonic() - t >= 0.5
        abort = _recv_pdu(sock)
        assert abort is not None and abort[0] == 7 and abort[1][2] == 0  # A-ABORT from the service user
    scp.finish(5)  # nothing left: returns at once


def _ct(synth_dirs) -> pydicom.Dataset:
    return pydicom.dcmread(sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[0])


def test_an_instance_in_small_fragments_over_many_pdus_is_stored_whole(scp, synth_dirs):
    ds = _ct(synth_dirs)
    payload, uid = encoded(ds), str(ds.SOPInstanceUID).encode()
    command = _command(0x0001, 9, CT, uid)
    sock, answer = _associate(scp.port)
    with sock:
        assert answer[0] == 2
        sock.sendall(_pdata(1, 0x01, command[:20]) + _pdata(1, 0x03, command[20:]))
        pieces = [payload[i:i + 256] for i in range(0, len(payload), 256)]
        for i, piece in enumerate(pieces):
            sock.sendall(_pdata(1, 0x02 if i == len(pieces) - 1 else 0x00, piece))
        rsp = _response(sock)
        assert _status(rsp) == 0 and rsp[0x1000].rstrip(b"\0") == uid
        assert struct.unpack("<H", rsp[0x0120])[0] == 9 and struct.unpack("<H", rsp[0x0100])[0] == 0x8001
    stored = _stored(scp)
    assert len(stored) == 1 and len(pieces) > 20
    assert stored[0].read_bytes().endswith(payload)
    assert pydicom.dcmread(stored[0]).SOPInstanceUID == ds.SOPInstanceUID


def test_a_refusal_names_its_reason_in_the_answer(scp, synth_dirs):
    """Error Comment (0000,0902) carries the reason the log and the audit give, for the peer's own log."""
    ds = _ct(synth_dirs)
    sock, _ = _associate(scp.port)
    with sock:
        sock.sendall(_pdata(1, 0x03, _command(0x0001, 1, CT, b"1.2.3.4.5.6.7")) + _pdata(1, 0x02, encoded(ds)))
        rsp = _response(sock)
    assert _status(rsp) == 0xA900
    assert rsp[0x0902].rstrip(b"\0 ") == b"dataset does not match request"
    assert not _stored(scp)


def test_a_store_on_another_sop_classes_context_is_refused(scp, synth_dirs):
    ds = _ct(synth_dirs)
    sock, _ = _associate(scp.port)
    with sock:
        uid = str(ds.SOPInstanceUID).encode()
        sock.sendall(_pdata(3, 0x03, _command(0x0001, 1, CT, uid)) + _pdata(3, 0x02, encoded(ds)))
        assert _status(_response(sock)) == 0x0122  # SOP class not supported
        sock.sendall(_pdata(1, 0x03, _command(0x0001, 2, CT, uid)) + _pdata(1, 0x02, encoded(ds)))
        assert _status(_response(sock)) == 0  # and the association goes on
    assert len(_stored(scp)) == 1


VIOLATIONS = {
    "unknown PDU type": _pdu(0x09, bytes(4)),
    "second association request": _rq([(1, CT, (EXPLICIT,))]),
    "context not accepted": _pdata(9, 0x03, _command(0x0030, 1, VERIFICATION)),
    "dataset without a command": _pdata(1, 0x02, b"\x08\x00\x18\x00UI\x02\x001\x00"),
    "value item longer than its PDU": _pdu(4, struct.pack(">IBB", 500, 1, 0x03) + b"\0" * 10),
    "command element outside group 0000": _pdata(1, 0x03, struct.pack("<HHI", 8, 0x18, 2) + b"1\0"),
    "command without a Command Field": _pdata(1, 0x03, _element(0x0110, struct.pack("<H", 1))),
    "C-FIND": _pdata(1, 0x03, _command(0x0020, 1)),
    "Affected SOP Instance UID of 70 characters": _pdata(1, 0x03, _command(0x0001, 1, CT, b"1." * 35)) +
    _pdata(1, 0x02, b"\0" * 8),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_a_protocol_violation_ends_the_association_with_an_abort_and_a_reason(scp, tmp_path, name):
    sock, answer = _associate(scp.port)
    with sock:
        assert answer[0] == 2
        sock.sendall(VIOLATIONS[name])
        abort = _recv_pdu(sock)
        assert abort is not None and abort[0] == 7 and abort[1][2] == 2, abort  # A-ABORT by the service provider
        assert _recv_pdu(sock) is None
    aborted = _audited(tmp_path, "association_aborted", 1)
    assert aborted[0]["calling_ae"] == "RAWTEST" and len(aborted[0]["reason"]) > 20, aborted
    assert not _stored(scp)
    sock, answer = _associate(scp.port)  # the node goes on serving
    with sock:
        assert answer[0] == 2


def test_silent_peers_are_let_go(scp, tmp_path, monkeypatch):
    monkeypatch.setattr(upper_layer, "ARTIM_S", 0.5)
    monkeypatch.setattr(upper_layer, "IDLE_S", 0.5)
    with socket.create_connection(("127.0.0.1", scp.port), timeout=30) as silent:
        t = time.monotonic()
        assert silent.recv(10) == b""  # closed without an association request
        assert time.monotonic() - t < 10
    request = _rq([(1, CT, (EXPLICIT,))])
    with socket.create_connection(("127.0.0.1", scp.port), timeout=30) as slow:
        t = time.monotonic()
        try:  # an association request a byte at a time, each well within the limit: the whole of it is not
            for i in range(len(request)):
                slow.sendall(request[i:i + 1])
                time.sleep(0.05)
        except OSError:
            pass  # closed while sending
        try:
            closed = slow.recv(10) == b""
        except ConnectionResetError:  # the node closed it while bytes were still arriving
            closed = True
        assert closed and time.monotonic() - t < 0.5 + 5
    sock, answer = _associate(scp.port)
    with sock:
        assert answer[0] == 2
        abort = _recv_pdu(sock)  # then nothing is sent
        assert abort is not None and abort[0] == 7
    aborted = _audited(tmp_path, "association_aborted", 1)
    assert "network timeout" in aborted[0]["reason"]


def test_a_pdu_is_read_whole_however_it_arrives_and_a_peer_closing_early_is_an_error():
    a, b = socket.socketpair()
    payload = random.Random(7).randbytes(300_001)

    def send():
        data = struct.pack(">BBI", 4, 0, len(payload)) + payload
        for i in range(0, len(data), 70_000):  # pieces larger and smaller than a read
            b.sendall(data[i:i + 70_000])
            time.sleep(0.01)
        b.sendall(struct.pack(">BBI", 4, 0, 100) + b"the end")
        b.close()

    peer = threading.Thread(target=send)
    peer.start()
    try:
        kind, body = upper_layer.read_pdu(a)
        assert kind == 4 and body == payload
        with pytest.raises(ConnectionError, match="7 bytes into a 100-byte read"):
            upper_layer.read_pdu(a)
    finally:
        a.close()  # first: a sender still writing then fails instead of waiting for a reader
        peer.join(timeout=30)


def test_a_pdu_length_claimed_by_the_peer_does_not_reserve_memory():
    """A P-DATA header may announce 4 GiB: the buffer grows with the bytes that arrive, not with the claim; and an
    association-control PDU may not announce more than CONTROL_PDU_MAX at all."""
    a, b = socket.socketpair()
    sent = bytes(range(256)) * 12_000  # 3 MB: the buffer grows past its first size twice

    def send():
        try:
            b.sendall(struct.pack(">BBI", 4, 0, 0xFFFFFFFF) + sent)
        finally:
            b.close()

    peer = threading.Thread(target=send)
    tracemalloc.start()
    try:
        peer.start()
        with pytest.raises(ConnectionError, match=f"{len(sent)} bytes into a {0xFFFFFFFF}-byte read"):
            upper_layer.read_pdu(a)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        a.close()
        peer.join(timeout=30)
    assert peak < 4 * len(sent), f"{peak / 2**20:.0f} MiB held for {len(sent) / 2**20:.0f} MiB received"
    a, b = socket.socketpair()
    with a, b:
        b.sendall(struct.pack(">BBI", 1, 0, upper_layer.CONTROL_PDU_MAX + 1))
        with pytest.raises(upper_layer.ProtocolError, match="declares"):
            upper_layer.read_pdu(a)


def test_a_failing_handler_answers_c211_and_the_instance_can_be_sent_again(scp, synth_dirs, monkeypatch, caplog):
    """An unexpected failure behind the C-STORE (here the index) is that instance's: the peer hears 0xC211 and may
    send it again on the same association."""
    import sqlite3

    ds = _ct(synth_dirs)
    real, calls = scp.store.add_instance, []

    def locked_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(scp.store, "add_instance", locked_once)
    uid = str(ds.SOPInstanceUID).encode()
    sock, _ = _associate(scp.port)
    with sock:
        for message_id, expected in ((1, 0xC211), (2, 0x0000)):
            sock.sendall(_pdata(1, 0x03, _command(0x0001, message_id, CT, uid)) + _pdata(1, 0x02, encoded(ds)))
            assert _status(_response(sock)) == expected
    assert "database is locked" in caplog.text and "the receiver failed" in caplog.text
    assert len(_stored(scp)) == 1 and scp.store.study(str(ds.StudyInstanceUID)).instances == 1
