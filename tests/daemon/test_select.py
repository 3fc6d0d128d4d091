import copy

import numpy as np
import pytest

from livernode.config import SelectionConfig
from livernode.daemon.select import select_series
from livernode.errors import SeriesRejected
from livernode.imaging.ctwrite import StudyInfo, ct_datasets
from livernode.imaging.volume import CtVolume


def _series(uid_key: str, n=10, thickness=2.0, kernel="B30f", orientation=(1, 0, 0, 0, 1, 0)):
    vol = CtVolume(hu=np.zeros((n, 16, 16), np.float32), spacing=(thickness, 1.0, 1.0), orientation=orientation,
                   series_instance_uid=StudyInfo(uid_key).uid("series"))
    ds = ct_datasets(vol, StudyInfo("study"))
    for d in ds:
        d.ConvolutionKernel = kernel
    return [(f"{uid_key}/{i}", d) for i, d in enumerate(ds)]


def test_prefers_thin_soft_tissue_series_and_records_every_decision():
    thick = _series("thick", thickness=5.0)
    thin_lung = _series("lung", thickness=1.0, kernel="B70f LUNG")
    thin_soft = _series("soft", thickness=1.0)
    few = _series("few", n=3)
    [uid], decisions = select_series(thick + thin_lung + thin_soft + few)
    assert uid == thin_soft[0][1].SeriesInstanceUID
    by_uid = {d.series_instance_uid: d for d in decisions}
    assert by_uid[uid].chosen and sum(d.chosen for d in decisions) == 1
    assert "fewer than 8" in by_uid[few[0][1].SeriesInstanceUID].reason


def test_rejects_non_axial_gap_and_tilt_with_reasons():
    coronal = _series("cor", orientation=(1, 0, 0, 0, 0, -1))
    gap = _series("gap")
    del gap[4]
    tilt = _series("tilt")
    for i, (_, d) in enumerate(tilt):
        pos = [float(v) for v in d.ImagePositionPatient]
        d.ImagePositionPatient = [pos[0], pos[1] + i * 0.5, pos[2]]  # 14 deg of gantry tilt
    mr = copy.deepcopy(_series("mr"))
    for _, d in mr:
        d.Modality = "MR"
    with pytest.raises(SeriesRejected) as exc:
        select_series(coronal + gap + tilt + mr)
    msg = str(exc.value)
    assert "not axial" in msg and "slice gap of 4.00 mm" in msg and "gantry tilt 14.0 deg" in msg
    assert "modality MR, not CT" in msg


def test_duplicate_positions_are_dropped_not_fatal():
    s = _series("dup")
    [uid], decisions = select_series(s + [("dup/copy", copy.deepcopy(s[3][1]))])
    assert decisions[0].accepted and uid == s[0][1].SeriesInstanceUID


def _axial(name: str, z0: float, n: int, step: float = 3.0, **attrs):
    vol = CtVolume(hu=np.zeros((n, 16, 16), np.float32), spacing=(step, 1.0, 1.0), origin=(0.0, 0.0, z0),
                   series_instance_uid=StudyInfo(name).uid("series"),
                   sop_instance_uids=tuple(StudyInfo(name).uid(f"i{k}") for k in range(n)))
    ds = ct_datasets(vol, StudyInfo("study"))
    for d in ds:
        for k, v in attrs.items():
            setattr(d, k, v)
    return [(f"{name}/{i}", d) for i, d in enumerate(ds)]


def _probe_of(liver_from: float, liver_to: float, calls: list, broken: str = ""):
    """A stand-in for the network: 5000 mm² of liver on slices whose centre lies between two heights (read from
    the slice's own header, whatever the series' order), none elsewhere. The series described `broken` has a
    damaged file."""
    from livernode.errors import InputError

    def probe(c, idx):
        if c.decision.description == broken:
            raise InputError(f"{c.items[idx[0]][0]}: pixel data cannot be decoded (truncated)")
        calls.extend((c.decision.description, i) for i in idx)
        z = np.array([float(c.items[i][1].ImagePositionPatient[2]) for i in idx])
        return np.where((z >= liver_from) & (z <= liver_to), 5000.0, 0.0)
    return probe


def test_coverage_decides_before_thickness_and_every_loser_says_why():
    from livernode.daemon.coverage import measure

    whole = _axial("whole", -150, 101, SeriesDescription="Abdomen 3mm")  # -150 .. 150
    thorax = _axial("thorax", 30, 121, step=1.0, SeriesDescription="Thorax 1mm")  # 30 .. 150: cuts the dome
    pelvis = _axial("pelvis", -150, 31, SeriesDescription="Pelvis 3mm")  # -150 .. -60: cuts the lower liver
    legs = _axial("legs", -400, 30, SeriesDescription="Legs 3mm")  # -400 .. -313: no liver
    calls = []
    cover = lambda cands: measure(cands, _probe_of(-80, 80, calls), 20.0)  # noqa: E731
    [uid], decisions = select_series(whole + thorax + pelvis + legs, coverage=cover)
    by = {d.description: d for d in decisions}
    assert uid == whole[0][1].SeriesInstanceUID  # 3 mm with the whole liver beats 1 mm that cuts it
    assert by["Abdomen 3mm"].reason == "chosen: holds the whole liver (3 mm)"
    assert by["Thorax 1mm"].reason == ("usable, not chosen: cuts the liver off at its lower end (toward the feet); "
                                       "another series holds the whole liver")
    assert "cuts the liver off at its upper end (toward the head)" in by["Pelvis 3mm"].reason
    assert "shows no liver" in by["Legs 3mm"].reason
    # each height is looked at once (series that reach the same height share it): the abdomen's top end is the
    # thorax's, the pelvis' bottom end the abdomen's; a series with liver inside needs one middle slice, only the
    # legs are searched through
    assert len(calls) == len(set(calls)), calls
    assert [i for d, i in calls if d == "Abdomen 3mm"] == [0, 50]
    assert [i for d, i in calls if d == "Pelvis 3mm"] == [30]

    calls.clear()  # without the whole-abdomen series: the most liver, and the reason says it is not complete
    [uid], decisions = select_series(thorax + pelvis + legs, coverage=cover)
    by = {d.description: d for d in decisions}
    assert uid == thorax[0][1].SeriesInstanceUID
    # of the liver the study shows (30..80 mm in the thorax, -80..-60 mm in the pelvis), 50 of 70 mm, at 20 mm steps
    assert by["Thorax 1mm"].liver_share == pytest.approx(50 / 70, abs=0.1) and not by["Thorax 1mm"].liver_complete
    assert "the liver is not completely covered" in by["Thorax 1mm"].reason
    assert by["Pelvis 3mm"].reason.startswith("usable, not chosen: holds ")


def test_projections_captures_and_reformats_are_never_segmented_and_rules_rank_the_rest():
    pv = _axial("pv", -150, 101, SeriesDescription="Abdomen PV", SeriesNumber=3)
    art = _axial("art", -150, 101, SeriesDescription="Abdomen arterial", SeriesNumber=2)
    bone = _axial("bone", -150, 101, SeriesDescription="Abdomen PV", ConvolutionKernel="B70f", SeriesNumber=4)
    mpr = _axial("mpr", -150, 101, SeriesDescription="Abdomen PV MPR", ImageType=["DERIVED", "SECONDARY", "AXIAL"],
                 SeriesNumber=1)
    mip = _axial("mip", -150, 101, ImageType=["DERIVED", "SECONDARY", "AXIAL", "MIP"])
    minip = _axial("minip", -150, 101, ImageType=["DERIVED", "SECONDARY", "AXIAL", "MINIP"])
    scout = _axial("scout", -150, 101, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    dose = _axial("dose", -150, 1, SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    study = pv + art + bone + mpr + mip + minip + scout + dose
    by_uid = lambda ds: {d.series_instance_uid: d for d in ds}  # noqa: E731
    [uid], plain = select_series(study)
    assert uid == art[0][1].SeriesInstanceUID  # equal but for the series number: the lower one
    [uid], ruled = select_series(study, SelectionConfig(prefer=["portal|PV"], avoid=["arterial"]))
    assert uid == pv[0][1].SeriesInstanceUID
    r = by_uid(ruled)
    assert r[art[0][1].SeriesInstanceUID].reason == "usable, not chosen: avoided by rule 'arterial'"
    assert "sharp kernel B70f" in r[bone[0][1].SeriesInstanceUID].reason
    assert "derived reformat: ranks below original images" in r[mpr[0][1].SeriesInstanceUID].reason
    assert r[mip[0][1].SeriesInstanceUID].reason.startswith("MIP: a projection")
    assert r[minip[0][1].SeriesInstanceUID].reason.startswith("MinIP: a projection")
    assert r[scout[0][1].SeriesInstanceUID].reason.startswith("localizer")
    assert r[dose[0][1].SeriesInstanceUID].reason.startswith("secondary capture")
    assert all(d.reason for d in ruled) and sum(d.chosen for d in ruled) == 1
    [*uids], _ = select_series(study, SelectionConfig(segment_all=True),
                               coverage=lambda cands: __import__("livernode.daemon.coverage", fromlist=["m"]).measure(
                                   cands, _probe_of(-80, 80, []), 20.0))
    # every phase that holds the whole liver; not the bone-kernel or derived copies of one
    assert set(uids) == {s[0][1].SeriesInstanceUID for s in (pv, art)}


def _stored_feet_first(items):
    """The same slices stored with columns mirrored: the slice normal points to the feet."""
    out = []
    for src, ds in items:
        ds = copy.deepcopy(ds)
        pos = np.array([float(v) for v in ds.ImagePositionPatient])
        ds.ImagePositionPatient = list(pos + np.array([(ds.Columns - 1) * float(ds.PixelSpacing[1]), 0, 0]))
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        out.append((src, ds))
    return out


def test_heights_are_one_axis_whatever_the_storage_and_a_damaged_series_is_set_aside():
    from livernode.daemon.coverage import measure

    chest = _axial("chest", 70, 44, SeriesDescription="Chest 3mm")  # 70 .. 199: no liver
    abdomen = _stored_feet_first(_axial("abd", -199, 44, SeriesDescription="Abdomen 3mm"))  # -199 .. -70, feet first
    pelvis = _axial("pel", -300, 30, SeriesDescription="Pelvis 3mm")
    calls = []
    [uid], decisions = select_series(chest + abdomen + pelvis, coverage=lambda cands: measure(
        cands, _probe_of(-180, -100, calls, broken="Pelvis 3mm"), 20.0))
    by = {d.description: d for d in decisions}
    assert uid == abdomen[0][1].SeriesInstanceUID, [d.reason for d in decisions]
    assert by["Abdomen 3mm"].reason.startswith("chosen: holds the whole liver")
    assert "shows no liver" in by["Chest 3mm"].reason
    assert not by["Pelvis 3mm"].accepted and "pixel data cannot be used" in by["Pelvis 3mm"].reason
    assert any(d == "Abdomen 3mm" for d, _ in calls)  # looked into, not taken from the chest's mirrored heights


def test_shares_compare_series_of_separate_acquisitions():
    from livernode.daemon.coverage import measure

    thorax = _axial("thx", 30, 121, step=1.0, SeriesDescription="Thorax 1mm", FrameOfReferenceUID="1.2.3.1")
    pelvis = _axial("pel", -150, 31, SeriesDescription="Pelvis 3mm", FrameOfReferenceUID="1.2.3.2")
    [uid], decisions = select_series(thorax + pelvis, coverage=lambda cands: measure(
        cands, _probe_of(-80, 80, []), 20.0))
    by = {d.description: d for d in decisions}
    assert uid == thorax[0][1].SeriesInstanceUID  # 50 mm of liver against 20 mm, though each is its own group
    assert by["Thorax 1mm"].liver_share == 1.0 and by["Pelvis 3mm"].liver_share < 1.0  # not each 100 % of its own


def test_a_single_valued_image_type_and_a_study_with_nothing_usable():
    from livernode.daemon.select import NoUsableSeries

    mip = _axial("mip1", -150, 20, ImageType="MIP")  # pydicom reads one value as a str
    scout = _axial("sc1", 0, 1, ImageType="LOCALIZER")
    with pytest.raises(NoUsableSeries) as info:
        select_series(mip + scout)
    reasons = [d.reason for d in info.value.decisions]
    assert reasons[0].startswith("MIP: a projection") and reasons[1].startswith("localizer")
    assert "no usable CT series (" in str(info.value) and mip[0][1].SeriesInstanceUID not in str(info.value)


def _via_index(items):
    """The same instances as series selection sees them from the node's index: header facts only."""
    from livernode.imaging.headers import LightHeader, header_facts, light_header

    out = [(src, light_header(header_facts(ds))) for src, ds in items]
    assert all(isinstance(ds, LightHeader) and "PatientName" not in ds for _, ds in out)
    return out


def _decide(items, rules=None, coverage=None):
    try:
        return select_series(items, rules or SelectionConfig(), coverage)
    except SeriesRejected as exc:
        return str(exc)


def test_selection_from_the_index_header_facts_decides_as_from_the_files(tmp_path):
    """Every case above (rules, projections, captures, reformats, coverage, geometry faults, mirrored storage,
    single-valued image types) and a whole study read from its files: the same chosen series and the same decision
    for every series from the facts the index keeps as from the full headers."""
    from livernode.daemon.coverage import measure
    from livernode.imaging.dicomio import dicom_files, read_dataset
    from livernode.imaging.synth_study import abdomen_study

    cover = lambda cands: measure(cands, _probe_of(-80, 80, []), 20.0)  # noqa: E731
    tilt = _series("tilt")
    for i, (_, d) in enumerate(tilt):
        d.ImagePositionPatient = [0, i * 0.5, float(d.ImagePositionPatient[2])]
    rules = SelectionConfig(prefer=["portal|PV"], avoid=["arterial"])
    studies = [
        (_series("thick", thickness=5.0) + _series("lung", thickness=1.0, kernel="B70f LUNG") + _series("soft"),
         None),
        (_axial("pv", -150, 101, SeriesDescription="Abdomen PV", SeriesNumber=3)
         + _axial("art", -150, 101, SeriesDescription="Abdomen arterial", SeriesNumber=2)
         + _axial("mpr", -150, 101, ImageType=["DERIVED", "SECONDARY", "AXIAL"], SeriesNumber=1)
         + _axial("mip", -150, 20, ImageType="MIP") + _axial("dose", -150, 1, SOPClassUID="1.2.840.10008.5.1.4.1.1.7"),
         rules),
        (_axial("whole", -150, 101) + _axial("thorax", 30, 121, step=1.0) + _stored_feet_first(_axial("p", -150, 31)),
         None),
        (_series("cor", orientation=(1, 0, 0, 0, 0, -1)) + _series("gap")[:4] + _series("gap")[5:] + tilt, None),
    ]
    folder = tmp_path / "study"
    abdomen_study(folder, seed=5, size=64, slices=240)
    studies.append(([(str(f), read_dataset(f, pixels=False)) for f in dicom_files(folder)], rules))
    assert len({ds.SeriesInstanceUID for _, ds in studies[-1][0]}) >= 8
    for items, rules_here in studies:
        want = _decide(items, rules_here, cover)
        got = _decide(_via_index(items), rules_here, cover)
        assert want and got == want
