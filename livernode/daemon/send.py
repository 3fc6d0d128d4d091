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
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
from pynetdicom.dsutils import encode

from livernode.config import DestinationConfig, TlsConfig
from livernode.daemon.requestor import AssociationFailed, AssociationRejected, associate, describe
from livernode.daemon.upper_layer import VERSION_NAME, ProtocolError
from livernode.errors import ConfigError
from livernode.imaging.dicomio import dataset_offset

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
    """C-STORE `datasets` (named `names` in messages) in one association (livernode's requestor) proposing exactly
    their SOP classes and stored transfer syntaxes; one Outcome per dataset, in order. `files`: the files the
    datasets were read from, unchanged since; each goes out as its own bytes after its file meta when that file
    meta names the same instance (`_file_matches`), any other dataset as pydicom encodes it.

    An instance whose presentation context the peer refused fails with the SOP class named, and the others are
    still sent. A failure of the association or connection fails every instance not yet stored. `progress()` is
    called before the association, before each C-STORE and after each write of PDUs; once `stopping()` is true,
    the remaining instances are left unattempted. Each network step (connect, each read of the TLS handshake,
    association, each write of up to half a megabyte, each response, the release) waits at most `timeout`
    seconds."""
    wanted = [(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets]
    progress()
    try:
        assoc = associate(dest.host, dest.port, called=dest.ae_title, calling=calling_ae,
                          contexts=sorted(set(wanted)), timeout=timeout, implementation_uid=PYDICOM_IMPLEMENTATION_UID,
                          version_name=VERSION_NAME, tls=dest.ssl_context(), on_sent=progress)
    except AssociationFailed as exc:
        kind = "" if isinstance(exc, AssociationRejected) else "failed: "
        return [Outcome(False, f"{dest}: association {kind}{exc}")] * len(datasets)
    outcomes: list[Outcome] = []
    try:
        for i, (name, ds, (sop, ts)) in enumerate(zip(names, datasets, wanted)):
            if (sop, ts) not in assoc.accepted:
                outcomes.append(Outcome(False, _refused(dest, sop, ts, assoc.refused.get((sop, ts), ""))))
                continue
            if stopping():
                outcomes.append(NOT_ATTEMPTED)
                continue
            if not assoc.established:
                outcomes.append(Outcome(False, f"{dest}: connection lost before {name} was sent"))
                continue
            progress()
            try:
                data = _payload(ds, files[i] if files else None)
            except (OSError, ValueError) as exc:
                outcomes.append(Outcome(False, f"{name} could not be read for sending: {exc}"))
                continue
            try:
                rsp = assoc.store(sop, str(ds.SOPInstanceUID), ts, data)
            except (OSError, ProtocolError) as exc:
                outcomes.append(Outcome(False, f"{dest}: no response for {name} ({describe(exc)})"))
                continue
            except Exception as exc:  # noqa: BLE001 - this instance's failure; those stored keep their outcome
                outcomes.append(Outcome(False, f"{dest}: {name} not sent: {describe(exc)}"))
                continue
            comment = f" ({rsp.comment})" if rsp.comment else ""
            if rsp.status & 0xF000 == 0xB000:
                log.warning("%s stored %s with warning status 0x%04X%s", dest, name, rsp.status, comment)
                outcomes.append(Outcome(True))
            elif rsp.status != 0x0000:
                outcomes.append(Outcome(False, f"{dest}: {name} refused with status 0x{rsp.status:04X}{comment}"))
            else:
                outcomes.append(Outcome(True))
    finally:
        assoc.release()
    return outcomes


def _payload(ds: Dataset, path: Path | None) -> bytes | memoryview:
    """The dataset as it goes on the wire, encoded in its transfer syntax: the bytes of its file after the file
    meta where `_file_matches` and the file meta adds up, else pydicom's encoding of `ds`. OSError if the file
    cannot be read, ValueError if neither can be had."""
    if path is not None and _file_matches(ds):
        raw = Path(path).read_bytes()
        try:
            return memoryview(raw)[dataset_offset(raw):]
        except ValueError as exc:  # a file meta that does not add up: the dataset as pydicom read it instead
            log.warning("%s: %s; sending the dataset encoded again", Path(path).name, exc)
    ts = ds.file_meta.TransferSyntaxUID
    data = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if data is None:
        raise ValueError(f"it cannot be encoded in {_sop_name(ts)}")
    return data


def _file_matches(ds: Dataset) -> bool:
    """Whether the file `ds` was read from can go out as it lies: its file meta names the dataset's SOP class and
    instance, and the dataset was read in the encoding its transfer syntax says."""
    meta = getattr(ds, "file_meta", None) or {}
    ts = meta.get("TransferSyntaxUID")
    try:
        encoding = (ts.is_implicit_VR, ts.is_little_endian)
    except (AttributeError, ValueError):  # none, or not a transfer syntax pydicom knows
        return False
    return (meta.get("MediaStorageSOPClassUID") == ds.get("SOPClassUID")
            and meta.get("MediaStorageSOPInstanceUID") == ds.get("SOPInstanceUID")
            and tuple(ds.original_encoding) == encoding)


def _refused(dest: Destination, sop: str, ts: str, why: str = "") -> str:
    return (f"{dest} does not accept {_sop_name(sop)} in {_sop_name(ts)}: the presentation context was refused "
            f"at association negotiation{f' ({why})' if why else ''}")


def send_files(paths: list[Path], dest: Destination, calling_ae: str = "LIVERNODE", timeout: float = 30) -> None:
    """C-STORE every file in one association; raises SendError unless every instance was stored."""
    outcomes = send_datasets([pydicom.dcmread(p) for p in paths], [p.name for p in paths], dest, calling_ae,
                             timeout, files=list(paths))
    errors = [o.error for o in outcomes if not o.stored]
    if errors:
        raise SendError("; ".join(dict.fromkeys(errors)))
