"""The index: an embedded SQLite database (WAL) of instances, studies, jobs and the outbox.

Every change is one transaction; the spool holds the bytes, this file holds what they are and what is owed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from livernode.daemon.store_retention import RetentionQueries
from livernode.imaging.dicomio import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE
from livernode.imaging.headers import header_facts

# A study with instances not yet processed; due once quiet long enough (`due_studies`).
_WAITING = "state IN ('receiving', 'done', 'failed') AND instances > processed_instances"
CT_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE})

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    received_at REAL NOT NULL,
    header TEXT                                -- JSON: what series selection reads (imaging/headers.py)
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,      -- CT images; other instances are indexed but do not count
    state TEXT NOT NULL DEFAULT 'receiving',   -- receiving | processing | done | failed | purged (a tombstone)
    processed_instances INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0,     -- times processed; a reprocess supersedes the earlier results
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,       -- processing runs begun and not finished (crashes count)
    purged_at REAL                             -- when retention removed its files (state 'purged')
);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,                       -- running | done | failed | interrupted (crash) | stopped (SIGTERM)
    instances INTEGER NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    reason TEXT NOT NULL DEFAULT '',
    series TEXT NOT NULL DEFAULT ''            -- JSON: every series of the study with the reason it was (not) chosen
);
CREATE TABLE IF NOT EXISTS health_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',     -- pending | sent | dead | superseded (result file lost: reprocessed)
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    first_received_at: float
    last_received_at: float
    instances: int
    state: str
    processed_instances: int
    generation: int
    reason: str
    attempts: int
    purged_at: float | None = None


class Store(RetentionQueries):
    """One connection per thread that uses it; SQLite serialises writers. Retention's queries live beside, in
    `store_retention.py`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._connection()
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        with self.transaction() as tx:  # one writer migrates; another process opening the index waits, then sees it
            columns = {r[1] for r in tx.execute("PRAGMA table_info(studies)")}
            if "attempts" not in columns:  # an index written before attempts were counted
                tx.execute("ALTER TABLE studies ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
            if "purged_at" not in columns:  # ... and before retention
                tx.execute("ALTER TABLE studies ADD COLUMN purged_at REAL")
            if "series" not in {r[1] for r in tx.execute("PRAGMA table_info(jobs)")}:  # before series reasons
                tx.execute("ALTER TABLE jobs ADD COLUMN series TEXT NOT NULL DEFAULT ''")
            if "header" not in {r[1] for r in tx.execute("PRAGMA table_info(instances)")}:  # before headers
                tx.execute("ALTER TABLE instances ADD COLUMN header TEXT")

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened once (opening one per transaction cost a third of a C-STORE)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._local.db, self._local.durable = db, None
        return db

    @contextmanager
    def transaction(self, durable: bool = True):
        """One transaction on this thread's connection. durable=True (synchronous=FULL) survives power loss;
        durable=False (NORMAL) survives the process being killed, and is used only where the data can be
        rebuilt: an instance's row, from its fsynced spool file (`reconcile`)."""
        db = self._connection()
        if self._local.durable is not durable:
            db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._local.durable = durable
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @contextmanager
    def read(self):
        """This thread's connection for reads: no write lock (in WAL, reads never wait for a writer); the
        statements inside see one snapshot."""
        db = self._connection()
        db.execute("BEGIN")  # deferred: a read transaction, one consistent snapshot
        try:
            yield db
        finally:
            db.execute("COMMIT")

    def reconcile(self, instances: Path, read_header) -> int:
        """Index spooled files whose rows a power loss took from the index; returns how many. Files of a purged
        study older than its purge are what a crash mid-purge left: they are removed, not indexed."""
        with self.transaction() as db:
            known = {r[0] for r in db.execute("SELECT path FROM instances")}
        unknown = [(path, read_header(path)) for path in sorted(Path(instances).rglob("*.dcm"))
                   if str(path) not in known]
        # Leftovers are judged before anything is added: adding an instance restarts a purged study.
        leftovers = {path for path, ds in unknown
                     if self.purged_before(str(ds.StudyInstanceUID), path.stat().st_mtime)}
        added = 0
        for path, ds in unknown:
            if path in leftovers:
                path.unlink()  # retention's leftover from a crash mid-purge, not an instance the index lost
                continue
            if self.add_instance(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                 str(ds.SOPClassUID), str(path), header=header_facts(ds)):
                added += 1
        return added

    def add_instance(self, sop: str, study: str, series: str, sop_class: str, path: str,
                     now: float | None = None, header: str | None = None) -> bool:
        """Index one stored instance, with its `header` facts (imaging/headers.py) when the receiver has them;
        False when that SOP Instance UID was already indexed. Only CT images count towards the study's instances: a
        dose screen or dose report that arrives after the result neither makes the study due again nor delays
        it."""
        now = time.time() if now is None else now
        image = int(sop_class in CT_CLASSES)
        with self.transaction(durable=False) as db:  # the spool file is fsynced; `reconcile` rebuilds the row
            cur = db.execute("INSERT OR IGNORE INTO instances (sop_instance_uid, study_instance_uid, "
                             "series_instance_uid, sop_class_uid, path, received_at, header) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (sop, study, series, sop_class, path, now, header))
            if cur.rowcount == 0:
                return False
            db.execute(  # a purged study that is sent again starts afresh: its earlier instances are gone
                "UPDATE studies SET state = 'receiving', instances = 0, processed_instances = 0, attempts = 0, "
                "first_received_at = ?, reason = '' WHERE study_instance_uid = ? AND state = 'purged'", (now, study))
            db.execute(
                "INSERT INTO studies (study_instance_uid, first_received_at, last_received_at, instances) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(study_instance_uid) DO UPDATE SET instances = instances + ?, "
                "last_received_at = CASE WHEN ? THEN excluded.last_received_at ELSE last_received_at END",
                (study, now, now, image, image, image))
            db.execute("INSERT INTO series VALUES (?, ?, 1) ON CONFLICT(series_instance_uid) DO UPDATE SET "
                       "instances = instances + 1", (series, study))
            return True

    def study(self, study: str) -> StudyRow | None:
        with self.read() as db:
            row = db.execute("SELECT * FROM studies WHERE study_instance_uid = ?", (study,)).fetchone()
        return StudyRow(*row) if row else None

    def instance_paths(self, study: str) -> list[str]:
        with self.read() as db:
            return [r[0] for r in db.execute(
                "SELECT path FROM instances WHERE study_instance_uid = ? ORDER BY path", (study,))]

    def instance_headers(self, study: str) -> list[tuple[str, str | None]]:
        """(path, header facts or None) of the study's instances, by path."""
        with self.read() as db:
            return db.execute("SELECT path, header FROM instances WHERE study_instance_uid = ? ORDER BY path",
                              (study,)).fetchall()

    def due_studies(self, quiet_s: float, max_wait_s: float, now: float | None = None) -> list[str]:
        """Studies with instances not yet processed, quiet for `quiet_s` or waiting longer than `max_wait_s`.
        Studies left in 'processing' by a crash are due again."""
        now = time.time() if now is None else now
        with self.read() as db:
            rows = db.execute(
                f"SELECT study_instance_uid FROM studies WHERE ({_WAITING} AND "
                " (last_received_at <= ? OR first_received_at <= ?)) OR state = 'processing' "
                "ORDER BY last_received_at", (now - quiet_s, now - max_wait_s)).fetchall()
        return [r[0] for r in rows]

    def next_due_in(self, quiet_s: float, max_wait_s: float, now: float | None = None) -> float | None:
        """Seconds until the first study that is not due yet becomes due by `due_studies`' rule; None when no
        study is waiting to become due (one due already is found by `due_studies`, not counted here)."""
        now = time.time() if now is None else now
        with self.read() as db:
            (due,) = db.execute(
                f"SELECT MIN(MIN(last_received_at + ?, first_received_at + ?)) FROM studies WHERE {_WAITING} AND "
                "last_received_at > ? AND first_received_at > ?",
                (quiet_s, max_wait_s, now - quiet_s, now - max_wait_s)).fetchone()
        return None if due is None else max(0.0, due - now)

    def start_processing(self, study: str) -> StudyRow:
        """Mark the study processing, count the attempt and open a job; returns the row as it was before."""
        now = time.time()
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'interrupted', finished_at = ? WHERE study_instance_uid = ? "
                       "AND state = 'running'", (now, study))
            row = StudyRow(*db.execute("SELECT * FROM studies WHERE study_instance_uid = ?", (study,)).fetchone())
            db.execute("UPDATE studies SET state = 'processing', attempts = attempts + 1 "
                       "WHERE study_instance_uid = ?", (study,))
            db.execute("INSERT INTO jobs (study_instance_uid, generation, state, instances, started_at) "
                       "VALUES (?, ?, 'running', ?, ?)", (study, row.generation + 1, row.instances, now))
            return row

    def finish(self, study: str, instances_seen: int, *, failed_reason: str = "",
               outbox: list[tuple[str, str]] = (), series: str = "", now: float | None = None) -> None:
        """Close the running job as done (or failed, with the reason) and queue (destination, path) results to
        send, in one transaction: a crash leaves either the job running (it is redone) or both recorded.
        `series` (JSON) records why each series was or was not chosen."""
        state = "failed" if failed_reason else "done"
        with self.transaction() as db:
            db.executemany("INSERT INTO outbox (study_instance_uid, destination, path) VALUES (?, ?, ?)",
                           [(study, d, p) for d, p in outbox])
            db.execute("UPDATE studies SET state = ?, processed_instances = ?, generation = generation + 1, "
                       "reason = ?, attempts = 0 WHERE study_instance_uid = ?",
                       (state, instances_seen, failed_reason, study))
            db.execute("UPDATE jobs SET state = ?, finished_at = ?, reason = ?, series = ? WHERE "
                       "study_instance_uid = ? AND state = 'running'",
                       (state, time.time() if now is None else now, failed_reason, series, study))

    def stop_processing(self, study: str, reason: str) -> None:
        """The node is shutting down mid-study: the job is closed as stopped, the attempt is not counted, and the
        study stays 'processing', so it is due again at the next start."""
        with self.transaction() as db:
            db.execute("UPDATE studies SET attempts = max(attempts - 1, 0) WHERE study_instance_uid = ?", (study,))
            db.execute("UPDATE jobs SET state = 'stopped', finished_at = ?, reason = ? WHERE study_instance_uid = ? "
                       "AND state = 'running'", (time.time(), reason, study))

    def interrupt_processing(self, study: str, reason: str, max_attempts: int) -> int | None:
        """The study's processing was lost without an answer (its Ray actor or machine died): the job is closed as
        interrupted and the attempt counts, as a crash's does. The study stays due, or fails once it was cut short
        `max_attempts` times; returns the attempts when it failed now, else None."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'interrupted', finished_at = ?, reason = ? WHERE "
                       "study_instance_uid = ? AND state = 'running'", (time.time(), reason, study))
            (attempts,) = db.execute("SELECT attempts FROM studies WHERE study_instance_uid = ?", (study,)).fetchone()
            if attempts < max_attempts:
                return None
            db.execute("UPDATE studies SET state = 'failed', processed_instances = instances, "
                       "generation = generation + 1, attempts = 0, reason = ? WHERE study_instance_uid = ?",
                       (f"interrupted {attempts} times ({reason}); not retried until `livernode retry`", study))
            return attempts

    def recover(self, max_attempts: int) -> tuple[int, list[tuple[str, int]]]:
        """At start, before any work: close the jobs a crash left running as interrupted, and fail each study
        whose processing was cut short `max_attempts` times (it stays failed until `livernode retry`). Returns
        the number of interrupted jobs and (study, attempts) of each study failed now."""
        now = time.time()
        with self.transaction() as db:
            interrupted = db.execute("UPDATE jobs SET state = 'interrupted', finished_at = ?, reason = "
                                     "'the node stopped without finishing it (killed or crashed)' "
                                     "WHERE state = 'running'", (now,)).rowcount
            poisoned = db.execute("SELECT study_instance_uid, attempts FROM studies WHERE state = 'processing' "
                                  "AND attempts >= ?", (max_attempts,)).fetchall()
            for study, attempts in poisoned:
                db.execute("UPDATE studies SET state = 'failed', processed_instances = instances, "
                           "generation = generation + 1, attempts = 0, reason = ? WHERE study_instance_uid = ?",
                           (f"interrupted {attempts} times: the node was killed or crashed while processing it; "
                            "not retried until `livernode retry`", study))
        return interrupted, [(u, a) for u, a in poisoned]

    def requeue_study(self, study: str) -> bool:
        """Produce the study's results again: it becomes due at once. False when the study is unknown."""
        with self.transaction() as db:
            return db.execute("UPDATE studies SET processed_instances = 0, state = 'receiving', attempts = 0, "
                              "last_received_at = 0 WHERE study_instance_uid = ?", (study,)).rowcount > 0

    def last_series(self, study: str) -> list[dict]:
        """Each series of the study with the reason it was (not) chosen, from its last finished job."""
        with self.read() as db:
            row = db.execute("SELECT series FROM jobs WHERE study_instance_uid = ? AND series != '' ORDER BY id DESC "
                             "LIMIT 1", (study,)).fetchone()
        return json.loads(row[0]) if row else []

    def jobs(self, study: str) -> list[tuple]:
        """(generation, state, instances, reason) of every job of a study, oldest first."""
        with self.read() as db:
            return db.execute("SELECT generation, state, instances, reason FROM jobs WHERE study_instance_uid = ? "
                              "ORDER BY id", (study,)).fetchall()

    def enqueue(self, study: str, destination: str, paths: list[str]) -> None:
        with self.transaction() as db:
            db.executemany("INSERT INTO outbox (study_instance_uid, destination, path) VALUES (?, ?, ?)",
                           [(study, destination, p) for p in paths])

    def outbox(self, state: str | None = None) -> list[tuple]:
        with self.read() as db:
            q = "SELECT id, study_instance_uid, destination, path, state, attempts, next_attempt_at, last_error " \
                "FROM outbox" + (" WHERE state = ?" if state else "") + " ORDER BY id"
            return db.execute(q, (state,) if state else ()).fetchall()

    def due_outbox(self, now: float | None = None) -> list[tuple[int, str, str, str, int]]:
        """(id, study, destination, path, attempts) of pending items whose next attempt is due."""
        now = time.time() if now is None else now
        with self.read() as db:
            return db.execute("SELECT id, study_instance_uid, destination, path, attempts FROM outbox "
                              "WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY id", (now,)).fetchall()

    def mark_sent(self, ids: list[int]) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE outbox SET state = 'sent', attempts = attempts + 1 WHERE id = ?",
                           [(i,) for i in ids])

    def requeue_outbox(self, study: str) -> int:
        """Make the study's dead and pending items due now with a fresh count of attempts; returns how many."""
        with self.transaction() as db:
            return db.execute("UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = 0 "
                              "WHERE study_instance_uid = ? AND state IN ('dead', 'pending')", (study,)).rowcount

    def reprocess_lost(self, study: str, reason: str) -> int:
        """A result of the study was lost before it was sent: in one transaction, its unsent items (pending or
        dead) are superseded and the study is due to be processed again. Returns how many items."""
        with self.transaction() as db:
            n = db.execute("UPDATE outbox SET state = 'superseded', last_error = ? WHERE study_instance_uid = ? "
                           "AND state IN ('pending', 'dead')", (reason[:500], study)).rowcount
            db.execute("UPDATE studies SET processed_instances = 0, state = 'receiving', attempts = 0, "
                       "last_received_at = 0 WHERE study_instance_uid = ?", (study,))
            return n

    def mark_failed(self, ids: list[int], error: str, *, backoff_s: float, max_attempts: int,
                    now: float | None = None) -> bool:
        """Count a failed attempt; exponential backoff; dead letter after `max_attempts`. True when now dead."""
        now = time.time() if now is None else now
        dead = False
        with self.transaction() as db:
            for i in ids:
                (attempts,) = db.execute("SELECT attempts FROM outbox WHERE id = ?", (i,)).fetchone()
                attempts += 1
                state = "dead" if attempts >= max_attempts else "pending"
                dead = dead or state == "dead"
                db.execute("UPDATE outbox SET attempts = ?, state = ?, next_attempt_at = ?, last_error = ? "
                           "WHERE id = ?", (attempts, state, now + backoff_s * 2 ** (attempts - 1), error[:500], i))
        return dead

    def counts(self) -> tuple[dict[str, int], dict[str, int], int]:
        """Studies by state, outbox items by state, and studies with instances not yet processed. Plain reads,
        which WAL never makes wait for a writer: the watchdog's status line and /metrics call this."""
        with self.read() as db:
            studies = dict(db.execute("SELECT state, count(*) FROM studies GROUP BY state").fetchall())
            outbox = dict(db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
            waiting = db.execute("SELECT count(*) FROM studies WHERE instances > processed_instances").fetchone()[0]
        return studies, outbox, waiting

    def recent(self, limit: int) -> list[tuple]:
        """The `limit` studies with the latest instances: uid, state, instances, processed, generation, reason,
        last received."""
        with self.read() as db:
            return db.execute("SELECT study_instance_uid, state, instances, processed_instances, generation, reason, "
                              "last_received_at FROM studies ORDER BY last_received_at DESC LIMIT ?",
                              (limit,)).fetchall()

    def summary(self) -> tuple[list[tuple], list[tuple], int]:
        """Jobs by state, outbox by destination and state (items, most attempts, one error), studies in all."""
        with self.read() as db:
            jobs = db.execute("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state").fetchall()
            outbox = db.execute("SELECT destination, state, count(*), max(attempts), max(last_error) FROM outbox "
                                "GROUP BY destination, state ORDER BY destination, state").fetchall()
            total = db.execute("SELECT count(*) FROM studies").fetchone()[0]
        return jobs, outbox, total

    def probe_writable(self) -> str:
        """Commit one small write on a connection of its own; raises sqlite3.Error when the index cannot be
        written (full disk, read-only filesystem, a lock held too long). Returns how long it took."""
        t = time.monotonic()
        db = sqlite3.connect(self.path, timeout=2, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("INSERT OR REPLACE INTO health_probe VALUES (1, ?)", (time.time(),))
        finally:
            db.close()
        return f"write committed in {1000 * (time.monotonic() - t):.0f} ms"
