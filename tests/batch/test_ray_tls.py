"""`livernode batch --ray local` with Ray's TLS on (mutual, with the certificates an operator would make) as well
as token authentication: the batch runs, and Ray's control port refuses a plain-text client and a client without
the token. The batch runs in its own process, as an operator starts it: Ray reads its TLS settings once, when it
is imported."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest

from livernode.batch import CSV_NAME
from livernode.raycluster import listeners, listeners_beyond_loopback
from tests.batch.conftest import read_rows
from tests.peers import make_pki

pytestmark = pytest.mark.ray


def gcs_call(port: int, credentials=None, token: str | None = None):
    """Ray's GetClusterId on the control server (GCS) at 127.0.0.1:`port`, plain text or over TLS."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        return stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=10,
                                 metadata=[("authorization", f"Bearer {token}")] if token else None)


def test_batch_on_ray_with_tls(archive, liver_model, tmp_path):
    import grpc

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path / "home"), RAY_AUTH_TOKEN=token, RAY_USE_TLS="1",
               RAY_TLS_SERVER_CERT=str(pki / "server.pem"), RAY_TLS_SERVER_KEY=str(pki / "server.key"),
               RAY_TLS_CA_CERT=str(pki / "ca.pem"))
    root, out = archive.subset(tmp_path / "in", set(archive.good[:2])), tmp_path / "out"

    # a certificate file that is not there is named before Ray starts, not met as a hang
    missing = dict(env, RAY_TLS_CA_CERT=str(pki / "nowhere.pem"))
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "batch", str(root), "--model", str(liver_model),
                        "--out", str(tmp_path / "refused"), "--ray", "local"], env=missing, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and f"RAY_TLS_CA_CERT: cannot read {pki / 'nowhere.pem'}" in r.stderr, r.stderr[-2000:]

    answers: dict = {}
    with open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen([sys.executable, "-m", "livernode.cli", "batch", str(root), "--model",
                                 str(liver_model), "--out", str(out), "--ray", "local", "--workers", "1"],
                                stdout=subprocess.DEVNULL, stderr=se, env=env)
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline and not answers:
                gcs = [port for _, port, _, name in listeners(proc.pid) if name == "gcs_server"]
                if gcs:
                    answers["beyond_loopback"] = listeners_beyond_loopback(proc.pid)
                    read = lambda name: (pki / name).read_bytes()  # noqa: E731
                    mutual = grpc.ssl_channel_credentials(read("ca.pem"), read("server.key"), read("server.pem"))
                    for case, creds, tok in (("plain", None, token), ("no token", mutual, None),
                                             ("tls", mutual, token)):
                        try:
                            answers[case] = gcs_call(gcs[0], creds, tok).cluster_id
                        except grpc.RpcError as exc:
                            answers[case] = exc.code()
                time.sleep(0.1)
            assert proc.wait(timeout=300) == 0, (tmp_path / "stderr").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert answers, "Ray's control server was never seen listening"
    assert answers["plain"] == grpc.StatusCode.UNAVAILABLE  # plain text: the TLS server drops it
    assert answers["no token"] == grpc.StatusCode.UNAUTHENTICATED
    assert isinstance(answers["tls"], bytes) and answers["tls"]
    assert answers["beyond_loopback"] == []
    assert "TLS on" in (tmp_path / "stderr").read_text()
    rows = read_rows(out / CSV_NAME)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"}
