"""The online half of the demo: the node on loopback, a study sent by C-STORE, SEG and SR received by a PACS
stand-in, validated, and the summary printed."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import highdicom as hd
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage

from livernode.config import load_daemon_config
from livernode.daemon import netclock  # noqa: F401 - importing it puts pynetdicom's timers on the monotonic clock
from livernode.daemon.send import Destination, send_files
from livernode.daemon.service import Service
from livernode.errors import LivernodeError
from livernode.fsutil import write_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pacs_stand_in(folder: Path):
    """A minimal PACS: accepts SEG and SR, writes each to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title="DEMOPACS")
    for sop in (SegmentationStorage, Comprehensive3DSRStorage):
        ae.add_supported_context(sop, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        write_dataset(folder / f"{ds.Modality}.dcm", ds)
        return 0x0000
    return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def _validate(path: Path) -> str:
    """dciodvfy's verdict (or highdicom's read-back where dciodvfy is missing); LivernodeError on any error."""
    if shutil.which("dciodvfy") or Path("/usr/bin/dciodvfy").exists():
        r = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
        errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
        if errors:
            raise LivernodeError(f"{path}: dciodvfy reports {len(errors)} error(s), first: {errors[0]}")
        return "dciodvfy: 0 errors"
    (hd.seg.segread if "SEG" in path.name else hd.sr.srread)(path)
    return "read back by highdicom (dciodvfy not installed)"


def run_node_demo(workdir: Path, model: Path, study: Path) -> None:
    pacs_dir = workdir / "pacs"
    shutil.rmtree(pacs_dir, ignore_errors=True)
    shutil.rmtree(workdir / "node-state", ignore_errors=True)
    pacs = _pacs_stand_in(pacs_dir)
    port = _free_port()
    cfg = load_daemon_config(None, {
        "inference.model": model, "inference.providers": "auto", "node.bind": "127.0.0.1", "node.port": port,
        "paths.state": workdir / "node-state", "study.quiet_seconds": 1,
        "send.destinations": [f"DEMOPACS@127.0.0.1:{pacs.server_address[1]}"], "observability.metrics_port": 0})
    service = Service(cfg)
    service.start()
    worker = threading.Thread(target=service.run_forever, daemon=True)
    worker.start()
    try:
        files = sorted((study / "ct").glob("*.dcm"))
        t0 = time.monotonic()
        send_files(files, Destination("LIVERNODE", "127.0.0.1", port), calling_ae="DEMOSCU")
        print(f"\nsent {len(files)} CT images to the node (LIVERNODE@127.0.0.1:{port}) by C-STORE")
        end = time.monotonic() + 300
        while len(list(pacs_dir.glob("*.dcm"))) < 2:
            if time.monotonic() > end:
                raise LivernodeError("the PACS stand-in did not receive SEG and SR within 5 minutes")
            time.sleep(0.2)
        print(f"PACS stand-in received SEG and SR {time.monotonic() - t0:.1f} s after the send began")
    finally:
        service.stop()
        worker.join(timeout=30)
        pacs.shutdown()
    for name in ("SEG.dcm", "SR.dcm"):
        print(f"  {name}: {_validate(pacs_dir / name)}")
    result = next((workdir / "node-state" / "results").glob("*/gen-*"))
    import json

    s = json.loads((result / "summary.json").read_text())
    rows = [("liver volume", f"{s['liver_volume_ml']:.1f} mL" + ("" if s["liver_complete"] else " (cut off)")),
            ("tumour volume", f"{s['tumour_volume_ml']:.1f} mL"),
            ("tumour burden", f"{s['tumour_burden_percent']:.2f} %"),
            ("lesions", str(s["lesion_count"])),
            ("providers", ", ".join(s["providers"])),
            *([("statement", s["research_use"])] if s.get("research_use") else []),
            ("stages", ", ".join(f"{k} {v:.2f} s" for k, v in s["timings_s"].items()))]
    rows += [(f"  lesion {les['index']}", f"{les['volume_ml']:.2f} mL, long axis {les['longest_axial_diameter_mm']:.1f} mm")
             for les in s["lesions"]]
    width = max(len(r[0]) for r in rows)
    print("\nStudy summary")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    print(f"\npreview: {result / 'preview.png'}")
