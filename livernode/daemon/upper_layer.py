"""The acceptor side of the DICOM upper layer (PS3.8) and of the two DIMSE services a receiver offers (C-ECHO and
C-STORE, PS3.7), read straight off blocking sockets: one thread per association, each PDU read once into one
buffer, a dataset handed on as the PDU buffers that hold it, the answer written from the same thread.

Why not pynetdicom's server: it serves each association with a reactor thread, a socket-reading thread, a state
machine driven through queues and a DIMSE layer that copies the dataset into a BytesIO. `make bench` measured a
receiver doing only the durable write at 0.20-0.23x of dcmtk's storescp that way, and at 0.51-0.57x on this reading
of the upper layer (`bench/raw_scp.py`, which became this module). The sender's side of the same layer is
requestor.py; pynetdicom stays the `livernode echo` SCU, the demo's PACS stand-in and the tests' peer.

What it does and refuses:

- An association request names a protocol version, the called and calling AE titles and the DICOM application
  context; `Acceptor.decide` may reject it (A-ASSOCIATE-RJ with the standard's result, source and reason). Each
  presentation context is accepted with the first of the acceptor's transfer syntaxes that it offers, in the
  acceptor's order, or rejected (abstract syntax or transfer syntax not supported). The acceptor announces no
  maximum PDU length (0) and answers with PDUs far below any peer's.
- Anything that breaks the protocol (a PDU of an unknown type or in the wrong state, lengths that do not add up, a
  fragment for a context that was not accepted, a command set that cannot be read) ends the association with
  A-ABORT, and `on_aborted` names why. Nothing of a dataset that had not fully arrived is handed on.
- Limits: the whole association request within ARTIM_S of the connection (or of the TLS handshake), then no
  more than IDLE_S between PDUs; before an association, any PDU of at most CONTROL_PDU_MAX bytes, and at most
  MAX_PENDING connections still to ask for one. A buffer grows with the bytes that arrive (from 64 KiB before an
  association, 1 MiB within one), not with the length a PDU's header announces.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from livernode import __version__

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERSION_NAME = f"LIVERNODE_{__version__}"[:16]  # the implementation version name livernode gives its peers
VERIFICATION = "1.2.840.10008.1.1"
# PDU types
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
# DIMSE command fields
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET = 0x0101
# Presentation context results
ACCEPTANCE, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4
# A-ABORT reasons when the service provider aborts (source 2)
UNRECOGNISED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 1, 2, 6
# DIMSE statuses this layer answers by itself
SOP_CLASS_NOT_SUPPORTED, UNABLE_TO_PROCESS = 0x0122, 0xC211

ARTIM_S = 30.0  # from the connection (or the TLS handshake) to the association request
IDLE_S = 60.0  # between two PDUs of an established association
TLS_HANDSHAKE_S = 10.0
CONTROL_PDU_MAX = 1 << 18  # an association request with a hundred contexts is some 10 KB
# A buffer starts at most this large and doubles as bytes fill it: small while the peer is unknown, then large
# enough for most PDUs (a 512x512 CT slice's dataset is 0.5 MB).
FIRST_BUFFER, FIRST_BUFFER_UNASSOCIATED = 1 << 20, 1 << 16
MAX_PENDING = 64  # connections that have not yet asked for an association; more are closed at once
# accept() failures that concern one connection or a passing shortage, not the listening socket
TRANSIENT_ACCEPT_ERRORS = {errno.ECONNABORTED, errno.EPROTO, errno.ENOBUFS, errno.ENOMEM, errno.EMFILE,
                           errno.ENFILE, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN,
                           errno.ENONET, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EPERM, errno.ETIMEDOUT}


class ProtocolError(Exception):
    """The peer broke the upper layer's or DIMSE's rules: the association ends with A-ABORT."""

    def __init__(self, reason: str, abort_reason: int = INVALID_PARAMETER) -> None:
        super().__init__(reason)
        self.abort_reason = abort_reason


class Rejected(Exception):
    """`Acceptor.decide` refuses an association: A-ASSOCIATE-RJ with (result, source, reason) as in PS3.8 9.3.4."""

    def __init__(self, kind: str, reason: str, result: int, source: int, code: int) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.codes = kind, reason, (result, source, code)


@dataclass(eq=False)
class Association:
    """One peer's association, as the handlers see it."""

    address: tuple
    sock: socket.socket
    calling: str = ""
    called: str = ""
    peer_certificate: str = ""  # the subject of a TLS peer's certificate
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # accepted: id -> (abstract, transfer)
    established: bool = False
    _send_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tls(self) -> bool:
        return isinstance(self.sock, ssl.SSLSocket)

    @property
    def peer(self) -> str:
        return f"{self.calling}@{self.address[0]}"

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def abort(self, source: int = 0, reason: int = 0) -> None:
        """A-ABORT from this side (source 0: the service user, as the node stopping; 2: the service provider, for a
        broken protocol or a timeout), then the connection ends."""
        try:
            self.send(abort_pdu(source, reason))
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@dataclass
class StoreRequest:
    """A C-STORE request whose dataset has fully arrived, still encoded: `pieces` are views into the PDUs."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    pieces: list

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.pieces)

    def data(self) -> bytes | memoryview:
        return self.pieces[0] if len(self.pieces) == 1 else b"".join(self.pieces)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening (port 0: a free one)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def abort_pdu(source: int, reason: int) -> bytes:
    """A-ABORT: source 0 the service user, 2 the service provider (with a reason)."""
    return _pdu(ABORT, bytes([0, 0, source, reason]))


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _items(data, start: int, end: int, what: str):
    """(type, value) of the variable items in data[start:end]."""
    while start < end:
        if start + 4 > end:
            raise ProtocolError(f"{what}: an item header runs past the end")
        kind, length = data[start], struct.unpack_from(">H", data, start + 2)[0]
        if start + 4 + length > end:
            raise ProtocolError(f"{what}: item 0x{kind:02X} declares {length} bytes, {end - start - 4} remain")
        yield kind, bytes(data[start + 4:start + 4 + length])
        start += 4 + length


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").strip(" \0")


def _uid(value: bytes) -> str:
    return value.decode("ascii", "replace").rstrip("\0 ")


@dataclass
class AssociationRequest:
    version: int
    called: str
    calling: str
    application_context: str
    contexts: list[tuple[int, str, list[str]]]  # (id, abstract syntax, transfer syntaxes)
    called_raw: bytes  # the 32 bytes of both AE titles, echoed in the answer


def parse_associate_rq(body: bytes | bytearray) -> AssociationRequest:
    if len(body) < 68:
        raise ProtocolError(f"association request of {len(body)} bytes, shorter than its fixed fields (68)")
    version = struct.unpack_from(">H", body, 0)[0]
    app, contexts = "", []
    for kind, value in _items(body, 68, len(body), "association request"):
        if kind == 0x10:
            app = _uid(value)
        elif kind == 0x20:
            if len(value) < 4:
                raise ProtocolError("presentation context item shorter than 4 bytes")
            subs = list(_items(value, 4, len(value), f"presentation context {value[0]}"))
            abstract = [_uid(v) for k, v in subs if k == 0x30]
            if len(abstract) != 1:
                raise ProtocolError(f"presentation context {value[0]} names {len(abstract)} abstract syntaxes")
            if any(value[0] == c[0] for c in contexts):
                raise ProtocolError(f"presentation context {value[0]} is proposed twice")
            contexts.append((value[0], abstract[0], [_uid(v) for k, v in subs if k == 0x40]))
        # 0x50, user information: maximum length, implementation, role selection, extended negotiation, user
        # identity. None of it changes what this acceptor does: its answers are small, it takes one operation at a
        # time, and it is the SCP of storage and verification (the default roles).
    return AssociationRequest(version, _text(body[4:20]), _text(body[20:36]), app, contexts, bytes(body[4:36]))


def parse_command(data: bytes, *, response: bool = False) -> dict[int, bytes]:
    """A command set (group 0000, implicit VR little endian) by element number; a `response` has a Message ID
    Being Responded To and a Status where a request has a Message ID."""
    out, at = {}, 0
    while at < len(data):
        if at + 8 > len(data):
            raise ProtocolError("command set: an element header runs past the end")
        group, element, length = struct.unpack_from("<HHI", data, at)
        if group != 0 or at + 8 + length > len(data):
            raise ProtocolError(f"command set: element ({group:04X},{element:04X}) of {length} bytes is not a "
                                "command element that fits")
        out[element] = data[at + 8:at + 8 + length]
        at += 8 + length
    required = ((0x0100, "Command Field"), (0x0800, "Command Data Set Type")) + (
        ((0x0120, "Message ID Being Responded To"), (0x0900, "Status")) if response else ((0x0110, "Message ID"),))
    for element, name in required:
        if len(out.get(element, b"")) != 2:
            raise ProtocolError(f"command set without a valid {name}")
    return out


def pdv_items(body: bytes | bytearray):
    """(presentation context id, message control header, value as a view) of each value item of a P-DATA-TF
    PDU's body; ProtocolError where one does not fit."""
    at, end = 0, len(body)
    while at < end:
        if at + 6 > end:
            raise ProtocolError("P-DATA-TF: a value item header runs past the end")
        size, cid, control = struct.unpack_from(">IBB", body, at)
        if size < 2 or at + 4 + size > end:
            raise ProtocolError(f"P-DATA-TF: a value item declares {size} bytes, {end - at - 4} remain")
        yield cid, control, memoryview(body)[at + 6:at + 4 + size]
        at += 4 + size


def _us(command: dict[int, bytes], element: int) -> int:
    return struct.unpack("<H", command[element])[0]


def _element(element: int, value: bytes, pad: bytes = b"\0") -> bytes:
    """A command element: UIs are padded with NUL, text (LO) with a space."""
    if len(value) % 2:
        value += pad
    return struct.pack("<HHI", 0, element, len(value)) + value


def response(context_id: int, field_: int, message_id: int, status: int, sop_class: str,
             sop_instance: str | None = None, comment: str = "") -> bytes:
    """The P-DATA-TF of a C-STORE-RSP or C-ECHO-RSP."""
    parts = [_element(0x0002, sop_class.encode("ascii", "replace")), _element(0x0100, struct.pack("<H", field_)),
             _element(0x0120, struct.pack("<H", message_id)), _element(0x0800, struct.pack("<H", NO_DATASET)),
             _element(0x0900, struct.pack("<H", status))]
    if comment:  # Error Comment, LO: at most 64 characters
        parts.append(_element(0x0902, comment[:64].encode("ascii", "replace").replace(b"\\", b"/"), b" "))
    if sop_instance is not None:
        parts.append(_element(0x1000, sop_instance.encode("ascii", "replace")))
    body = b"".join(parts)
    data = _element(0x0000, struct.pack("<I", len(body))) + body
    return _pdu(P_DATA, struct.pack(">IBB", len(data) + 2, context_id, 0x03) + data)


def _read_exactly(sock: socket.socket, n: int, deadline: float | None = None,
                  first: int = FIRST_BUFFER) -> bytearray:
    """`n` bytes from the peer; the buffer grows as bytes arrive. ConnectionError if the peer closes first;
    socket.timeout at `deadline` (time.monotonic()), or when the socket's own timeout passes between two reads."""
    buf, got = bytearray(min(n, first)), 0
    while got < n:
        if got == len(buf):
            buf.extend(bytes(min(len(buf), n - got)))
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"{got} of {n} bytes by the deadline")
            sock.settimeout(left)
        with memoryview(buf) as view:
            k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError(f"the peer closed the connection {got} bytes into a {n}-byte read")
        got += k
    return buf


def read_pdu(sock: socket.socket, deadline: float | None = None, *,
             associated: bool = True, answer: bool = False) -> tuple[int, bytearray]:
    """The next PDU. Before an association (`associated` false) only an A-ASSOCIATE-RQ of at most
    CONTROL_PDU_MAX bytes is read; within one, only P-DATA may be longer. The `answer` to an association request
    (the requestor's side) may be of any type, and none longer."""
    head = _read_exactly(sock, 6, deadline)
    kind, length = head[0], struct.unpack_from(">I", head, 2)[0]
    if not associated and kind != ASSOCIATE_RQ:
        raise ProtocolError(f"PDU of type 0x{kind:02X} before an association request", UNEXPECTED_PDU)
    if (kind != P_DATA or not associated or answer) and length > CONTROL_PDU_MAX:
        raise ProtocolError(f"PDU of type 0x{kind:02X} declares {length} bytes (at most {CONTROL_PDU_MAX})")
    return kind, _read_exactly(sock, length, deadline, FIRST_BUFFER if associated else FIRST_BUFFER_UNASSOCIATED)


class Acceptor:
    """Accepts connections on a listening socket, each served whole by its own thread.

    `decide(request, association, others)` (others: this acceptor's established associations) returns the supported
    abstract syntaxes, each with its transfer syntaxes in order of preference, or raises `Rejected`.
    `on_store(association, request)` returns a status and an error comment for a C-STORE. The `on_*` callbacks
    report what happened; none of them may raise.
    """

    def __init__(self, listener: socket.socket, *, decide: Callable, on_store: Callable,
                 on_accepted: Callable = lambda a: None, on_rejected: Callable = lambda a, r: None,
                 on_aborted: Callable = lambda a, why: None, on_tls_failure: Callable = lambda addr, exc: None,
                 tls: ssl.SSLContext | None = None, implementation_uid: str = "", version_name: str = "",
                 name: str = "dicom") -> None:
        self.listener = listener
        self.decide, self.on_store = decide, on_store
        self.on_accepted, self.on_rejected, self.on_aborted = on_accepted, on_rejected, on_aborted
        self.on_tls_failure, self.tls = on_tls_failure, tls
        user = _item(0x51, struct.pack(">I", 0)) + _item(0x52, implementation_uid.encode())
        if version_name:
            user += _item(0x55, version_name.encode())
        self._user_item = _item(0x50, user)
        self.name = name
        self.associations: set[Association] = set()  # negotiating or established, in this process
        self._starting = 0  # connections accepted whose thread has not yet registered them
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- accepting ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.listener.setblocking(False)  # a shared socket: another process may take the connection first
        self._thread = threading.Thread(target=self._accept_loop, name=f"accept-{self.name}", daemon=True)
        self._thread.start()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        """No new connections taken from now on; associations under way go on."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not sel.select(timeout=0.25):
                    continue
                try:
                    conn, address = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue  # another receiver process took it
                except OSError as exc:
                    if exc.errno in TRANSIENT_ACCEPT_ERRORS and not self._stop.is_set():
                        log.warning("%s: accepting a connection failed (%s); accepting again", self.name, exc)
                        time.sleep(0.1 if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                                        errno.ENOMEM) else 0)
                        continue
                    if not self._stop.is_set():
                        if exc.errno == errno.EINVAL:  # the listening socket shut down: the node stopping
                            log.info("%s: listening socket shut down; no longer accepting connections", self.name)
                        else:
                            log.error("%s: no longer accepting connections: %s", self.name, exc)
                    break
                self._start_serving(conn, address)
        self._stop.set()

    def _start_serving(self, conn: socket.socket, address: tuple) -> None:
        with self._lock:
            pending = sum(1 for a in self.associations if not a.established) + self._starting
            if pending < MAX_PENDING:
                self._starting += 1
        if pending >= MAX_PENDING:
            log.warning("connection from %s closed: %d connections have yet to ask for an association",
                        address[0], pending)
            conn.close()
            return
        try:
            threading.Thread(target=self._serve, args=(conn, address), name=f"assoc-{address[0]}:{address[1]}",
                             daemon=True).start()
        except RuntimeError as exc:  # no thread can be started now: this connection is refused, not the port
            with self._lock:
                self._starting -= 1
            log.error("connection from %s closed: cannot serve it (%s)", address[0], exc)
            conn.close()

    def active(self) -> list[Association]:
        with self._lock:
            return [a for a in self.associations if a.established]

    # -- one connection ----------------------------------------------------------------------------------------

    def _serve(self, conn: socket.socket, address: tuple) -> None:
        assoc = Association(address, conn)
        with self._lock:
            self._starting -= 1
            self.associations.add(assoc)
        try:
            self._serve_connection(assoc)
        finally:
            with self._lock:
                self.associations.discard(assoc)
            try:
                assoc.sock.close()
            except OSError:
                pass

    def _serve_connection(self, assoc: Association) -> None:
        conn, address = assoc.sock, assoc.address
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:
                conn.settimeout(TLS_HANDSHAKE_S)
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError as exc:  # ssl.SSLError, a timeout, or the peer hanging up
                self.on_tls_failure(address, exc)
                return
            assoc.sock = conn
            cert = conn.getpeercert() or {}
            assoc.peer_certificate = ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
        try:
            self._run(assoc)
        except ProtocolError as exc:
            self.on_aborted(assoc, str(exc))
            assoc.abort(2, exc.abort_reason)
        except socket.timeout:
            why = (f"no association request within {ARTIM_S:g} s" if not assoc.established
                   else f"nothing received for {IDLE_S:g} s (network timeout)")
            if assoc.established:
                self.on_aborted(assoc, why)
                assoc.abort(2)
            else:
                log.warning("connection from %s closed: %s", address[0], why)
        except (ConnectionError, OSError) as exc:
            if assoc.established:
                self.on_aborted(assoc, f"the connection ended: {exc}")
        except Exception as exc:  # a defect here: this association ends, the node serves on
            log.exception("association with %s: serving it failed", address[0])
            self.on_aborted(assoc, f"the receiver failed: {type(exc).__name__}")
            assoc.abort(2)

    def _run(self, assoc: Association) -> None:
        sock = assoc.sock
        try:
            kind, body = read_pdu(sock, time.monotonic() + ARTIM_S, associated=False)
        except ConnectionError:
            return  # a port probe: connected and left without asking for anything
        if not self._negotiate(assoc, parse_associate_rq(body)):
            return
        sock.settimeout(IDLE_S)
        command, command_cid, pieces, fields = bytearray(), None, [], None
        while True:
            kind, body = read_pdu(sock)
            if kind == P_DATA:
                for cid, control, value in pdv_items(body):
                    if cid not in assoc.contexts:
                        raise ProtocolError(f"P-DATA-TF on presentation context {cid}, which was not accepted")
                    if control & 1:  # a command fragment
                        if fields is not None:
                            raise ProtocolError("a command arrived before the previous command's dataset ended")
                        if command_cid not in (None, cid):
                            raise ProtocolError("a command's fragments came on two presentation contexts")
                        command += value
                        command_cid = cid
                        if not control & 2:
                            continue
                        fields = parse_command(bytes(command))
                        command = bytearray()
                        if _us(fields, 0x0800) == NO_DATASET:
                            self._dimse(assoc, cid, fields, [])
                            fields, command_cid = None, None
                        continue
                    if fields is None or cid != command_cid:
                        raise ProtocolError("dataset fragment without a command announcing it on its context")
                    pieces.append(value)
                    if control & 2:  # the dataset's last fragment
                        self._dimse(assoc, cid, fields, pieces)
                        fields, command_cid, pieces = None, None, []
            elif kind == RELEASE_RQ:
                assoc.send(_pdu(RELEASE_RP, bytes(4)))
                return
            elif kind == ABORT:
                source, reason = (body[2], body[3]) if len(body) >= 4 else (0, 0)
                self.on_aborted(assoc, f"the peer aborted (source {source}, reason {reason})")
                return
            elif kind in (ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, RELEASE_RP):
                raise ProtocolError(f"PDU of type 0x{kind:02X} during an association", UNEXPECTED_PDU)
            else:
                raise ProtocolError(f"PDU of unknown type 0x{kind:02X}", UNRECOGNISED_PDU)

    def _negotiate(self, assoc: Association, rq: AssociationRequest) -> bool:
        assoc.calling, assoc.called = rq.calling, rq.called
        try:
            if not rq.version & 1:
                raise Rejected("protocol", f"protocol version 0x{rq.version:04X} is not supported", 1, 2, 2)
            if rq.application_context != APPLICATION_CONTEXT:
                raise Rejected("application context", f"application context {rq.application_context!r} is not "
                               "DICOM's", 1, 1, 2)
            with self._lock:
                others = sum(1 for a in self.associations if a.established)
            supported = self.decide(rq, assoc, others)
        except Rejected as exc:
            self.on_rejected(assoc, exc)
            result, source, code = exc.codes
            assoc.send(_pdu(ASSOCIATE_RJ, bytes([0, result, source, code])))
            return False
        results = []
        for cid, abstract, offered in rq.contexts:
            ours = supported.get(abstract)
            chosen = next((ts for ts in ours if ts in offered), None) if ours else None
            result = ACCEPTANCE if chosen else (ABSTRACT_SYNTAX_NOT_SUPPORTED if ours is None
                                                else TRANSFER_SYNTAXES_NOT_SUPPORTED)
            if chosen:
                assoc.contexts[cid] = (abstract, chosen)
            # a rejected context's transfer syntax item is not significant; the first offered one is sent back
            ts = chosen or (offered[0] if offered else "1.2.840.10008.1.2")
            results.append(_item(0x21, bytes([cid, 0, result, 0]) + _item(0x40, ts.encode())))
        body = struct.pack(">HH", 1, 0) + rq.called_raw + bytes(32) + _item(0x10, APPLICATION_CONTEXT.encode()) + \
            b"".join(results) + self._user_item
        assoc.send(_pdu(ASSOCIATE_AC, body))
        assoc.established = True
        self.on_accepted(assoc)
        return True

    def _dimse(self, assoc: Association, cid: int, fields: dict[int, bytes], pieces: list) -> None:
        abstract, transfer = assoc.contexts[cid]
        command, message_id = _us(fields, 0x0100), _us(fields, 0x0110)
        if command == C_ECHO_RQ:
            status = 0 if abstract == VERIFICATION else SOP_CLASS_NOT_SUPPORTED
            assoc.send(response(cid, C_ECHO_RSP, message_id, status, abstract))
            return
        if command != C_STORE_RQ:
            raise ProtocolError(f"DIMSE command 0x{command:04X} is not offered here (C-STORE and C-ECHO are)")
        if not pieces:
            raise ProtocolError("C-STORE request without a dataset")
        sop_class, sop_instance = _uid(fields.get(0x0002, b"")), _uid(fields.get(0x1000, b""))
        for name, uid in (("SOP Class", sop_class), ("SOP Instance", sop_instance)):
            if not uid or len(uid) > 64:  # not a UI value: it could not even be named in the answer
                raise ProtocolError(f"C-STORE request with an Affected {name} UID of {len(uid)} characters (1 to 64)")
        if abstract == VERIFICATION or sop_class != abstract:
            log.error("refusing %r from %s: SOP class %r sent on the context of %s", sop_instance[:80], assoc.peer,
                      sop_class[:80], abstract)
            status, comment = SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the presentation context's"
        else:
            try:
                status, comment = self.on_store(assoc, StoreRequest(message_id, sop_class, sop_instance, transfer,
                                                                    pieces))
            except Exception:  # a defect or an unexpected failure (the index, say): this instance's, not the node's
                log.exception("C-STORE of %r from %s: the receiver failed", sop_instance[:80], assoc.peer)
                status, comment = UNABLE_TO_PROCESS, "the receiver failed; its log says why"
        assoc.send(response(cid, C_STORE_RSP, message_id, status, sop_class, sop_instance, comment))
