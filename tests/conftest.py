"""Shared fixtures: small phantoms written once per session by the real synth code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from livernode.imaging.synth import synthesize

REPO = Path(__file__).resolve().parent.parent
CHAOS_SAMPLE = REPO.parent / "shared" / "data" / "chaos-ct-sample"
SYNTH = dict(cases=3, slices=12, size=64, seed=7)


# Test files whose tests one pytest-xdist worker runs one after the other (`make test`: -n 2 --dist loadgroup):
# Ray's, so that two Ray clusters never start at once on two cores, and test_compare's, whose module-scoped fixture
# trains its networks once for the file.
GROUPS = {"tests/batch/test_ray.py": "ray", "tests/batch/test_ray_tls.py": "ray",
          "tests/reliability/test_ray_node.py": "ray", "tests/training/test_compare.py": "compare"}
# Trained and exported once per run by whichever worker asks first (`built_once`); the other waits if it asks then.
MODELS = ("liver_model", "exported")


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` by GROUPS. pytest-xdist 3.8 marks a group by a suffix it writes into each test's node id,
    which pytest 9.2 no longer reads (its node ids are derived from `_id`), so groups made by `xdist_group` marks
    silently ran spread over both workers. Units are handed out in the collection order below."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class Grouped(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return GROUPS.get(_file(nodeid)) or super()._split_scope(nodeid)

    config.option.loadscopereorder = False
    return Grouped(config, log)


def pytest_collection_modifyitems(config, items):
    """The order tests are handed out in. First one test that trains the liver model and one that trains and
    exports the small run, so that the two workers build them at the same time instead of one waiting for the
    other's build (which cost 3.7 minutes of one worker); then the groups, then the slow tests (the longest work
    early leaves the two workers less unevenly loaded at the end), then the rest, each in collection order."""
    for item in items:
        if item.get_closest_marker("ray") and GROUPS.get(_file(item.nodeid)) != "ray":
            raise pytest.UsageError(f"{item.nodeid} starts Ray: add its file to GROUPS in tests/conftest.py")
    first = []
    for model in MODELS:
        builder = next((i for i in items if _file(i.nodeid) not in GROUPS and i not in first
                        and {f for f in MODELS if f in getattr(i, "fixturenames", ())} == {model}), None)
        first += [builder] if builder else []
    rest = [i for i in items if i not in first]
    grouped = [i for i in rest if _file(i.nodeid) in GROUPS]
    slow = [i for i in rest if i not in grouped and i.get_closest_marker("slow")]
    items[:] = first + grouped + slow + [i for i in rest if i not in grouped and i not in slow]


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that `build(folder)` fills once per test run, also when pytest-xdist's workers each run a session
    of their own: the first worker to ask builds it under a file lock, the others wait for it and reuse it. A
    build that failed (no `.built` mark) is tried again by the next one to ask."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    root = base / f"once-{name}"
    with FileLock(str(base / f"once-{name}.lock")):
        if not (root / ".built").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            build(root)
            (root / ".built").touch()
    return root


@pytest.fixture(scope="session")
def chaos_sample() -> Path:
    if not CHAOS_SAMPLE.is_dir():
        pytest.fail(f"{CHAOS_SAMPLE} is missing: the real CHAOS case must sit in ../shared/data beside the clone")
    return CHAOS_SAMPLE


@pytest.fixture(scope="session")
def synth_dirs(tmp_path_factory) -> dict[str, Path]:
    """The same three phantoms in every layout."""
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for layout in ("dicom", "chaos", "lits"):
        out[layout] = root / layout
        synthesize(out[layout], layout=layout, **SYNTH)
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session", autouse=True)
def _prepared_cache(tmp_path_factory):
    """Training in tests (and in the CLI subprocesses they start) prepares its cases in a session folder, not in
    the user's ~/.cache."""
    os.environ["LIVERNODE_CACHE"] = str(tmp_path_factory.mktemp("prepared-cache"))


@pytest.fixture()
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """3 epochs of 2 steps at 64 px on 4 dicom phantoms, through the real CLI: (root with data/, the run folder).
    Shared by every test of the run: treat it as read-only."""
    from livernode.imaging.synth import synthesize

    def build(root: Path) -> None:
        synthesize(root / "data", cases=4, slices=8, size=64, seed=11, layout="dicom")
        r = subprocess.run([sys.executable, "-m", "livernode.cli", "train", "--data", str(root / "data"), "--format",
                            "dicom", "--out", str(root / "run"), "--size", "64", "--epochs", "3",
                            "--steps-per-epoch", "2"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "epoch 3/3" in r.stderr  # the progress bar

    root = built_once(tmp_path_factory, "trained-run", build)
    return root, root / "run"


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
    _, run = trained_run

    def build(root: Path) -> None:
        r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning:onnxruntime", "-m", "livernode.cli",
                            "export", str(run), "--out", str(root / "model.onnx")], capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "argmax agreement" in r.stdout

    return built_once(tmp_path_factory, "exported", build) / "model.onnx"


@pytest.fixture()
def pacs(tmp_path):
    """dcmtk storescp as the PACS stand-in on a free port: (port, folder it writes to)."""
    from tests.peers import free_port, start_storescp, stop_process

    port, out = free_port(), tmp_path / "pacs"
    proc = start_storescp(port, out)
    yield port, out
    stop_process(proc)


@pytest.fixture(scope="session")
def liver_model(tmp_path_factory) -> Path:
    """A small exported network that does find the liver in phantoms (test Dice about 0.94 here): 8 epochs of 8
    batches at 64 px on 8 phantoms of 24 slices, about 2 minutes on 2 cores. The series-selection and orientation
    tests need one that sees the liver; `trained_run` is only trained enough to exercise the code."""
    import re

    def build(root: Path) -> None:
        synthesize(root / "data", cases=8, slices=24, size=64, seed=21, layout="dicom")
        # Left-right flips on: these 24-slice phantoms show liver on nearly every slice, and without flips a network
        # this small learns "liver is where the liver usually is" and paints it into the pelvis of a 100-slice study
        # (about 460 px on every liver-free slice), which is not what the selection tests are about.
        (root / "train.toml").write_text("[train.augment]\nflip = true\n")
        r = subprocess.run([sys.executable, "-m", "livernode.cli", "train", "--data", str(root / "data"), "--format",
                            "dicom", "--out", str(root / "run"), "--size", "64", "--epochs", "8", "--steps-per-epoch",
                            "8", "--config", str(root / "train.toml")], capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
        dice = float(re.search(r"test Dice liver ([0-9.]+)", r.stdout).group(1))
        assert dice >= 0.8, f"the liver model reached a test Dice of {dice} only: {r.stdout}"
        out = root / "model.onnx"
        r = subprocess.run([sys.executable, "-m", "livernode.cli", "export", str(root / "run"), "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]

    return built_once(tmp_path_factory, "liver-model", build) / "model.onnx"
