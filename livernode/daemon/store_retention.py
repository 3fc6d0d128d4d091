"""The index's queries for retention, as a part of `Store` (one home for the SQL, two files)."""

from __future__ import annotations

import time


class RetentionQueries:
    """Mixed into `Store`: what retention may remove, the tombstone it leaves, and what a crash mid-purge left."""

    def purgeable(self) -> list[tuple[str, str, float, int, float]]:
        """(study, state, last activity, instances, last received) of every study retention may remove, oldest
        activity first: done or failed, nothing new received since, no job running, nothing owed (no pending or
        dead outbox item)."""
        with self.read() as db:
            return db.execute(
                "SELECT s.study_instance_uid, s.state, max(s.last_received_at, coalesce((SELECT max(finished_at) "
                "  FROM jobs j WHERE j.study_instance_uid = s.study_instance_uid), 0)) AS last, s.instances, "
                "  s.last_received_at FROM studies s WHERE s.state IN ('done', 'failed') "
                "AND s.instances = s.processed_instances "
                "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.study_instance_uid = s.study_instance_uid "
                "  AND o.state IN ('pending', 'dead')) "
                "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_instance_uid = s.study_instance_uid "
                "  AND j.state = 'running') ORDER BY last").fetchall()

    def tombstone(self, study: str, why: str, now: float, instances: int, last_received: float) -> list[str] | None:
        """In one transaction, if the study is still as `purgeable` saw it (same state, instances and last
        instance, nothing owed, nothing running): remove its instance, series and outbox rows and leave the study
        row as a tombstone (state 'purged', when, why). Returns the spool files the rows named, for the caller to
        delete; None when the study changed meanwhile (an instance arrived) and must stay."""
        with self.transaction() as db:
            row = db.execute("SELECT state, instances, last_received_at FROM studies WHERE study_instance_uid = ?",
                             (study,)).fetchone()
            if row is None or row[0] not in ("done", "failed") or row[1:] != (instances, last_received):
                return None
            busy = db.execute("SELECT 1 FROM outbox WHERE study_instance_uid = ? AND state IN ('pending', 'dead') "
                              "UNION SELECT 1 FROM jobs WHERE study_instance_uid = ? AND state = 'running'",
                              (study, study)).fetchone()
            if busy:
                return None
            paths = [r[0] for r in db.execute("SELECT path FROM instances WHERE study_instance_uid = ?", (study,))]
            for table in ("instances", "series", "outbox"):
                db.execute(f"DELETE FROM {table} WHERE study_instance_uid = ?", (study,))
            db.execute("UPDATE studies SET state = 'purged', purged_at = ?, reason = ? WHERE study_instance_uid = ?",
                       (now, f"purged {time.strftime('%Y-%m-%d %H:%M', time.localtime(now))}: {why}", study))
            return paths

    def purged_before(self, study: str, mtime: float) -> bool:
        """True for a file of a purged study written before the purge: a leftover of a crash mid-purge."""
        with self.read() as db:
            row = db.execute("SELECT purged_at FROM studies WHERE study_instance_uid = ? AND state = 'purged'",
                             (study,)).fetchone()
        return row is not None and row[0] is not None and mtime <= row[0]
