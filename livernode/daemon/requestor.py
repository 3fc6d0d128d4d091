"""The requestor side of the DICOM upper layer (PS3.8), for the one service the node asks of its peers: C-STORE of
its results, each instance sent as the encoded dataset it already is, from the calling thread, in P-DATA-TF PDUs no
longer than the peer accepts.

Why not pynetdicom's AE, which sent the results until now: it hands each PDU through a queue to a reactor thread
that encodes and sends one PDU per turn of its loop, with the interpreter lock passed back and forth. A PACS
usually takes PDUs of 16 KiB, so a 200-slice SEG of 13 MB is some 800 PDUs; `make bench` compares the two sending
the same SEG and SR to dcmtk's storescp. pynetdicom stays the `livernode echo` SCU, the demo's PACS stand-in and
the tests' peer.

What it does and refuses:

- The association request proposes one presentation context per (SOP class, transfer syntax) pair, announces the
  largest PDU this side reads (`MAX_PDU`; it only ever reads responses), an implementation class UID and version
  name, and the default roles.
- A-ASSOCIATE-AC: each context accepted or not, and the peer's largest PDU (0: no limit); the PDUs sent are
  no larger than that, nor than `LARGEST_SENT`. A-ASSOCIATE-RJ: `AssociationRejected`, naming the standard's
  result, source and reason. A peer that aborts, closes, stays silent or answers out of turn: `AssociationFailed`,
  naming which.
- C-STORE: the command set (implicit VR little endian) in one write, the dataset's fragments gathered into writes
  of about `WRITE_BYTES`; then the C-STORE-RSP for that message is read: its status and error comment.
- Every wait ends after `timeout` seconds: the connection, the TLS handshake (each of its reads), the answer to
  the association request, each write of PDUs, each response, the release. A broken protocol from the peer, or
  no response in time, ends the association with A-ABORT; a broken connection ends it too. Either way `store`
  raises and the association is over (`established` false).
- Release: A-RELEASE-RQ, then the A-RELEASE-RP is awaited; where the peer asks for a release at the same time
  (a collision), its request is answered first.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from livernode.daemon.upper_layer import (
    ABORT, APPLICATION_CONTEXT, ASSOCIATE_AC, ASSOCIATE_RJ, ASSOCIATE_RQ, C_STORE_RQ, C_STORE_RSP, NO_DATASET, P_DATA,
    RELEASE_RP, RELEASE_RQ, UNEXPECTED_PDU, UNRECOGNISED_PDU, ProtocolError, _element, _item, _items, _pdu, _text,
    _uid, _us, abort_pdu, parse_command, pdv_items, read_pdu,
)

log = logging.getLogger(__name__)

MAX_PDU = 1 << 20  # the largest PDU this side reads (announced; responses are a few hundred bytes)
LARGEST_SENT = 1 << 18  # the PDUs sent are no larger than this, nor than the peer's maximum (0: no maximum)
WRITE_BYTES = 1 << 18  # PDUs are gathered into writes of about this many bytes (at most twice that)
# A-ASSOCIATE-RJ: (source, reason) -> what it means (PS3.8 9.3.4); source 1 is the service user, 2 the service
# provider's ACSE, 3 its presentation layer
REJECT_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 0): "reserved", (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}
ACCEPTANCE = 0
CONTEXT_RESULTS = {1: "user rejection", 2: "no reason given", 3: "abstract syntax not supported",
                   4: "transfer syntaxes not supported"}


class AssociationFailed(Exception):
    """No association: the connection, the TLS handshake or the negotiation failed; the message says which."""


class AssociationRejected(AssociationFailed):
    """The peer answered the association request with A-ASSOCIATE-RJ."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        kind = {1: "permanent", 2: "transient"}.get(result, f"result {result}")
        why = REJECT_REASONS.get((source, reason), f"source {source}, reason {reason}")
        super().__init__(f"rejected ({kind}): {why}")
        self.codes = (result, source, reason)


@dataclass(frozen=True)
class StoreResponse:
    status: int
    comment: str = ""


def associate_rq(called: str, calling: str, contexts: Sequence[tuple[str, str]], implementation_uid: str,
                 version_name: str) -> bytes:
    """The A-ASSOCIATE-RQ PDU: contexts 1, 3, 5, ... one per (abstract syntax, transfer syntax)."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for n, (abstract, transfer) in enumerate(contexts):
        items.append(_item(0x20, bytes([2 * n + 1, 0, 0, 0]) + _item(0x30, abstract.encode("ascii"))
                           + _item(0x40, transfer.encode("ascii"))))
    user = _item(0x51, struct.pack(">I", MAX_PDU)) + _item(0x52, implementation_uid.encode("ascii"))
    if version_name:
        user += _item(0x55, version_name.encode("ascii"))
    items.append(_item(0x50, user))
    titles = called.encode("ascii").ljust(16)[:16] + calling.encode("ascii").ljust(16)[:16]
    return _pdu(ASSOCIATE_RQ, struct.pack(">HH", 1, 0) + titles + bytes(32) + b"".join(items))


def parse_associate_ac(body: bytes | bytearray, proposed: Sequence[tuple[str, str]]
                       ) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], str], int]:
    """From an A-ASSOCIATE-AC: the accepted contexts ((abstract, transfer) -> id), the others with the reason, and
    the peer's largest PDU (0: no limit). ProtocolError if it does not answer the request as proposed."""
    if len(body) < 68:
        raise ProtocolError(f"association answer of {len(body)} bytes, shorter than its fixed fields (68)")
    by_id = {2 * n + 1: pair for n, pair in enumerate(proposed)}
    accepted, refused, max_pdu, app = {}, {}, 0, ""
    for kind, value in _items(body, 68, len(body), "association answer"):
        if kind == 0x10:
            app = _uid(value)
        elif kind == 0x21:
            if len(value) < 4 or value[0] not in by_id:
                raise ProtocolError(f"association answer for presentation context {value[:1].hex()} that was not "
                                    "proposed")
            pair, result = by_id[value[0]], value[2]
            if result == ACCEPTANCE:
                chosen = [_uid(v) for k, v in _items(value, 4, len(value), f"presentation context {value[0]}")
                          if k == 0x40]
                if chosen != [pair[1]]:
                    raise ProtocolError(f"presentation context {value[0]} accepted with transfer syntax {chosen}, "
                                        f"not the one proposed ({pair[1]})")
                accepted[pair] = value[0]
            else:
                refused[pair] = CONTEXT_RESULTS.get(result, f"result {result}")
        elif kind == 0x50:
            for sub, v in _items(value, 0, len(value), "user information"):
                if sub == 0x51 and len(v) == 4:
                    max_pdu = struct.unpack(">I", v)[0]
    if app != APPLICATION_CONTEXT:
        raise ProtocolError(f"association answer with application context {app!r}")
    for pair in proposed:
        if pair not in accepted and pair not in refused:
            refused[pair] = "no answer"
    return accepted, refused, max_pdu


def associate(host: str, port: int, *, called: str, calling: str, contexts: Sequence[tuple[str, str]],
              timeout: float, implementation_uid: str, version_name: str = "",
              tls: ssl.SSLContext | None = None, on_sent: Callable[[], None] = lambda: None) -> "Requestor":
    """Connect to `host`:`port` (TLS when `tls`), ask for an association proposing `contexts` and return it,
    established, with at least one context accepted or none. AssociationRejected or AssociationFailed otherwise.
    `on_sent()` is called after each write of PDUs."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ValueError) as exc:  # ValueError: a host name that cannot be encoded
        raise AssociationFailed(f"cannot connect: {describe(exc)}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock = tls.wrap_socket(sock, server_hostname=host)  # the handshake, within the same timeout
        sock.sendall(associate_rq(called, calling, contexts, implementation_uid, version_name))
        kind, body = read_pdu(sock, deadline, answer=True)
        if kind == ASSOCIATE_RJ:
            if len(body) < 4:
                raise ProtocolError("association rejection shorter than 4 bytes")
            raise AssociationRejected(body[1], body[2], body[3])
        if kind == ABORT:
            raise AssociationFailed(f"the peer aborted instead of answering{_abort_text(body)}")
        if kind != ASSOCIATE_AC:
            raise ProtocolError(f"PDU of type 0x{kind:02X} in answer to an association request",
                                UNEXPECTED_PDU if 1 <= kind <= ABORT else UNRECOGNISED_PDU)
        accepted, refused, max_pdu = parse_associate_ac(body, contexts)
    except ProtocolError as exc:
        _abort(sock, 2, exc.abort_reason)
        raise AssociationFailed(str(exc)) from None
    except AssociationFailed:
        sock.close()
        raise
    except (OSError, ValueError) as exc:  # ValueError: an AE title or UID that is not ASCII
        sock.close()
        raise AssociationFailed(describe(exc)) from None
    except BaseException:
        sock.close()
        raise
    if max_pdu and max_pdu < 16:
        _abort(sock, 2, 0)
        raise AssociationFailed(f"the peer's largest PDU ({max_pdu} bytes) cannot carry a fragment")
    log.debug("association with %s@%s:%d: %d context(s) accepted, PDUs up to %d bytes", called, host, port,
              len(accepted), max_pdu)
    return Requestor(sock, accepted, refused, min(max_pdu or LARGEST_SENT, LARGEST_SENT), timeout, on_sent)


class Requestor:
    """An established association this side asked for; one operation at a time."""

    def __init__(self, sock: socket.socket, accepted: dict[tuple[str, str], int],
                 refused: dict[tuple[str, str], str], max_pdu: int, timeout: float,
                 on_sent: Callable[[], None]) -> None:
        self.sock, self.accepted, self.refused = sock, accepted, refused
        self.max_pdu, self.timeout, self.on_sent = max_pdu, timeout, on_sent
        self.established = True
        self._message_id = 0

    def store(self, sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes | memoryview
              ) -> StoreResponse:
        """C-STORE `data`, a dataset encoded in `transfer_syntax`, on the accepted context for (sop_class,
        transfer_syntax); the peer's response. KeyError for a context not accepted and ValueError for a UID that is
        not ASCII, before anything is sent. Once sending has begun, any exception ends the association: OSError
        (the connection broke, or a write timed out), TimeoutError for no response in time, ProtocolError for a
        peer that broke the protocol (both aborted)."""
        cid = self.accepted[(sop_class, transfer_syntax)]
        body = b"".join((_element(0x0002, sop_class.encode("ascii")),
                         _element(0x0100, struct.pack("<H", C_STORE_RQ)),
                         _element(0x0110, struct.pack("<H", self._message_id % 0xFFFF + 1)),
                         _element(0x0700, bytes(2)), _element(0x0800, bytes(2)),
                         _element(0x1000, sop_instance.encode("ascii"))))
        self._message_id = message_id = self._message_id % 0xFFFF + 1
        command = _element(0x0000, struct.pack("<I", len(body))) + body
        sent = False
        try:
            self.sock.settimeout(self.timeout)
            self._send(cid, command, 0x01)
            self._send(cid, data, 0x00)
            sent = True
            return self._response(cid, message_id)
        except ProtocolError as exc:
            self.established = False
            _abort(self.sock, 2, exc.abort_reason)
            raise
        except TimeoutError:
            self.established = False
            if sent:  # no response in time: the stream is at a PDU's end, so the peer can read an A-ABORT
                _abort(self.sock, 0, 0)
            else:
                self.sock.close()
            raise
        except BaseException:
            self.established = False
            self.sock.close()
            raise

    def _send(self, cid: int, data: bytes | memoryview, control: int) -> None:
        """`data` as P-DATA-TF PDUs of one fragment each, the last flagged; gathered into writes of about
        WRITE_BYTES."""
        step = self.max_pdu - 6  # the PDU's body: the item length (4), context id and control header, the fragment
        view = memoryview(data).cast("B")
        batch, size = [], 0
        for at in range(0, max(len(view), 1), step):
            piece = view[at:at + step]
            last = at + step >= len(view)
            batch += (struct.pack(">BBIIBB", P_DATA, 0, len(piece) + 6, len(piece) + 2, cid,
                                  control | (0x02 if last else 0)), piece)
            size += len(piece) + 12
            if size >= WRITE_BYTES or last:
                self.sock.sendall(b"".join(batch))
                batch, size = [], 0
                self.on_sent()

    def _response(self, cid: int, message_id: int) -> StoreResponse:
        deadline = time.monotonic() + self.timeout
        command = bytearray()
        while True:
            kind, body = read_pdu(self.sock, deadline, answer=True)  # a response is a few hundred bytes
            if kind == ABORT:
                raise ConnectionAbortedError(f"the peer aborted{_abort_text(body)}")
            if kind != P_DATA:
                raise ProtocolError(f"PDU of type 0x{kind:02X} while waiting for a C-STORE response",
                                    UNEXPECTED_PDU if 1 <= kind <= ABORT else UNRECOGNISED_PDU)
            fields = None
            for pdv_cid, control, value in pdv_items(body):
                if fields is not None:
                    raise ProtocolError("P-DATA-TF: more after the response's last fragment")
                if pdv_cid != cid or not control & 1:
                    raise ProtocolError("a response came on another presentation context or as a dataset")
                command += value
                if control & 2:
                    fields = parse_command(bytes(command), response=True)
            if fields is not None:
                if _us(fields, 0x0100) != C_STORE_RSP or _us(fields, 0x0120) != message_id:
                    raise ProtocolError(f"a response (command 0x{_us(fields, 0x0100):04X}, message "
                                        f"{_us(fields, 0x0120)}) to no request of ours")
                if _us(fields, 0x0800) != NO_DATASET:
                    raise ProtocolError("a C-STORE response that announces a dataset")
                return StoreResponse(_us(fields, 0x0900), _text(fields.get(0x0902, b"")))

    def release(self) -> None:
        """A-RELEASE-RQ, then wait (at most the timeout) for A-RELEASE-RP; the connection is closed either way."""
        if not self.established:
            return
        self.established = False
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(_pdu(RELEASE_RQ, bytes(4)))
            deadline = time.monotonic() + self.timeout
            while True:
                kind, _ = read_pdu(self.sock, deadline, answer=True)
                if kind in (RELEASE_RP, ABORT):
                    break
                if kind == RELEASE_RQ:  # a release collision: the requestor answers the peer's request first
                    self.sock.sendall(_pdu(RELEASE_RP, bytes(4)))
                    continue
                if kind != P_DATA:
                    raise ProtocolError(f"PDU of type 0x{kind:02X} in answer to a release request", UNEXPECTED_PDU)
        except ProtocolError as exc:
            log.debug("release: %s", exc)
            _abort(self.sock, 2, exc.abort_reason)
        except OSError as exc:
            log.debug("release: %s", describe(exc))
        finally:
            self.sock.close()

    def abort(self) -> None:
        if self.established:
            self.established = False
            _abort(self.sock, 0, 0)


def _abort(sock: socket.socket, source: int, reason: int) -> None:
    try:
        sock.settimeout(1.0)
        sock.sendall(abort_pdu(source, reason))
    except OSError:
        pass
    sock.close()


def _abort_text(body: bytes | bytearray) -> str:
    return f" (source {body[2]}, reason {body[3]})" if len(body) >= 4 else ""


def describe(exc: BaseException) -> str:
    """An exception as a reason: socket.timeout and friends often carry no text of their own."""
    text = str(exc)
    if isinstance(exc, TimeoutError):
        return f"timed out{': ' + text if text and text != 'timed out' else ''}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
