"""A floor for the ingest benchmark: livernode's own upper layer (livernode/daemon/upper_layer.py) with the same
durable write per instance as bench/bare_scp.py (`atomic_write`: temp file, fsync, rename, directory fsync) and
nothing else: no decode, no checks, no index, no audit. Against `livernode serve` it shows what the node's steps
per instance cost; against bench/bare_scp.py, what the upper layer costs next to pynetdicom's.
`python bench/raw_scp.py OUT_DIR PORT`; runs until terminated."""

from __future__ import annotations

import itertools
import signal
import socket
import sys
from pathlib import Path

from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from livernode.daemon.upper_layer import VERIFICATION, Acceptor
from livernode.fsutil import atomic_write
from livernode.imaging.dicomio import part10_header

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def main(out: Path, port: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = itertools.count(1)  # next() of itertools.count is atomic under the interpreter lock
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

    def on_store(assoc, req) -> tuple[int, str]:
        header = part10_header(req.sop_class_uid, req.sop_instance_uid, req.transfer_syntax,
                               PYDICOM_IMPLEMENTATION_UID, "RAW_SCP")
        atomic_write(out / f"{next(names)}.dcm", [header, *req.pieces])
        return 0x0000, ""

    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    acceptor = Acceptor(listener, decide=lambda rq, assoc, others: {CT_IMAGE: syntaxes, VERIFICATION: syntaxes},
                        on_store=on_store, implementation_uid=PYDICOM_IMPLEMENTATION_UID, name="RAW_SCP")
    acceptor.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.pause()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
