"""Real peers on loopback for the end-to-end and reliability tests: free ports, dcmtk storescp as a PACS,
`livernode serve` as a subprocess, a throw-away PKI, and a C-STORE client that can misbehave.

Every child process writes its output to a log file, never to a pipe nobody reads: a child that fills a pipe
(about 64 KB) blocks on its next write, and a fast machine gets there first."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

ENV = dict(os.environ, TCP_NODELAY="1", TF_CPP_MIN_LOG_LEVEL="3")
FAULTY_NODE = Path(__file__).with_name("faulty_node.py")
_runs = itertools.count()


def logged_popen(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `args` with stdout and stderr appended to `log`; the Popen carries `log_path`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, env=env or ENV, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc.log_path = log
    return proc


def log_text(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""


# Ports for the servers the tests start, drawn from below the kernel's ephemeral range (32768 and up here), where
# nothing binds port 0: a port the kernel had just handed out could be taken, between this check and the server's
# own bind, by one of Ray's or gRPC's listeners (which bind port 0 and set SO_REUSEPORT) or by an outgoing
# connection, and a client then talks to the wrong server. Above 20000, Ray's worker ports (10002-19999) stay clear
# too. Each pytest-xdist worker draws from its own share, in turn, so two workers never pick the same port.
def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


PORTS = range(20000, min(32768, _ephemeral_start()))


def _port_share() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    index = (int(worker[2:]) if worker[2:].isdigit() else 0) % count
    size = len(PORTS) // count
    return range(PORTS.start + index * size, PORTS.start + (index + 1) * size)


SHARE = _port_share()
_first = os.getpid() % max(1, len(SHARE))  # another run on this machine starts elsewhere in the share
_next_port = itertools.cycle(itertools.chain(SHARE[_first:], SHARE[:_first]))


def free_port() -> int:
    """The next port of this worker's share that nothing is bound to on 127.0.0.1."""
    for _ in range(len(SHARE)):
        port = next(_next_port)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {SHARE}")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_port(port: int, proc=None, timeout: float = 60) -> None:
    def up():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}: {log_text(proc)[-3000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    wait_for(up, timeout, f"port {port}")


def loopback_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default ENV) with tests/loopback.c preloaded: for peers that have no option for their address and
    would listen on every interface. Built with gcc once per user into the temporary folder."""
    import tempfile

    src = Path(__file__).with_name("loopback.c")
    lib = Path(tempfile.gettempdir()) / f"livernode-loopback-{os.getuid()}-{int(src.stat().st_mtime)}.so"
    if not lib.exists():
        tmp = lib.with_name(f"{lib.name}.{os.getpid()}")
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"], check=True,
                       capture_output=True)
        os.replace(tmp, lib)  # atomic: two workers may build it at once
    return {**(env or ENV), "LD_PRELOAD": str(lib)}


def start_storescp(port: int, out: Path, *extra: str) -> subprocess.Popen:
    """dcmtk storescp as the PACS stand-in, writing what it receives to `out` and its log beside it; listening on
    127.0.0.1 only (`loopback_env`: storescp 3.6.7 has no option for its address)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = logged_popen(["/usr/bin/storescp", "-aet", "PACS", *extra, "-od", str(out), str(port)],
                        out.parent / f"storescp-{port}-{next(_runs)}.log", loopback_env())
    wait_port(port, proc)
    return proc


def stop_process(proc: subprocess.Popen) -> str:
    """Terminate (kill after 30 s) and return the process's log."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return log_text(proc)


# Nodes under test receive in this many processes (node.workers): 2, as the issue that made them asks of the
# reliability suite, unless LIVERNODE_TEST_RECEIVERS says otherwise (1: the single-process receiver).
RECEIVERS = os.environ.get("LIVERNODE_TEST_RECEIVERS", "2")


def start_node(state: Path, model: Path, *args: str, faults: dict[str, str] | None = None,
               env: dict[str, str] | None = None, log_format: str = "text") -> subprocess.Popen:
    """`livernode serve` on `state`, its log in a new file beside the state folder. `faults` (environment
    variables read by tests/faulty_node.py) start it through that wrapper instead."""
    cmd = [sys.executable, str(FAULTY_NODE)] if faults else [sys.executable, "-m", "livernode.cli"]
    if "--port" in args:  # a node killed just before may still listen there through its receivers
        port = int(args[args.index("--port") + 1])
        wait_for(lambda: _released(port), 30, f"port {port} released by an earlier node's receiver processes", 0.02)
    log = state.parent / f"{state.name}-node-{next(_runs)}.log"
    receivers = [] if "--workers" in args else ["--workers", RECEIVERS]
    return logged_popen([*cmd, "--log-format", log_format, "serve", "--model", str(model), "--providers", "cpu", "--state", str(state),
                         "--bind", "127.0.0.1", "--study-timeout", "1", "--metrics-port", "0", *receivers, *args], log,
                        {**ENV, **(faults or {}), **(env or {})})


def _released(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port`. A node's receiver processes die a moment after the node itself
    (PR_SET_PDEATHSIG), and until then they hold its listening socket: a node started on the port meanwhile would
    look ready to wait_port while only the dying receivers answer (CI once saw storescu refused right after)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_node(proc: subprocess.Popen, timeout: float = 60) -> str:
    """SIGTERM (SIGKILL after `timeout`) and return the node's log."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return log_text(proc)


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    """(HTTP status, body) of the node's metrics endpoint."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str) -> float | None:
    """The value of one sample (`name` with its labels, as written) in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def storescu(port: int, files, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["/usr/bin/storescu", "-v", "-aec", "LIVERNODE", *extra, "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True, env=ENV, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def restamp(files: list[Path], out: Path) -> list[Path]:
    """The same slices as a new study in `out`: new Study, Series and SOP Instance UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
        paths.append(out / f"{i:04d}.dcm")
    return paths


class PacsStandIn:
    """A pynetdicom PACS on a free loopback port for the cases dcmtk's storescp cannot play: it accepts only
    `sop_classes`, answers each C-STORE with `status(event)` (default success) and can hold its first answer
    for `hold_first_s`. `received` lists (SOP Class UID, SOP Instance UID) in arrival order."""

    def __init__(self, sop_classes=None, status=None, hold_first_s: float = 0.0) -> None:
        import threading

        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage

        self.received: list[tuple[str, str]] = []
        self.first = threading.Event()
        self.hold_first_s, self.status = hold_first_s, status or (lambda event: 0x0000)
        ae = AE(ae_title="PACS")
        for sop_class in sop_classes or (SegmentationStorage, Comprehensive3DSRStorage):
            ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        self.received.append((str(event.request.AffectedSOPClassUID), str(event.request.AffectedSOPInstanceUID)))
        if not self.first.is_set():
            self.first.set()
            time.sleep(self.hold_first_s)
        return self.status(event)

    def shutdown(self) -> None:
        self.server.shutdown()


def make_pki(d: Path) -> Path:
    """A CA with a server certificate for 127.0.0.1 and a client certificate, plus a second, untrusted CA with
    its own client certificate: ca.pem server.pem/key client.pem/key rogue-ca.pem rogue.pem/key."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days",
            "2", "-subj", f"/CN=test-{ca}")
    for name, ca in (("server", "ca"), ("client", "ca"), ("rogue", "rogue-ca")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'127.0.0.1' if name == 'server' else name}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return d


def encoded(ds) -> bytes:
    """A dataset encoded as it travels in P-DATA (Explicit VR Little Endian, no file meta)."""
    from pynetdicom.dsutils import encode

    return encode(ds, False, True)


class RawClient:
    """An association on which the test chooses the C-STORE request and the dataset bytes independently, and may
    stop in the middle of a dataset: what a broken or hostile peer can send."""

    def __init__(self, port: int, called: str = "LIVERNODE", calling: str = "TESTSCU") -> None:
        from pydicom.uid import ExplicitVRLittleEndian
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage

        ae = AE(ae_title=calling)
        ae.dimse_timeout = ae.network_timeout = 20
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self.assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert self.assoc.is_established, "association refused"
        # Pause the association's reactor as pynetdicom's own send_c_store() does; otherwise the reactor can take
        # the response off the queue first and this client waits for nothing.
        self.assoc._reactor_checkpoint.clear()
        while not self.assoc._is_paused:
            time.sleep(0.0001)
        self._message_id = 0

    def _request(self, payload: bytes, sop_instance_uid: str):
        from pynetdicom.dimse_primitives import C_STORE
        from pynetdicom.sop_class import CTImageStorage

        self._message_id += 1
        req = C_STORE()
        req.MessageID, req.Priority = self._message_id, 2
        req.AffectedSOPClassUID = CTImageStorage
        req._affected_sop_instance_uid = sop_instance_uid  # unvalidated on purpose: the server must judge it
        req.DataSet = BytesIO(payload)
        return req

    def store(self, payload: bytes, sop_instance_uid: str) -> int | None:
        """The response status, or None when the server aborted the association instead of answering."""
        self.assoc.dimse.send_msg(self._request(payload, sop_instance_uid),
                                  self.assoc.accepted_contexts[0].context_id)
        _, rsp = self.assoc.dimse.get_msg(block=True)
        return None if rsp is None else rsp.Status

    def store_partially_then_abort(self, payload: bytes, sop_instance_uid: str, fraction: float = 0.5) -> None:
        """Send the command and the first `fraction` of the dataset's P-DATA fragments, then A-ABORT."""
        from pynetdicom.dimse_messages import C_STORE_RQ

        msg = C_STORE_RQ()
        msg.primitive_to_message(self._request(payload, sop_instance_uid))
        pdus = list(msg.encode_msg(self.assoc.accepted_contexts[0].context_id, 4096))
        for pdu in pdus[: max(2, int(len(pdus) * fraction))]:
            self.assoc.dul.send_pdu(pdu)
        time.sleep(0.2)
        self.assoc._reactor_checkpoint.set()
        self.assoc.abort()

    def close(self) -> None:
        self.assoc._reactor_checkpoint.set()
        if self.assoc.is_established:
            self.assoc.release()


def at_pacs(out: Path, n: int = 2) -> list[Path] | None:
    """The files a PACS stand-in wrote to `out` once there are at least n and each reads back whole; else None.
    storescp writes under the final name while it receives, so a file that is there may still be growing."""
    import pydicom

    files = sorted(p for p in out.iterdir() if p.is_file())
    if len(files) < n:
        return None
    for p in files:
        try:
            pydicom.dcmread(p)
        except Exception:  # still arriving (no preamble yet, or cut short): look again later
            return None
    return files
