"""The floor of a Python receiver, for the ingest benchmark: pynetdicom with nothing but a durable write per
instance (livernode's own `atomic_write`: temp file, fsync, rename, directory fsync) and no checks, no index, no
audit. `python bench/bare_scp.py OUT_DIR PORT`; runs until terminated."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from livernode.fsutil import atomic_write


def main(out: Path, port: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    count = 0

    def on_store(event) -> int:
        nonlocal count
        count += 1
        atomic_write(out / f"{count}.dcm", event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="LIVERNODE")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    signal.signal(signal.SIGTERM, lambda *_: (server.shutdown(), sys.exit(0)))
    signal.pause()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
