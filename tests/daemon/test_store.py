import pytest

from livernode.daemon.store import Store

CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage: counts towards a study


def test_instances_are_indexed_once_and_studies_become_due_after_quiet(tmp_path):
    s = Store(tmp_path / "index.sqlite")
    assert s.add_instance("1.1", "9.9", "8.8", "1.2.840.10008.5.1.4.1.1.2", "a", now=100)
    assert not s.add_instance("1.1", "9.9", "8.8", "1.2.840.10008.5.1.4.1.1.2", "a", now=101)
    assert s.add_instance("1.2", "9.9", "8.8", "1.2.840.10008.5.1.4.1.1.2", "b", now=110)
    assert s.study("9.9").instances == 2
    assert s.due_studies(quiet_s=30, max_wait_s=600, now=120) == []
    assert s.due_studies(quiet_s=30, max_wait_s=600, now=141) == ["9.9"]
    assert s.due_studies(quiet_s=30, max_wait_s=15, now=120) == ["9.9"]  # maximum wait reached
    s.start_processing("9.9")
    s.finish("9.9", 2)
    # a dose report arriving after the result is indexed, but makes nothing due again
    assert s.add_instance("1.3", "9.9", "7.7", "1.2.840.10008.5.1.4.1.1.88.67", "c", now=500)
    assert s.study("9.9").instances == 2 and s.due_studies(quiet_s=30, max_wait_s=600, now=1000) == []


def test_crash_during_processing_makes_the_study_due_again_and_late_instances_reprocess(tmp_path):
    s = Store(tmp_path / "index.sqlite")
    s.add_instance("1.1", "9.9", "8.8", CT, "a", now=0)
    s.start_processing("9.9")
    s2 = Store(tmp_path / "index.sqlite")  # a restart opens the same file
    assert s2.due_studies(30, 600, now=1) == ["9.9"]
    s2.start_processing("9.9")
    s2.finish("9.9", instances_seen=1)
    assert s2.due_studies(30, 600, now=1000) == []
    s2.add_instance("1.2", "9.9", "8.8", CT, "b", now=1000)
    assert s2.due_studies(30, 600, now=1031) == ["9.9"]
    s2.start_processing("9.9")
    s2.finish("9.9", instances_seen=2)
    assert s2.study("9.9").generation == 2
    assert s2.jobs("9.9") == [(1, "interrupted", 1, ""), (1, "done", 1, ""), (2, "done", 2, "")]


def test_reconcile_reindexes_spooled_files_missing_from_the_index(tmp_path, synth_dirs):
    """After a power loss the last index rows (synchronous=NORMAL) may be gone; the fsynced spool files are not."""
    import pydicom

    from livernode.daemon.spool import Spool
    from livernode.imaging.dicomio import read_dataset

    spool, store = Spool(tmp_path / "spool"), Store(tmp_path / "index.sqlite")
    files = sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[:3]
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        spool.store(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), f.read_bytes())
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    store.add_instance(str(first.SOPInstanceUID), str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                       str(first.SOPClassUID), str(spool.path_for(str(first.StudyInstanceUID),
                                                                  str(first.SeriesInstanceUID),
                                                                  str(first.SOPInstanceUID))))
    header = lambda p: read_dataset(p, pixels=False)  # noqa: E731
    assert store.reconcile(spool.instances, header) == 2
    assert store.reconcile(spool.instances, header) == 0
    assert store.study(str(first.StudyInstanceUID)).instances == 3


def test_attempts_recover_stop_and_poison(tmp_path):
    s = Store(tmp_path / "index.sqlite")
    s.add_instance("1.1", "9.9", "8.8", CT, "a", now=0)
    s.start_processing("9.9")
    s.stop_processing("9.9", "the node is stopping")  # SIGTERM: not a crash, the study stays due
    assert s.study("9.9").attempts == 0 and s.due_studies(30, 600, now=1) == ["9.9"]
    for crash in range(1, 4):  # three runs cut short by a kill
        s.start_processing("9.9")
        interrupted, failed = Store(tmp_path / "index.sqlite").recover(max_attempts=3)
        assert interrupted == 1 and failed == ([("9.9", 3)] if crash == 3 else [])
    row = s.study("9.9")
    assert row.state == "failed" and row.reason.startswith("interrupted 3 times") and row.attempts == 0
    assert s.due_studies(30, 600, now=10**10) == []  # not retried ...
    assert [j[1] for j in s.jobs("9.9")] == ["stopped", "interrupted", "interrupted", "interrupted"]
    assert s.requeue_study("9.9") and s.due_studies(30, 600, now=100) == ["9.9"]  # ... until `livernode retry`


def test_an_index_from_before_attempts_is_migrated(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "index.sqlite")
    old.executescript("""
        CREATE TABLE studies (study_instance_uid TEXT PRIMARY KEY, first_received_at REAL NOT NULL,
            last_received_at REAL NOT NULL, instances INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL DEFAULT 'receiving', processed_instances INTEGER NOT NULL DEFAULT 0,
            generation INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '');
        INSERT INTO studies VALUES ('9.9', 0, 0, 3, 'processing', 0, 0, '');
        CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, study_instance_uid TEXT NOT NULL,
            generation INTEGER NOT NULL, state TEXT NOT NULL, instances INTEGER NOT NULL, started_at REAL NOT NULL,
            finished_at REAL, reason TEXT NOT NULL DEFAULT '');
        INSERT INTO jobs (study_instance_uid, generation, state, instances, started_at) VALUES
            ('9.9', 1, 'running', 3, 0);
        CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL,
            series_instance_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, path TEXT NOT NULL,
            received_at REAL NOT NULL);
        INSERT INTO instances VALUES ('1.0', '9.9', '9.9.1', '1.2.840.10008.5.1.4.1.1.2', '/old.dcm', 0);
    """)
    old.commit()
    old.close()
    s = Store(tmp_path / "index.sqlite")
    assert s.study("9.9").attempts == 0 and s.due_studies(30, 600, now=1) == ["9.9"]
    assert Store(tmp_path / "index.sqlite").study("9.9").state == "processing"  # a second open changes nothing
    assert s.recover(max_attempts=3) == (1, []) and s.last_series("9.9") == []
    assert s.add_instance("1.1", "9.8", "9.8.1", "1.2.840.10008.5.1.4.1.1.2", "/x.dcm", header='{"Rows":4}')
    assert s.instance_headers("9.8") == [("/x.dcm", '{"Rows":4}')]  # the column the migration added
    assert s.instance_headers("9.9") == [("/old.dcm", None)]  # an instance indexed before: its file is read
    s.start_processing("9.9")
    s.finish("9.9", 3, series='[{"description": "Abdomen", "chosen": true}]')
    assert s.last_series("9.9") == [{"description": "Abdomen", "chosen": True}]


def test_the_worker_knows_when_the_next_study_falls_due(tmp_path):
    """A study falls due at the end of its quiet period (or of max_wait); the worker waits until then, not until
    its next poll. One due already, or one fully processed, is not a reason to wake early."""
    s = Store(tmp_path / "index.sqlite")
    assert s.next_due_in(30, 600, now=100) is None
    s.add_instance("1.1", "9.1", "9.1.1", "1.2.840.10008.5.1.4.1.1.2", "/a.dcm", now=100)
    assert s.next_due_in(30, 600, now=110) == pytest.approx(20)
    assert s.due_studies(30, 600, now=110) == []
    assert s.next_due_in(30, 20, now=110) == pytest.approx(10)  # max_wait from the first instance comes sooner
    s.add_instance("1.2", "9.1", "9.1.1", "1.2.840.10008.5.1.4.1.1.2", "/b.dcm", now=125)  # restarts the quiet
    assert s.next_due_in(30, 600, now=126) == pytest.approx(29)
    assert s.next_due_in(30, 600, now=156) is None and s.due_studies(30, 600, now=156) == ["9.1"]
