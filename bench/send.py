"""Benchmark part: sending one study's results to PACS. The SEG and SR that the end-to-end part's node delivered
(200 slices of 512x512) go to a dcmtk storescp, which takes PDUs of 16 KiB (its default, and a usual PACS's), as
the node's sender sends them: each file read and checked (sender._read), then livernode's requestor sending each
file's bytes. The peer is the same reading, then pynetdicom's AE sending the same files' bytes (send_c_store of
the path with STORE_SEND_CHUNKED_DATASET), as the node did before. Interleaved rounds; the fastest of each.

Run alone: `python -m bench.send SEG SR` (two files)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from bench.common import best_interleaved, free_port, storescp, wait_port

ROUNDS = 5


def run(files: list[Path], rounds: int = ROUNDS) -> dict:
    from pynetdicom import AE, _config

    from livernode.daemon.send import Destination, send_datasets
    from livernode.daemon.sender import _read

    out = Path(tempfile.mkdtemp(prefix="bench-send-"))
    port = free_port()
    pacs = storescp(out, port)
    dest = Destination("PACS", "127.0.0.1", port)
    names = [f.name for f in files]

    def requestor():
        outcomes = send_datasets([_read(f) for f in files], names, dest, files=files)
        if not all(o.stored for o in outcomes):
            raise RuntimeError(f"livernode's requestor: {[o.error for o in outcomes]}")

    def pynetdicom_ae():
        datasets = [_read(f) for f in files]
        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title="LIVERNODE")
        for ds in datasets:
            ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
        try:
            statuses = [getattr(assoc.send_c_store(f), "Status", None) for f in files]
        finally:
            assoc.release()
        if statuses != [0] * len(files):
            raise RuntimeError(f"pynetdicom's AE: statuses {statuses}")

    try:
        wait_port(port, pacs)
        ours, peer = best_interleaved(requestor, pynetdicom_ae, rounds)
    finally:
        pacs.terminate()
        pacs.wait(30)
        shutil.rmtree(out, ignore_errors=True)
    return {"files": names, "bytes": sum(f.stat().st_size for f in files), "rounds": rounds,
            "requestor_s": ours, "pynetdicom_s": peer, "speedup": peer / ours}


if __name__ == "__main__":
    print(json.dumps(run([Path(p) for p in sys.argv[1:]]), indent=1))
