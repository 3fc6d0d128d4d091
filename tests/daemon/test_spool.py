import pytest

from livernode.daemon.spool import InvalidUID, Spool, check_uid, uid_key


@pytest.mark.parametrize("bad", ["..", "a/b", "1.2.3/../4", "1." + "2" * 70, "1.2\x00.3", "", "1..2", "01.2", " 1.2"])
def test_bad_uids_are_rejected(bad):
    with pytest.raises(InvalidUID):
        check_uid(bad)


def test_paths_are_digests_inside_the_spool(tmp_path):
    spool = Spool(tmp_path)
    p, new = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"data")
    assert new and p.read_bytes() == b"data"
    assert p.is_relative_to(tmp_path / "instances")
    assert "1.2.3" not in str(p.relative_to(tmp_path)) and p.name == f"{uid_key('1.2.3.4.5')}.dcm"
    again, new2 = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"other")
    assert again == p and not new2 and p.read_bytes() == b"data"  # a repeated SOP Instance UID is stored once
    with pytest.raises(InvalidUID):
        spool.store("1.2.3", "..", "1.2.3.4.6", b"x")
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == [p.name]


def test_partials_are_cleaned(tmp_path):
    spool = Spool(tmp_path)
    d = spool.instances / "x"
    d.mkdir()
    (d / ".a.dcm.1.tmp").write_bytes(b"partial")
    assert spool.clean_partials() == 1
    assert not list(d.iterdir())


def test_free_space_threshold(tmp_path):
    assert Spool(tmp_path, min_free_bytes=0).has_room()
    assert not Spool(tmp_path, min_free_bytes=1 << 62).has_room()


def test_a_series_folder_removed_behind_the_spools_back_is_made_again(tmp_path):
    """The spool remembers which folders exist; retention may remove one, and the next instance still lands."""
    import shutil

    spool = Spool(tmp_path)
    p, _ = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"one")
    shutil.rmtree(p.parent.parent)
    q, new = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.6", (b"tw", memoryview(b"o")))
    assert new and q.read_bytes() == b"two" and q.parent == p.parent


def test_threshold_beyond_64_bits_still_refuses_and_a_pickled_spool_keeps_its_value(tmp_path):
    import pickle

    spool = Spool(tmp_path, min_free_bytes=1e13 * 1e6)  # min_free_mb = 1e13: more than an int64 of bytes
    assert spool.min_free_bytes == 2**63 - 1 and not spool.has_room()
    spool.min_free_bytes = 5e30
    assert not spool.has_room()
    copy = pickle.loads(pickle.dumps(spool))
    assert copy.min_free_bytes == 2**63 - 1 and copy.root == spool.root
    copy.min_free_bytes = 0  # a detached copy: the original keeps refusing
    assert copy.has_room() and not spool.has_room()
