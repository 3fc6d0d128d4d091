"""Send-back by C-STORE. An instance counts as delivered only when the peer answered 0x0000 or a 0xB0xx warning;
each instance has its own outcome."""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.uid
from pydicom import Dataset
from pynetdicom import AE, _config, evt

from livernode.config import DestinationConfig, TlsConfig
from livernode.daemon import netclock  # noqa: F401 - importing it puts pynetdicom's timers on the monotonic clock
from livernode.errors import ConfigError

log = logging.getLogger(__name__)
# An instance whose file the caller names is sent as the file's own bytes (send_c_store given its path), not encoded again
# from the dataset: the same bytes on the wire, and a SEG's thousands of per-frame items are not encoded a second
# time. It needs an accepted context in the file's own transfer syntax, which is the only one `send_datasets`
# proposes. The flag changes only calls that pass a path.
_config.STORE_SEND_CHUNKED_DATASET = True
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


@dataclass(frozen=True)
class Outcome:
    """What became of one instance: stored (0x0000 or a 0xB0xx warning), or why not. An outcome that is neither
    stored nor has an error was not attempted, because the node is stopping."""

    stored: bool
    error: str = ""


NOT_ATTEMPTED = Outcome(False)


def _sop_name(uid: str) -> str:
    name = pydicom.uid.UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def send_datasets(datasets: list[Dataset], names: list[str], dest: Destination, calling_ae: str = "LIVERNODE",
                  timeout: float = 30, *, progress: Callable[[], None] = lambda: None,
                  stopping: Callable[[], bool] = lambda: False, files: list[Path | None] | None = None
                  ) -> list[Outcome]:
    """C-STORE `datasets` (named `names` in messages) in one association proposing exactly their SOP classes and
    stored transfer syntaxes; one Outcome per dataset, in order. `files`: the files the datasets were read from,
    unchanged since; each goes out as its own bytes when its file meta names the same instance (`_as_sent`).

    An instance whose presentation context the peer refused fails with the SOP class named, and the others are
    still sent. A failure of the association or connection fails every instance not yet stored. `progress()` is
    called before each C-STORE and for every PDU sent; once `stopping()` is true, the remaining instances are left
    unattempted. Each network step (connect and TLS handshake, association, each response) waits at most
    `timeout` seconds."""
    ae = AE(ae_title=calling_ae)
    # connection_timeout covers the TCP connect and the TLS handshake: without it a peer that accepts and stays
    # silent holds the sender for good.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    wanted = [(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets]
    for sop_class, ts in sorted(set(wanted)):
        ae.add_requested_context(sop_class, ts)
    ctx = dest.ssl_context()
    progress()
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         tls_args=(ctx, dest.host) if ctx is not None else None,
                         evt_handlers=[(evt.EVT_PDU_SENT, lambda event: progress())])  # a large upload is progress
    refused = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.rejected_contexts}
    if not assoc.is_established:
        if refused:  # the peer accepted none of what we proposed
            return [Outcome(False, _refused(dest, sop, ts)) for sop, ts in wanted]
        why = f"{dest}: association {'rejected' if assoc.is_rejected else 'failed'}"
        return [Outcome(False, why)] * len(datasets)
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    outcomes: list[Outcome] = []
    try:
        for i, (name, ds, (sop, ts)) in enumerate(zip(names, datasets, wanted)):
            if (sop, ts) not in accepted:
                outcomes.append(Outcome(False, _refused(dest, sop, ts)))
                continue
            if stopping():
                outcomes.append(NOT_ATTEMPTED)
                continue
            if not assoc.is_established:
                outcomes.append(Outcome(False, f"{dest}: connection lost before {name} was sent"))
                continue
            progress()
            status = assoc.send_c_store(_as_sent(ds, files[i] if files else None))
            code = getattr(status, "Status", None)
            if code is None:
                outcomes.append(Outcome(False, f"{dest}: no response for {name} (connection lost or timed out)"))
            elif code & 0xF000 == 0xB000:
                log.warning("%s stored %s with warning status 0x%04X", dest, name, code)
                outcomes.append(Outcome(True))
            elif code != 0x0000:
                outcomes.append(Outcome(False, f"{dest}: {name} refused with status 0x{code:04X}"))
            else:
                outcomes.append(Outcome(True))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _as_sent(ds: Dataset, path: Path | None) -> Dataset | Path:
    """`path`, the file `ds` was read from, when it can go out as it lies: its file meta names the dataset's SOP
    class and instance, and the dataset was read in the encoding its transfer syntax says (pynetdicom takes all
    three from the file meta and sends the bytes unchecked). Otherwise the dataset, encoded by pynetdicom."""
    if path is None:
        return ds
    meta = getattr(ds, "file_meta", None) or {}
    ts = meta.get("TransferSyntaxUID")
    try:
        encoding = (ts.is_implicit_VR, ts.is_little_endian)
    except (AttributeError, ValueError):  # none, or not a transfer syntax pydicom knows
        return ds
    if (meta.get("MediaStorageSOPClassUID") != ds.get("SOPClassUID")
            or meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID")
            or tuple(ds.original_encoding) != encoding):
        return ds
    return Path(path)


def _refused(dest: Destination, sop: str, ts: str) -> str:
    return (f"{dest} does not accept {_sop_name(sop)} in {_sop_name(ts)}: the presentation context was refused "
            "at association negotiation")


def send_files(paths: list[Path], dest: Destination, calling_ae: str = "LIVERNODE", timeout: float = 30) -> None:
    """C-STORE every file in one association; raises SendError unless every instance was stored."""
    outcomes = send_datasets([pydicom.dcmread(p) for p in paths], [p.name for p in paths], dest, calling_ae,
                             timeout, files=list(paths))
    errors = [o.error for o in outcomes if not o.stored]
    if errors:
        raise SendError("; ".join(dict.fromkeys(errors)))
