"""The C-STORE SCP. The handler only writes the instance durably, indexes it and answers; heavy work happens
later, from the spool. Only what is on disk and in the index is ever acknowledged with 0x0000."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless,
    JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEGLossless, RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification

from livernode.daemon.metrics import AuditLog, Metrics
from livernode.daemon.spool import InvalidUID, Spool, check_uid
from livernode.daemon.store import Store

log = logging.getLogger(__name__)

# Explicit VR Little Endian first: peers that honour the SCP's order then send uncompressed explicit data.
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
                     RLELossless]
STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
SUCCESS, OUT_OF_RESOURCES, DATA_SET_MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000


class StoreSCP:
    """A pynetdicom server bound to (host, port) that stores CT instances into `spool` and `store`."""

    def __init__(self, ae_title: str, host: str, port: int, spool: Spool, store: Store,
                 on_stored: Callable[[str], None] | None = None, metrics: Metrics | None = None,
                 audit: AuditLog | None = None) -> None:
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = 0  # no limit: fewer PDUs per instance
        self.ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            self.ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self.host, self.port = host, port
        self.spool, self.store = spool, store
        self.on_stored = on_stored
        self.server = None
        self._lock = threading.Lock()
        self.metrics = metrics or Metrics()
        self.audit = audit or AuditLog(None)

    def start(self) -> None:
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected)]
        self.server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]
        log.info("C-STORE SCP %s listening on %s:%d", self.ae.ae_title, self.host, self.port)

    def stop(self) -> None:
        """Stop accepting associations; safe to call from several threads and more than once."""
        with self._lock:
            server, self.server = self.server, None
        if server is not None:
            server.shutdown()

    def _on_accepted(self, event) -> None:
        r = event.assoc.requestor
        self.audit.write("association_accepted", calling_ae=r.ae_title, address=r.address)

    def _on_rejected(self, event) -> None:
        r = event.assoc.requestor
        self.audit.write("association_rejected", calling_ae=r.ae_title, address=r.address)

    def _refuse(self, status: int, reason: str, sop_uid: str, peer: str) -> int:
        self.metrics.instances_rejected.labels(reason).inc()
        self.audit.write("instance_refused", sop_instance_uid=sop_uid, peer=peer, status=f"0x{status:04X}",
                         reason=reason)
        return status

    def _on_store(self, event) -> int:
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID)
        peer = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        if not self.spool.has_room(len(event.request.DataSet.getvalue()) if event.request.DataSet else 0):
            log.error("refusing %s from %s: free space below the threshold", sop_uid, peer)
            return self._refuse(OUT_OF_RESOURCES, "out of space", sop_uid, peer)
        try:
            ds = event.dataset
            study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            check_uid(sop_uid, "SOP Instance UID")
            check_uid(study, "Study Instance UID")
            check_uid(series, "Series Instance UID")
        except InvalidUID as exc:
            log.error("refusing an instance from %s: %s", peer, exc)
            return self._refuse(CANNOT_UNDERSTAND, "invalid UID", sop_uid, peer)
        except Exception as exc:  # the peer's bytes do not decode as a dataset
            log.error("refusing %s from %s: cannot parse the dataset (%s: %s)", sop_uid, peer,
                      type(exc).__name__, exc)
            return self._refuse(CANNOT_UNDERSTAND, "unparseable", sop_uid, peer)
        if str(getattr(ds, "SOPInstanceUID", "")) != sop_uid or \
                str(getattr(ds, "SOPClassUID", "")) != str(req.AffectedSOPClassUID):
            log.error("refusing %s from %s: dataset UIDs do not match the C-STORE request", sop_uid, peer)
            return self._refuse(DATA_SET_MISMATCH, "dataset does not match request", sop_uid, peer)
        data = event.encoded_dataset(include_meta=True)
        with self._lock:  # one writer at a time keeps "store once" exact across associations
            path, new = self.spool.store(study, series, sop_uid, data)
            self.store.add_instance(sop_uid, study, series, str(req.AffectedSOPClassUID), str(path))
        if new:
            log.debug("stored %s", sop_uid)
            self.metrics.instances_received.labels("c-store").inc()
            self.audit.write("instance_received", sop_instance_uid=sop_uid, study_instance_uid=study, peer=peer)
            if self.on_stored:
                self.on_stored(study)
        return SUCCESS
