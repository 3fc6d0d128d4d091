"""Send-back by C-STORE. An item counts as delivered only when the peer answered 0x0000 or a 0xB0xx warning."""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE

from livernode.config import DestinationConfig, TlsConfig
from livernode.errors import ConfigError

log = logging.getLogger(__name__)
DEST_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    tls: TlsConfig | None = None

    @classmethod
    def parse(cls, text: str) -> "Destination":
        m = DEST_RE.match(text.strip())
        if not m:
            raise ConfigError(f"destination {text!r}: expected AET@HOST:PORT, e.g. PACS@127.0.0.1:4242")
        return cls(m["aet"], m["host"], int(m["port"]))

    @classmethod
    def from_config(cls, item: str | DestinationConfig) -> "Destination":
        if isinstance(item, str):
            return cls.parse(item)
        return cls(item.ae_title, item.host, item.port, item.tls)

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.tls.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls.cert_file:
            ctx.load_cert_chain(str(self.tls.cert_file), str(self.tls.key_file) if self.tls.key_file else None)
        return ctx

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class SendError(Exception):
    """A send did not complete; the message says which instance and why."""


def send_files(paths: list[Path], dest: Destination, calling_ae: str = "LIVERNODE", timeout: float = 30) -> None:
    """C-STORE every file in one association proposing exactly the SOP classes (and stored transfer syntaxes) sent.

    Raises SendError unless every instance was acknowledged with success or a warning."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    ctx = dest.ssl_context()
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         tls_args=(ctx, dest.host) if ctx is not None else None)
    if not assoc.is_established:
        raise SendError(f"{dest}: association {'rejected' if assoc.is_rejected else 'failed'}")
    try:
        for path, ds in zip(paths, datasets):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise SendError(f"{dest}: no response for {path.name} (connection lost or timed out)")
            if code & 0xF000 == 0xB000:
                log.warning("%s stored %s with warning status 0x%04X", dest, path.name, code)
            elif code != 0x0000:
                raise SendError(f"{dest}: {path.name} refused with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
