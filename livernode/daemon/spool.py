"""Durable instance storage. An instance is acknowledged only after it is here: temp file, fsync, rename,
directory fsync. UIDs are validated and never used raw as paths (file names are digests of the UIDs)."""

from __future__ import annotations

import hashlib
import multiprocessing
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from livernode.errors import InputError
from livernode.fsutil import atomic_write, fsync_dir

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUID(InputError):
    """A UID that is not a valid DICOM UID (digits and dots, at most 64 characters)."""


def check_uid(uid: str, what: str = "UID") -> str:
    """Return `uid` if it is a valid DICOM UID; InvalidUID naming it otherwise."""
    if isinstance(uid, str) and not uid:
        raise InvalidUID(f"{what} is missing")
    if not isinstance(uid, str) or len(uid) > 64 or not UID_RE.match(uid):
        shown = repr(uid)[:80]
        raise InvalidUID(f"{what} {shown} is not a valid DICOM UID (digits and dots, at most 64 characters)")
    return uid


def uid_key(uid: str) -> str:
    """A fixed-length, path-safe name for a (validated) UID."""
    return hashlib.sha256(check_uid(uid).encode()).hexdigest()[:32]


def _clamped(value: float) -> int:
    """A threshold in bytes that fits the shared 64-bit integer: ctypes would wrap a larger one (min_free_mb = 1e13,
    meant as "refuse everything") to a negative number that refuses nothing."""
    return max(0, min(int(value), 2**63 - 1))


class Spool:
    """`root/instances/<study key>/<series key>/<sop key>.dcm`, plus `root/incoming` for partial writes."""

    def __init__(self, root: Path, min_free_bytes: int = 0, *, threshold=None) -> None:
        """`threshold`: the node's `Spool.threshold`, for a receiver process (receivers.py) that reads the
        free-space threshold the node holds, a reload's included."""
        self.root = Path(root)
        self.instances = self.root / "instances"
        self.instances.mkdir(parents=True, exist_ok=True)
        # in shared memory, so receiver processes started with it see what a reload (SIGHUP) sets
        self.threshold = threshold if threshold is not None else \
            multiprocessing.get_context("spawn").RawValue("q", _clamped(min_free_bytes))

    def __getstate__(self) -> dict:
        """A pickled Spool (not how receivers get theirs) carries the threshold's value: shared memory crosses
        only to processes started with it."""
        return {**self.__dict__, "threshold": self.min_free_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.threshold = multiprocessing.get_context("spawn").RawValue("q", _clamped(state["threshold"]))

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.instances / uid_key(study_uid) / uid_key(series_uid) / f"{uid_key(sop_uid)}.dcm"

    def has_room(self, incoming: int = 0) -> bool:
        return shutil.disk_usage(self.root).free - incoming >= self.min_free_bytes

    @property
    def min_free_bytes(self) -> int:
        return self.threshold.value

    @min_free_bytes.setter
    def min_free_bytes(self, value: int) -> None:
        self.threshold.value = _clamped(value)

    def store(self, study_uid: str, series_uid: str, sop_uid: str,
              data: bytes | Sequence[bytes | memoryview]) -> tuple[Path, bool]:
        """Store one encoded instance (bytes, or pieces in order) durably; (path, False) when that SOP Instance
        UID is already stored."""
        path = self.path_for(study_uid, series_uid, sop_uid)
        if path.exists():  # written by an earlier association, or by another receiver process just now: its
            fsync_dir(path.parent)  # folder entry may not be durable yet, and we are about to answer for it
            return path, False
        return path, atomic_write(path, data, replace=False)  # another receiver process may be writing it too

    def clean_partials(self) -> int:
        """Remove temp files left by a crash mid-write (never acknowledged); returns how many."""
        n = 0
        for tmp in self.instances.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            n += 1
        return n
