"""The C-STORE SCP. The handler only writes the instance durably, indexes it and answers; heavy work happens
later, from the spool. Only what is on disk and in the index is ever acknowledged with 0x0000."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from io import BytesIO

from pydicom.filereader import read_dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID, UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
    ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEGLossless, RLELossless,
)

from livernode.daemon.metrics import AuditLog, Metrics
from livernode.daemon.spool import UID_RE, InvalidUID, Spool, check_uid
from livernode.daemon.store import Store
from livernode.daemon.upper_layer import (
    VERIFICATION, VERSION_NAME, Acceptor, Association, Rejected, StoreRequest, listening_socket,
)
from livernode.errors import InputError
from livernode.imaging.dicomio import check_dataset, part10_header
from livernode.imaging.headers import header_facts

log = logging.getLogger(__name__)

# Explicit VR Little Endian first: the acceptor picks the first of these that a context offers.
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
                     RLELossless]
# CT, plus what PACS auto-routing sends along with an abdominal CT study: dose screens (secondary captures) and
# dose reports. They are stored so that routing succeeds, and series selection says why they are not segmented.
STORAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
                   "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
                   "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
                   "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture Image Storage
                   "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image Storage
                   "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image Storage
                   "1.2.840.10008.5.1.4.1.1.88.67")  # X-Ray Radiation Dose SR Storage
SUPPORTED = {VERIFICATION: [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian],
             **{sop_class: TRANSFER_SYNTAXES for sop_class in STORAGE_CLASSES}}
SUCCESS, OUT_OF_RESOURCES, DATA_SET_MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
# Associations one receiver serves at a time; one more is rejected as transient (the peer may try again).
MAX_ASSOCIATIONS = 10
# A deflated dataset is refused when it would inflate beyond this.
MAX_INFLATED = 1 << 30


def decode_dataset(data, transfer_syntax: str):
    """A received dataset's bytes as a pydicom Dataset (pixel data left as bytes)."""
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflater.decompress(data, MAX_INFLATED)
        if inflater.unconsumed_tail:
            raise InputError(f"the deflated dataset inflates beyond {MAX_INFLATED >> 20} MiB")
        if not inflater.eof:
            raise InputError("the deflated dataset ends before its deflate stream does")
    return read_dataset(BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)


def server_tls_context(cert_file, key_file, ca_file=None) -> ssl.SSLContext:
    """TLS 1.2+ for the listener; with `ca_file`, peers must present a certificate signed by that CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class StoreSCP:
    """A C-STORE receiver bound to (host, port), or accepting on `listen_socket`, that stores CT instances into
    `spool` and `store`. Its upper layer is livernode's own (upper_layer.py)."""

    def __init__(self, ae_title: str, host: str, port: int, spool: Spool, store: Store,
                 on_stored: Callable[[str], None] | None = None, metrics: Metrics | None = None,
                 audit: AuditLog | None = None, *, allowed_calling: Sequence[str] = (),
                 require_called: bool = True, tls: ssl.SSLContext | None = None,
                 listen_socket: socket.socket | None = None) -> None:
        self.ae_title = ae_title.strip()
        self.allowed_calling = [t.strip() for t in allowed_calling]
        self.require_called = require_called
        self.host, self.port = host, port
        self.tls, self.listen_socket = tls, listen_socket
        self.spool, self.store = spool, store
        self.on_stored = on_stored
        self.acceptor: Acceptor | None = None
        self._closed = False
        self._lock = threading.Lock()
        # Writers of the same SOP Instance UID in this process take turns; across receiver processes the spool's
        # create-if-absent keeps "store once" exact. Different instances, from parallel associations, are written
        # and fsynced at the same time.
        self._uid_locks = [threading.Lock() for _ in range(64)]
        self.metrics = metrics or Metrics()
        self.audit = audit or AuditLog(None)

    def start(self) -> None:
        sock = self.listen_socket
        if sock is None:  # a single receiver binds the port itself
            sock = listening_socket(self.host, self.port)
        acceptor = Acceptor(sock, decide=self._decide, on_store=self._on_store, on_accepted=self._on_accepted,
                            on_rejected=self._on_rejected, on_aborted=self._on_aborted,
                            on_tls_failure=self._on_tls_failure, tls=self.tls,
                            implementation_uid=PYDICOM_IMPLEMENTATION_UID, version_name=VERSION_NAME,
                            name=self.ae_title)
        acceptor.start()
        self.acceptor = acceptor
        self.port = sock.getsockname()[1]
        log.info("C-STORE SCP %s listening on %s:%d%s", self.ae_title, self.host, self.port,
                 " (TLS)" if self.tls else "")

    def listening(self) -> bool:
        """True while the port is bound and the accepting thread runs."""
        acceptor = self.acceptor
        return acceptor is not None and not self._closed and acceptor.listener.fileno() >= 0 and acceptor.running()

    def stop(self) -> None:
        """Stop accepting associations; safe to call from several threads and more than once. Associations under
        way go on (`active()`)."""
        with self._lock:
            if self._closed or self.acceptor is None:
                return
            self._closed = True
        self.acceptor.stop()
        # only this process' descriptor when the socket is shared: shutting it down would stop every receiver
        self.acceptor.listener.close()

    def active(self) -> list[Association]:
        """The established associations, also after `stop()`."""
        return self.acceptor.active() if self.acceptor is not None else []

    def finish(self, timeout: float) -> None:
        """After `stop()`: let the associations under way end by themselves for at most `timeout` seconds, then
        abort the rest. What they had answered 0x0000 is on disk and indexed; the rest was never acknowledged."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.active():
            time.sleep(0.05)
        left = self.active()
        if left:
            log.error("%d association(s) still open after %.0f s; aborting them", len(left), timeout)
            for assoc in left:
                assoc.abort()

    def _decide(self, rq, assoc: Association, others: int) -> dict[str, list[str]]:
        if self.allowed_calling and rq.calling not in self.allowed_calling:
            raise Rejected("calling AE title", f"calling AE title {rq.calling!r} is not on the allow-list", 1, 1, 3)
        if self.require_called and rq.called != self.ae_title:
            raise Rejected("called AE title", f"called AE title {rq.called!r} is not ours ({self.ae_title})",
                           1, 1, 7)
        if others >= MAX_ASSOCIATIONS:
            raise Rejected("association limit", f"too many associations ({others} under way)", 2, 3, 2)
        return SUPPORTED

    def _on_accepted(self, assoc: Association) -> None:
        self.audit.write("association_accepted", calling_ae=assoc.calling, called_ae=assoc.called,
                         address=assoc.address[0], tls=assoc.tls, peer_certificate=assoc.peer_certificate,
                         process=os.getpid())

    def _on_rejected(self, assoc: Association, exc: Rejected) -> None:
        log.warning("association from %s (%s) refused: %s", assoc.address[0], assoc.calling, exc.reason)
        self.metrics.associations_rejected.labels(exc.kind).inc()
        self.audit.write("association_rejected", calling_ae=assoc.calling, called_ae=assoc.called,
                         address=assoc.address[0], reason=exc.reason)

    def _on_aborted(self, assoc: Association, why: str) -> None:
        """A-ABORT either way, or the connection lost: the peer gave up, or it broke the protocol. An instance
        whose dataset had not fully arrived was never acknowledged and nothing of it is written."""
        log.warning("association with %s (%s) aborted: %s", assoc.address[0], assoc.calling, why)
        self.audit.write("association_aborted", calling_ae=assoc.calling, address=assoc.address[0], reason=why)

    def _on_tls_failure(self, address: tuple, exc: Exception) -> None:
        reason = f"TLS handshake failed: {type(exc).__name__}: {exc}"
        log.warning("connection from %s refused: %s", address[0], reason)
        self.metrics.associations_rejected.labels("tls").inc()
        self.audit.write("connection_refused", address=address[0], port=address[1], reason=reason)

    def _refuse(self, status: int, reason: str, sop_uid: str, peer: str) -> tuple[int, str]:
        self.metrics.instances_rejected.labels(reason).inc()
        self.audit.write("instance_refused", sop_instance_uid=sop_uid, peer=peer, status=f"0x{status:04X}",
                         reason=reason)
        return status, reason

    def _on_store(self, assoc: Association, req: StoreRequest) -> tuple[int, str]:
        sop_uid = req.sop_instance_uid
        if not UID_RE.match(sop_uid) or len(sop_uid) > 64:
            sop_uid = repr(sop_uid)[:80]  # shown quoted and cut short: a peer's bytes never go raw into a log
        peer = assoc.peer
        if not self.spool.has_room(req.size):
            log.error("refusing %s from %s: free space below the threshold", sop_uid, peer)
            return self._refuse(OUT_OF_RESOURCES, "out of space", sop_uid, peer)
        try:
            check_uid(sop_uid, "SOP Instance UID")
            ds = check_dataset(decode_dataset(req.data(), req.transfer_syntax), f"instance {sop_uid}",
                               transfer_syntax=UID(req.transfer_syntax))
            study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
            check_uid(study, "Study Instance UID")
            check_uid(series, "Series Instance UID")
        except InvalidUID as exc:
            log.error("refusing an instance from %s: %s", peer, exc)
            return self._refuse(CANNOT_UNDERSTAND, "invalid UID", sop_uid, peer)
        except InputError as exc:
            log.error("refusing it from %s: %s", peer, exc)
            return self._refuse(CANNOT_UNDERSTAND, "malformed", sop_uid, peer)
        except Exception as exc:  # the peer's bytes do not decode as a dataset
            log.error("refusing %s from %s: cannot parse the dataset (%s: %s)", sop_uid, peer,
                      type(exc).__name__, exc)
            return self._refuse(CANNOT_UNDERSTAND, "unparseable", sop_uid, peer)
        if str(getattr(ds, "SOPInstanceUID", "")) != sop_uid or \
                str(getattr(ds, "SOPClassUID", "")) != req.sop_class_uid:
            log.error("refusing %s from %s: dataset UIDs do not match the C-STORE request", sop_uid, peer)
            return self._refuse(DATA_SET_MISMATCH, "dataset does not match request", sop_uid, peer)
        header = part10_header(req.sop_class_uid, sop_uid, req.transfer_syntax, PYDICOM_IMPLEMENTATION_UID,
                               VERSION_NAME)
        facts = header_facts(ds)  # what series selection reads, from the index instead of the file
        try:
            with self._uid_locks[hash(sop_uid) % len(self._uid_locks)]:
                # the peer's bytes as received, behind a file meta header: no decode and re-encode
                path, new = self.spool.store(study, series, sop_uid, (header, *req.pieces))
                self.store.add_instance(sop_uid, study, series, req.sop_class_uid, str(path), header=facts)
        except OSError as exc:  # disk full or failing: nothing partial is left, and the peer may retry
            log.error("refusing %s from %s: cannot store it (%s)", sop_uid, peer, exc)
            return self._refuse(OUT_OF_RESOURCES, "write failed", sop_uid, peer)
        if new:
            log.debug("stored %s", sop_uid)
            self.metrics.instances_received.labels("c-store").inc()
            self.audit.write("instance_received", sop_instance_uid=sop_uid, study_instance_uid=study, peer=peer)
            if self.on_stored:
                self.on_stored(study)
        return SUCCESS, ""
