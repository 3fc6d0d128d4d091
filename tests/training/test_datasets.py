"""Each loader reads its layout back to exactly the phantom that synth wrote; bad cases are named with a reason."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from livernode.errors import DatasetError, InputError
from livernode.imaging.synth import case_rng
from livernode.imaging.phantom import make_phantom
from livernode.training.data import split_cases
from livernode.config import SplitConfig
from livernode.training.datasets import list_cases, load_case
from tests.conftest import SYNTH


@pytest.mark.parametrize("fmt", ["dicom", "chaos", "lits"])
def test_loader_reads_synth_layout_exactly(synth_dirs, fmt):
    refs = list_cases(synth_dirs[fmt], fmt)
    assert len(refs) == SYNTH["cases"]
    for i, ref in enumerate(refs):
        case = load_case(ref)
        ph = make_phantom(case_rng(SYNTH["seed"], i), size=SYNTH["size"], slices=SYNTH["slices"])
        assert np.array_equal(case.volume.hu, ph.hu.astype(np.float32))
        assert case.volume.spacing == pytest.approx(ph.spacing, rel=1e-5)
        assert case.volume.origin == pytest.approx(ph.origin, abs=1e-3)
        if fmt == "chaos":  # liver only: tumours count as liver, tumour marked as not labelled
            assert not case.tumour_labelled
            assert np.array_equal(case.labels > 0, ph.labels > 0) and case.labels.max() <= 1
        else:
            assert case.tumour_labelled
            assert np.array_equal(case.labels, ph.labels)


def test_real_chaos_case(chaos_sample):
    [ref] = list_cases(chaos_sample, "chaos")
    case = load_case(ref)
    assert case.volume.hu.shape == (78, 512, 512)
    assert case.volume.spacing == pytest.approx((2.0, 0.7265625, 0.7265625))
    assert case.volume.origin[2] == pytest.approx(1536.5)  # slices ascend along the normal, not in file order
    assert case.volume.hu.min() == -1000.0  # intercept -1000 applied
    assert not case.tumour_labelled
    # the file named first (i0000) is the highest slice, so its mask must land last
    import cv2

    first_png = cv2.imread(str(chaos_sample / "Ground" / "liver_GT_000.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert np.array_equal(case.labels[-1] > 0, first_png)
    liver_hu = np.median(case.volume.hu[case.labels > 0])
    assert 40 < liver_hu < 200  # contrast-enhanced liver parenchyma


def test_slices_are_ordered_by_position_not_file_name(synth_dirs, tmp_path):
    src = synth_dirs["dicom"] / "case_000"
    dst = tmp_path / "case_000"
    shutil.copytree(src, dst)
    files = sorted((dst / "ct").glob("*.dcm"))
    for i, f in enumerate(files):  # reverse the names
        f.rename(dst / "ct" / f"tmp{len(files) - i:04d}.dcm")
    case = load_case(list_cases(tmp_path, "dicom")[0])
    ph = make_phantom(case_rng(SYNTH["seed"], 0), size=SYNTH["size"], slices=SYNTH["slices"])
    assert np.array_equal(case.volume.hu, ph.hu.astype(np.float32))


def test_chaos_mask_count_mismatch_is_named(synth_dirs, tmp_path):
    case = tmp_path / "1"
    shutil.copytree(synth_dirs["chaos"] / "1", case)
    sorted((case / "Ground").glob("*.png"))[-1].unlink()
    with pytest.raises(DatasetError, match=r"Ground: 11 masks for 12 DICOM slices"):
        load_case(list_cases(tmp_path, "chaos")[0])


def test_chaos_mask_shape_mismatch_is_named(synth_dirs, tmp_path):
    import cv2

    case = tmp_path / "1"
    shutil.copytree(synth_dirs["chaos"] / "1", case)
    cv2.imwrite(str(case / "Ground" / "liver_GT_003.png"), np.zeros((32, 32), np.uint8))
    with pytest.raises(DatasetError, match=r"liver_GT_003.png: mask is 32x32"):
        load_case(list_cases(tmp_path, "chaos")[0])


def test_lits_wrong_shape_is_named(synth_dirs, tmp_path):
    shutil.copy(synth_dirs["lits"] / "volume-0.nii.gz", tmp_path)
    img = nib.load(str(synth_dirs["lits"] / "segmentation-0.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), str(tmp_path / "segmentation-0.nii.gz"))
    with pytest.raises(DatasetError, match=r"segmentation-0.nii.gz: shape \(64, 64, 11\) does not match"):
        load_case(list_cases(tmp_path, "lits")[0])


def test_corrupt_dicom_is_named(synth_dirs, tmp_path):
    case = tmp_path / "1"
    shutil.copytree(synth_dirs["chaos"] / "1", case)
    bad = sorted((case / "DICOM_anon").glob("*.dcm"))[4]
    bad.write_bytes(bad.read_bytes()[:700])
    with pytest.raises(InputError, match=bad.name):
        load_case(list_cases(tmp_path, "chaos")[0])


def test_split_is_by_patient_and_seeded(synth_dirs):
    refs = list_cases(synth_dirs["lits"], "lits") * 4  # 12 refs
    refs = [type(r)(f"{r.case_id}-{i}", r.fmt, r.files) for i, r in enumerate(refs)]
    a = split_cases(refs, SplitConfig(seed=1))
    b = split_cases(refs, SplitConfig(seed=1))
    assert a == b
    ids = [set(r.case_id for r in a[k]) for k in ("train", "validation", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(map(len, ids)) == 12 and len(ids[1]) >= 1 and len(ids[2]) >= 1


def test_training_sees_every_case_the_way_the_node_does(synth_dirs, tmp_path):
    """A CHAOS case stored feet first (columns mirrored, masks with them) gives the network the same arrays."""
    import cv2

    from livernode.imaging.preprocess import PreprocessSpec
    from livernode.imaging.synth_study import stored_another_way
    from livernode.training.cache import prepare
    from livernode.training.data import CaseSplit

    src = synth_dirs["chaos"] / "1"
    mirrored = tmp_path / "1"
    stored_another_way(sorted((src / "DICOM_anon").iterdir()), mirrored / "DICOM_anon", mirror_columns=True)
    (mirrored / "Ground").mkdir()
    for png in sorted((src / "Ground").iterdir()):
        cv2.imwrite(str(mirrored / "Ground" / png.name), cv2.imread(str(png), cv2.IMREAD_UNCHANGED)[:, ::-1])
    spec = PreprocessSpec(size=64)
    [as_is], [turned] = list_cases(src, "chaos"), list_cases(mirrored, "chaos")
    assert not np.array_equal(load_case(as_is).volume.hu, load_case(turned).volume.hu)  # stored differently ...
    (ax, ay, _), (bx, by, _) = (
        CaseSplit("t", tuple(prepare([r], spec, tmp_path / "cache", workers=1, progress=False).cases.values()))
        .case_arrays(0) for r in (as_is, turned))
    # Mirroring the columns turns the slice normal (row x column) to the feet, so that case's slices are stored in
    # the opposite order; the cache runs both foot to head, so neighbouring slices (2.5-D, 3-D) are seen the same way.
    assert np.array_equal(ax, bx) and np.array_equal(ay, by) and ay.any()
