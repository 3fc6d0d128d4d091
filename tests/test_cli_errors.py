"""Expected errors exit non-zero with one line naming the file or key and the reason, and no traceback."""

import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np


def _run(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "livernode.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def _one_line_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_config_key(tmp_path, synth_dirs, cli_env):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[model]\nbackbone = 'resnet34'\nencoder = 'x'\n")
    r = _run(["train", "--data", str(synth_dirs["lits"]), "--format", "lits", "--out", str(tmp_path / "run"),
              "--config", str(cfg)], cli_env)
    _one_line_error(r, "bad.toml", "unknown key 'model.encoder'")


def test_corrupt_dicom(tmp_path, synth_dirs, cli_env):
    shutil.copytree(synth_dirs["dicom"] / "case_000", tmp_path / "case_000")
    bad = tmp_path / "case_000" / "ct" / "CT0003.dcm"
    bad.write_bytes(bad.read_bytes()[:1000])
    r = _run(["evaluate", "--model", str(tmp_path / "none.onnx"), "--data", str(tmp_path), "--format", "dicom",
              "--out", str(tmp_path / "ev")], cli_env)
    _one_line_error(r, "none.onnx", "not found")
    # the data itself is read by train, which reports the broken slice by name
    for d in ("case_001", "case_002"):
        shutil.copytree(synth_dirs["dicom"] / d, tmp_path / d)
    r = _run(["train", "--data", str(tmp_path), "--format", "dicom", "--out", str(tmp_path / "run")], cli_env)
    _one_line_error(r, "CT0003.dcm")


def test_mismatched_chaos_masks(tmp_path, synth_dirs, cli_env):
    for d in ("1", "2", "3"):
        shutil.copytree(synth_dirs["chaos"] / d, tmp_path / d)
    next((tmp_path / "2" / "Ground").glob("*.png")).unlink()
    r = _run(["train", "--data", str(tmp_path), "--format", "chaos", "--out", str(tmp_path / "run")], cli_env)
    _one_line_error(r, "2/Ground", "11 masks for 12 DICOM slices")


def test_nifti_of_wrong_shape(tmp_path, synth_dirs, cli_env):
    for i in range(3):
        shutil.copy(synth_dirs["lits"] / f"volume-{i}.nii.gz", tmp_path)
        shutil.copy(synth_dirs["lits"] / f"segmentation-{i}.nii.gz", tmp_path)
    img = nib.load(str(tmp_path / "volume-1.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), img.affine), str(tmp_path / "volume-1.nii.gz"))
    r = _run(["train", "--data", str(tmp_path), "--format", "lits", "--out", str(tmp_path / "run")], cli_env)
    _one_line_error(r, "volume-1.nii.gz", "expected a 3-D volume")


def test_train_extra_missing(tmp_path, synth_dirs, cli_env):
    """Simulate an install without the 'train' extra by hiding segmentation_models and tensorflow."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('segmentation_models', 'tensorflow'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Hide())\n")
    env = dict(cli_env, PYTHONPATH=str(block))
    r = _run(["train", "--data", str(synth_dirs["lits"]), "--format", "lits", "--out", str(tmp_path / "run")], env)
    _one_line_error(r, "'train' extra", "pip install 'livernode[train]'")


def test_help_describes_the_product():
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "segments the liver and liver tumours in abdominal CT" in r.stdout
    assert "argument parsing" not in r.stdout
    for command in ("synth", "train", "export", "evaluate", "infer", "serve", "status", "purge", "demo"):
        assert command in r.stdout
