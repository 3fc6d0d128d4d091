"""A second floor for the ingest benchmark: a C-STORE receiver without pynetdicom, written straight against the
DICOM upper layer (PS3.8) with blocking sockets, one thread per association, and the same durable write per
instance as bench/bare_scp.py (livernode's `atomic_write`: temp file, fsync, rename, directory fsync). It accepts CT
Image Storage in Explicit or Implicit VR Little Endian, and Verification; it checks nothing else. It measures what
a receiver costs when each PDU is read once into one buffer and nothing is queued between threads: the question
being whether a receive path of livernode's own would reach the ingest target that pynetdicom's does not.
`python bench/raw_scp.py OUT_DIR PORT`; runs until terminated."""

from __future__ import annotations

import itertools
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from livernode.fsutil import atomic_write
from livernode.imaging.dicomio import part10_header

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION, CT_IMAGE = "1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
ACCEPT, ABSTRACT_NOT_SUPPORTED, SYNTAX_NOT_SUPPORTED = 0, 3, 4


def _read(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("peer closed the connection")
        got += k
    return buf


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def _items(data, start: int = 0):
    """(type, value) of the variable items in `data` from `start` on."""
    while start + 4 <= len(data):
        kind, length = data[start], struct.unpack_from(">H", data, start + 2)[0]
        yield kind, bytes(data[start + 4:start + 4 + length])
        start += 4 + length


def _uid(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii")


def _accept(rq: bytearray) -> tuple[bytes, dict[int, str]]:
    """A-ASSOCIATE-AC for an A-ASSOCIATE-RQ's body, and the accepted contexts' transfer syntaxes by id."""
    contexts, results = {}, []
    for kind, value in _items(rq, 68):  # after version, reserved, called and calling AE titles, reserved
        if kind != 0x20:
            continue
        cid, subs = value[0], list(_items(value, 4))
        abstract = next((_uid(v) for k, v in subs if k == 0x30), "")
        offered = [_uid(v) for k, v in subs if k == 0x40]
        chosen = next((ts for ts in (EXPLICIT, IMPLICIT) if ts in offered), None)
        if abstract not in (CT_IMAGE, VERIFICATION):
            results.append(_item(0x21, bytes([cid, 0, ABSTRACT_NOT_SUPPORTED, 0]) + _item(0x40, IMPLICIT.encode())))
        elif chosen is None:
            results.append(_item(0x21, bytes([cid, 0, SYNTAX_NOT_SUPPORTED, 0]) + _item(0x40, IMPLICIT.encode())))
        else:
            contexts[cid] = chosen
            results.append(_item(0x21, bytes([cid, 0, ACCEPT, 0]) + _item(0x40, chosen.encode())))
    user = _item(0x50, _item(0x51, struct.pack(">I", 0)) + _item(0x52, PYDICOM_IMPLEMENTATION_UID.encode()))
    body = struct.pack(">HH", 1, 0) + bytes(rq[4:36]) + bytes(32) + _item(0x10, APPLICATION_CONTEXT) + \
        b"".join(results) + user
    return _pdu(0x02, body), contexts


def _command(data: bytes) -> dict[int, bytes]:
    """A command set (implicit VR little endian, group 0000) by element number."""
    out, at = {}, 0
    while at + 8 <= len(data):
        _, element, length = struct.unpack_from("<HHI", data, at)
        out[element] = data[at + 8:at + 8 + length]
        at += 8 + length
    return out


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0, element, len(value)) + value


def _response(cid: int, command: dict[int, bytes], field: int, status: int) -> bytes:
    """The P-DATA-TF of a C-STORE-RSP or C-ECHO-RSP to `command`."""
    body = b"".join([_element(0x0002, command.get(0x0002, b"")), _element(0x0100, struct.pack("<H", field)),
                     _element(0x0120, command.get(0x0110, b"\0\0")), _element(0x0800, struct.pack("<H", 0x0101)),
                     _element(0x0900, struct.pack("<H", status))] +
                    ([_element(0x1000, command[0x1000])] if 0x1000 in command else []))
    data = _element(0x0000, struct.pack("<I", len(body))) + body
    return _pdu(0x04, struct.pack(">IBB", len(data) + 2, cid, 0x03) + data)


def _associate(conn: socket.socket, out: Path, names) -> None:
    command, pieces, fields = b"", [], {}
    contexts: dict[int, str] = {}
    while True:
        head = _read(conn, 6)
        kind, length = head[0], struct.unpack_from(">I", head, 2)[0]
        body = _read(conn, length)
        if kind == 0x01:  # A-ASSOCIATE-RQ
            ac, contexts = _accept(body)
            conn.sendall(ac)
        elif kind == 0x04:  # P-DATA-TF: presentation data values
            at = 0
            while at < len(body):
                size, cid, control = struct.unpack_from(">IBB", body, at)
                value = memoryview(body)[at + 6:at + 4 + size]
                at += 4 + size
                if control & 1:  # a command fragment
                    command += bytes(value)
                    if not control & 2:
                        continue
                    fields = _command(command)
                    command = b""
                    if struct.unpack("<H", fields[0x0100])[0] == C_ECHO_RQ:
                        conn.sendall(_response(cid, fields, 0x8030, 0))
                    continue
                pieces.append(value)
                if control & 2:  # the dataset's last fragment: store it, then answer
                    header = part10_header(_uid(fields[0x0002]), _uid(fields[0x1000]), contexts[cid],
                                           PYDICOM_IMPLEMENTATION_UID, "RAW_SCP")
                    atomic_write(out / f"{next(names)}.dcm", [header, *pieces])
                    pieces = []
                    conn.sendall(_response(cid, fields, 0x8001, 0))
        elif kind == 0x05:  # A-RELEASE-RQ
            conn.sendall(_pdu(0x06, bytes(4)))
            return
        else:  # A-ABORT or anything unexpected
            return


def main(out: Path, port: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = itertools.count(1)  # next() of itertools.count is atomic under the interpreter lock
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_guarded, args=(conn, out, names), daemon=True).start()


def _guarded(conn: socket.socket, out: Path, names) -> None:
    with conn:
        try:
            _associate(conn, out, names)
        except ConnectionError:
            pass


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
