"""Real peers on loopback for the end-to-end and reliability tests: free ports, dcmtk storescp as a PACS,
`livernode serve` as a subprocess, a throw-away PKI, and a C-STORE client that can misbehave."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

ENV = dict(os.environ, TCP_NODELAY="1", TF_CPP_MIN_LOG_LEVEL="3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            raise AssertionError(f"process exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    wait_for(up, timeout, f"port {port}")


def start_storescp(port: int, out: Path, *extra: str) -> subprocess.Popen:
    """dcmtk storescp as the PACS stand-in, writing what it receives to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", *extra, "-od", str(out), str(port)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_port(port, proc)
    return proc


def stop_process(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or ""


def start_node(state: Path, model: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "livernode.cli", "serve", "--model", str(model), "--providers",
                             "cpu", "--state", str(state), "--study-timeout", "1", "--metrics-port", "0", *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_node(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def storescu(port: int, files, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["/usr/bin/storescu", "-v", "-aec", "LIVERNODE", *extra, "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True, env=ENV, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


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
