"""The C-STORE SCP. The handler only writes the instance durably, indexes it and answers; heavy work happens
later, from the spool. Only what is on disk and in the index is ever acknowledged with 0x0000."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Sequence

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless,
    JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEGLossless, RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage, EnhancedCTImageStorage, MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage, MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage, Verification, XRayRadiationDoseSRStorage,
)
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from livernode.daemon.metrics import AuditLog, Metrics
from livernode.daemon import netclock  # noqa: F401 - importing it puts pynetdicom's timers on the monotonic clock
from livernode.daemon.spool import UID_RE, InvalidUID, Spool, check_uid
from livernode.daemon.store import Store
from livernode.errors import InputError
from livernode.imaging.dicomio import check_dataset, part10_header
from livernode.imaging.headers import header_facts

log = logging.getLogger(__name__)

# Explicit VR Little Endian first: peers that honour the SCP's order then send uncompressed explicit data.
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
                     RLELossless]
# CT, plus what PACS auto-routing sends along with an abdominal CT study: dose screens (secondary captures) and
# dose reports. They are stored so that routing succeeds, and series selection says why they are not segmented.
STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage, SecondaryCaptureImageStorage,
                   MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
                   MultiFrameGrayscaleWordSecondaryCaptureImageStorage, MultiFrameTrueColorSecondaryCaptureImageStorage,
                   XRayRadiationDoseSRStorage)
SUCCESS, OUT_OF_RESOURCES, DATA_SET_MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
TLS_HANDSHAKE_TIMEOUT_S = 10.0


class _BulkSocket(AssociationSocket):
    """pynetdicom's association socket, except that a PDU's bytes are read as they arrive, straight into a buffer
    that holds them. pynetdicom reads 4096 bytes at a time and grows its buffer by each piece: 128 system calls and
    128 appends for one 512x512 CT slice."""

    # The buffer starts at most this large and doubles as bytes fill it: a PDU's length is the peer's claim (up to
    # 4 GiB, before any check of who the peer is), so memory follows what arrives, not what is announced.
    FIRST_BYTES = 1 << 20

    def recv(self, nr_bytes: int) -> bytearray:
        """`nr_bytes` from the peer, or fewer if the peer closes the connection first (as pynetdicom's)."""
        buf = bytearray(min(nr_bytes, self.FIRST_BYTES))
        got = 0
        while got < nr_bytes:
            if got == len(buf):
                buf.extend(bytes(min(len(buf), nr_bytes - got)))
            with memoryview(buf) as view:
                n = self.socket.recv_into(view[got:])
            if not n:
                del buf[got:]
                break
            got += n
        return buf


class _Handler(RequestHandler):
    """pynetdicom's per-connection handler, with the association on a _BulkSocket."""

    def _create_association(self):
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = _BulkSocket  # the same socket object; only how it reads changes
        return assoc


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, except that the TLS handshake happens in the connection's own thread, with a
    time limit, and a failed handshake is reported. (pynetdicom shakes hands in the accept loop, where one peer
    that connects and stays silent would hold every other peer off.)"""

    tls: ssl.SSLContext | None = None
    on_tls_failure: Callable[[tuple, Exception], None] = staticmethod(lambda address, exc: None)

    def __init__(self, *args, listen_socket: socket.socket | None = None, **kwargs) -> None:
        # A receiver process (receivers.py) accepts on the node's listening socket, bound once by the parent and
        # shared by every receiver: the kernel gives each connection to one of them, whole.
        self.listen_socket = listen_socket
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.listen_socket is None:
            return super().server_bind()
        self.socket.close()
        self.socket = self.listen_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.listen_socket is None:
            super().server_activate()

    def server_close(self) -> None:
        if self.listen_socket is None:
            return super().server_close()
        self.socket.close()  # only this process' descriptor: shutting the socket down would stop every receiver


    def process_request_thread(self, request, client_address) -> None:
        if self.tls is not None:
            try:
                request.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
                request = self.tls.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except OSError as exc:  # ssl.SSLError, a timeout, or the peer hanging up
                self.on_tls_failure(client_address, exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


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
    """A pynetdicom server bound to (host, port) that stores CT instances into `spool` and `store`."""

    def __init__(self, ae_title: str, host: str, port: int, spool: Spool, store: Store,
                 on_stored: Callable[[str], None] | None = None, metrics: Metrics | None = None,
                 audit: AuditLog | None = None, *, allowed_calling: Sequence[str] = (),
                 require_called: bool = True, tls: ssl.SSLContext | None = None,
                 listen_socket: socket.socket | None = None) -> None:
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = 0  # no limit: fewer PDUs per instance
        self.ae.require_calling_aet = [t.strip() for t in allowed_calling]
        self.ae.require_called_aet = require_called
        self.ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            self.ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self.host, self.port = host, port
        self.tls, self.listen_socket = tls, listen_socket
        self.spool, self.store = spool, store
        self.on_stored = on_stored
        self.server = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Writers of the same SOP Instance UID in this process take turns; across receiver processes the spool's
        # create-if-absent keeps "store once" exact. Different instances, from parallel associations, are written
        # and fsynced at the same time.
        self._uid_locks = [threading.Lock() for _ in range(64)]
        self.metrics = metrics or Metrics()
        self.audit = audit or AuditLog(None)

    def start(self) -> None:
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ABORTED, self._on_aborted)]
        server = self.ae.make_server((self.host, self.port), evt_handlers=handlers, server_class=_Server,
                                     listen_socket=self.listen_socket, request_handler=_Handler)
        server.tls, server.on_tls_failure = self.tls, self._on_tls_failure
        self.ae._servers.append(server)  # as pynetdicom's start_server does: its shutdown() removes it again
        self._thread = threading.Thread(target=server.serve_forever, name=f"scp-{self.ae.ae_title}", daemon=True)
        self._thread.start()
        self.server = server
        self.port = server.server_address[1]
        log.info("C-STORE SCP %s listening on %s:%d%s", self.ae.ae_title, self.host, self.port,
                 " (TLS)" if self.tls else "")

    def listening(self) -> bool:
        """True while the port is bound and the accepting thread runs."""
        server, thread = self.server, self._thread
        return server is not None and server.socket.fileno() >= 0 and thread is not None and thread.is_alive()

    def stop(self) -> None:
        """Stop accepting associations; safe to call from several threads and more than once."""
        with self._lock:
            server, self.server = self.server, None
        if server is not None:
            server.shutdown()  # also closes the listening socket

    def _on_accepted(self, event) -> None:
        r = event.assoc.requestor
        sock = getattr(event.assoc.dul.socket, "socket", None)
        subject = ""
        if isinstance(sock, ssl.SSLSocket):
            cert = sock.getpeercert() or {}
            subject = ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
        self.audit.write("association_accepted", calling_ae=r.ae_title, called_ae=self._called(event),
                         address=r.address, tls=bool(sock is not None and isinstance(sock, ssl.SSLSocket)),
                         peer_certificate=subject, process=os.getpid())

    @staticmethod
    def _called(event) -> str:
        primitive = event.assoc.requestor.primitive
        return str(getattr(primitive, "called_ae_title", "") or "").strip()

    def _on_rejected(self, event) -> None:
        r = event.assoc.requestor
        called, calling = self._called(event), str(r.ae_title).strip()
        if self.ae.require_calling_aet and calling not in self.ae.require_calling_aet:
            kind, reason = "calling AE title", f"calling AE title {calling!r} is not on the allow-list"
        elif self.ae.require_called_aet and called != self.ae.ae_title.strip():
            kind, reason = "called AE title", f"called AE title {called!r} is not ours ({self.ae.ae_title})"
        else:
            kind, reason = "association limit", "too many associations"
        log.warning("association from %s (%s) refused: %s", r.address, calling, reason)
        self.metrics.associations_rejected.labels(kind).inc()
        self.audit.write("association_rejected", calling_ae=calling, called_ae=called, address=r.address,
                         reason=reason)

    def _on_aborted(self, event) -> None:
        """A-ABORT either way: the peer gave up, or pynetdicom refused an invalid message. An instance whose
        dataset had not fully arrived was never acknowledged and nothing of it is written."""
        r = event.assoc.requestor
        log.warning("association with %s (%s) aborted", r.address, r.ae_title)
        self.audit.write("association_aborted", calling_ae=r.ae_title, address=r.address)

    def _on_tls_failure(self, address: tuple, exc: Exception) -> None:
        reason = f"TLS handshake failed: {type(exc).__name__}: {exc}"
        log.warning("connection from %s refused: %s", address[0], reason)
        self.metrics.associations_rejected.labels("tls").inc()
        self.audit.write("connection_refused", address=address[0], port=address[1], reason=reason)

    def _refuse(self, status: int, reason: str, sop_uid: str, peer: str) -> int:
        self.metrics.instances_rejected.labels(reason).inc()
        self.audit.write("instance_refused", sop_instance_uid=sop_uid, peer=peer, status=f"0x{status:04X}",
                         reason=reason)
        return status

    def _on_store(self, event) -> int:
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID)
        if not UID_RE.match(sop_uid) or len(sop_uid) > 64:
            sop_uid = repr(sop_uid)[:80]  # shown quoted and cut short: a peer's bytes never go raw into a log
        peer = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        if not self.spool.has_room(len(event.request.DataSet.getbuffer()) if event.request.DataSet else 0):
            log.error("refusing %s from %s: free space below the threshold", sop_uid, peer)
            return self._refuse(OUT_OF_RESOURCES, "out of space", sop_uid, peer)
        try:
            check_uid(sop_uid, "SOP Instance UID")
            ds = check_dataset(event.dataset, f"instance {sop_uid}", transfer_syntax=event.context.transfer_syntax)
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
                str(getattr(ds, "SOPClassUID", "")) != str(req.AffectedSOPClassUID):
            log.error("refusing %s from %s: dataset UIDs do not match the C-STORE request", sop_uid, peer)
            return self._refuse(DATA_SET_MISMATCH, "dataset does not match request", sop_uid, peer)
        header = part10_header(str(req.AffectedSOPClassUID), sop_uid, str(event.context.transfer_syntax),
                               self.ae.implementation_class_uid, self.ae.implementation_version_name)
        facts = header_facts(ds)  # what series selection reads, from the index instead of the file
        try:
            with self._uid_locks[hash(sop_uid) % len(self._uid_locks)], req.DataSet.getbuffer() as body:
                # the peer's bytes as received, behind a file meta header: no decode and re-encode
                path, new = self.spool.store(study, series, sop_uid, (header, body))
                self.store.add_instance(sop_uid, study, series, str(req.AffectedSOPClassUID), str(path),
                                        header=facts)
        except OSError as exc:  # disk full or failing: nothing partial is left, and the peer may retry
            log.error("refusing %s from %s: cannot store it (%s)", sop_uid, peer, exc)
            return self._refuse(OUT_OF_RESOURCES, "write failed", sop_uid, peer)
        if new:
            log.debug("stored %s", sop_uid)
            self.metrics.instances_received.labels("c-store").inc()
            self.audit.write("instance_received", sop_instance_uid=sop_uid, study_instance_uid=study, peer=peer)
            if self.on_stored:
                self.on_stored(study)
        return SUCCESS
