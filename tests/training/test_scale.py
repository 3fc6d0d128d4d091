"""Training at the size of the real data sets: download layouts, the prepared cache, streamed batches, patient
folds, MirroredStrategy over two logical CPU devices, two multi-worker processes on loopback, Ctrl-C and resume."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from livernode.config import SplitConfig, TrainConfig
from livernode.imaging.preprocess import PreprocessSpec
from livernode.training.cache import HAS_LIVER, HAS_TUMOUR, entry_key, prepare
from livernode.training.data import Batches, CaseSplit, fold_members, split_cases
from livernode.training.datasets import CaseRef, list_cases
from livernode.training.distribute import HEARTBEAT_TIMEOUT_S

# The plain U-Net: these tests are about data layouts, strategies and interruption, which every architecture goes
# through alike (test_train_export trains each one); it starts training in about 60 % of the ResNet34 U-Net's time.
TRAIN = [sys.executable, "-m", "livernode.cli", "train", "--size", "64", "--arch", "unet"]


def _train(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run([*TRAIN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _history(run: Path) -> list[dict]:
    with (run / "history.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def download_layouts(synth_dirs, tmp_path_factory):
    """LiTS re-packed into separate folders (plus a test-set volume without segmentation), and CHAOS as
    downloaded, with MR cases beside the CT ones."""
    root = tmp_path_factory.mktemp("downloads")
    lits = root / "LITS"
    for f in sorted(synth_dirs["lits"].iterdir()):
        sub = "volumes" if f.name.startswith("volume") else "segmentations"
        (lits / sub / "nested").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, lits / sub / "nested" / f.name)
    shutil.copy(synth_dirs["lits"] / "volume-0.nii.gz", lits / "volumes" / "volume-77.nii.gz")  # no labels
    chaos = root / "CHAOS_Train_Sets" / "Train_Sets"
    for case in sorted(synth_dirs["chaos"].iterdir()):
        shutil.copytree(case, chaos / "CT" / case.name)
        shutil.copytree(case, chaos / "MR" / case.name / "T2SPIR")  # an MR case with masks: still not CT
    return lits, root / "CHAOS_Train_Sets"


def test_download_layouts_are_found_and_the_rest_is_skipped_with_a_reason(download_layouts, caplog):
    lits, chaos = download_layouts
    caplog.set_level("INFO")
    refs = list_cases(lits, "lits")
    assert [r.case_id for r in refs] == ["lits-0", "lits-1", "lits-2"]
    assert all(r.files[0].parent.parent.name == "volumes" and r.files[1].parent.parent.name == "segmentations"
               for r in refs)
    assert any("volume-77.nii.gz: no segmentation-77" in m for m in caplog.messages)
    refs = list_cases(chaos, "chaos")
    assert [r.case_id for r in refs] == ["1", "2", "3"] and all(r.files[0].parent.name == "CT" for r in refs)
    skipped = [m for m in caplog.messages if "an MR case" in m]
    assert len(skipped) == 3 and all("T2SPIR" in m for m in skipped)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["lits", "chaos"])
def test_trains_from_a_download_layout(download_layouts, which, tmp_path):
    data = download_layouts[0 if which == "lits" else 1]
    _train("--data", data, "--format", which, "--out", tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "1",
           "--cache", tmp_path / "cache")
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert sum(len(v) for v in summary["data"]["cases"].values()) == 3
    assert (tmp_path / "run" / "best.h5").stat().st_size > 0


def test_prepared_cache_is_keyed_by_sources_and_preprocessing(synth_dirs, tmp_path):
    refs = list_cases(synth_dirs["lits"], "lits")
    spec = PreprocessSpec(size=64)
    first = prepare(refs, spec, tmp_path, workers=2, progress=False)
    assert first.built == 3 and len(first.cases) == 3
    again = prepare(refs, spec, tmp_path, workers=2, progress=False)
    assert again.built == 0  # same sources and preprocessing: nothing is prepared twice
    other = PreprocessSpec(size=64, window_low=-200.0)
    assert entry_key(refs[0], other) != entry_key(refs[0], spec)
    assert prepare(refs, other, tmp_path, workers=1, progress=False).built == 3
    case = first.cases["lits-0"]
    image = case.images()
    assert image.dtype == np.float16 and case.labels().dtype == np.uint8
    assert image.shape == (12, 64, 64) and image.max() > 0
    assert np.array_equal(case.images(3, 5), image[3:5])
    assert np.array_equal(np.load(case.path / "image.npy"), image)  # plain .npy files, readable by anyone
    labels = case.labels().reshape(case.n, -1)
    assert np.array_equal(case.flags[:, HAS_LIVER], (labels > 0).any(1))
    assert np.array_equal(case.flags[:, HAS_TUMOUR], (labels == 2).any(1))
    assert any(c.flags[:, HAS_TUMOUR].any() for c in first.cases.values())
    os.utime(refs[0].files[0], (time.time() + 5, time.time() + 5))  # a changed source file: a new entry
    assert prepare(refs, spec, tmp_path, workers=1, progress=False).built == 1
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


def test_batches_are_a_function_of_the_step_and_keep_the_shares(synth_dirs, tmp_path):
    refs = list_cases(synth_dirs["lits"], "lits")
    p = prepare(refs, PreprocessSpec(size=64), tmp_path, workers=1, progress=False)
    split = CaseSplit("train", tuple(p.cases.values()))
    cfg = TrainConfig(batch_size=8, tumour_slices_fraction=0.5, liver_slices_only_fraction=0.25)
    a, b = Batches(split, cfg, seed=3), Batches(split, cfg, seed=3)
    for step in (0, 5, 41):
        xa, ta = a.batch(step)
        xb, tb = b.batch(step)
        assert xa.shape == (8, 64, 64, 1) and ta.shape == (8, 64, 64, 4) and xa.max() > 0
        assert np.array_equal(xa, xb) and np.array_equal(ta, tb)  # the same data order after a resume
    assert not np.array_equal(a.batch(1)[0], a.batch(2)[0])
    assert not np.array_equal(Batches(split, cfg, seed=4).picks(0), a.picks(0))
    tumour = split.flags[:, HAS_TUMOUR]
    assert all(tumour[a.picks(s)[:4]].all() for s in range(20))  # half of each batch has a labelled tumour
    ds = a.dataset(pytest.importorskip("tensorflow"), 5, 7, workers=2)
    got = [x.numpy() for x, _ in ds]
    assert len(got) == 2 and np.array_equal(got[0], a.batch(5)[0])


def test_folds_split_by_patient_and_test_each_case_once():
    refs = [CaseRef(f"case-{i:02d}", "lits", ()) for i in range(10)]
    tested = []
    for fold in range(5):
        parts = split_cases(refs, SplitConfig(seed=4), folds=5, fold=fold)
        ids = [{r.case_id for r in parts[k]} for k in ("train", "validation", "test")]
        assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
        assert sum(map(len, ids)) == 10 and len(ids[2]) == 2
        assert parts == split_cases(list(reversed(refs)), SplitConfig(seed=4), folds=5, fold=fold)  # same every time
        assert sorted(ids[2]) == fold_members(refs, SplitConfig(seed=4), 5)[fold]
        tested += ids[2]
    assert sorted(tested) == [r.case_id for r in refs]


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_matches_one_device(trained_run, tmp_path):
    """Same global batch (8) and seed: one device, and MirroredStrategy splitting it 4 + 4 over two logical CPU
    devices. Batch-norm statistics are per replica, so the losses are close, not equal."""
    data = trained_run[0] / "data"
    args = ("--data", data, "--format", "dicom", "--epochs", "1", "--steps-per-epoch", "3")
    _train(*args, "--out", tmp_path / "one")
    r = _train(*args, "--out", tmp_path / "two", "--strategy", "mirrored", "--logical-cpus", "2")
    assert "mirrored strategy, 2 replica(s)" in r.stderr
    placement = json.loads((tmp_path / "two" / "run.json").read_text())["placement"]
    assert placement["replicas"] == 2 and placement["strategy"] == "mirrored"
    one, two = float(_history(tmp_path / "one")[0]["loss"]), float(_history(tmp_path / "two")[0]["loss"])
    assert one > 0 and two > 0
    assert abs(one - two) / one < 0.05, (one, two)


def test_the_workers_coordination_waits_out_a_starved_worker():
    """TensorFlow's own 10 s heartbeat timeout ended a two-worker run while other work kept this machine's cores
    busy; the workers' coordination service is configured as the strategy would, with HEARTBEAT_TIMEOUT_S."""
    from livernode.training.distribute import coordinate
    from livernode.training.model import import_tf

    import_tf()
    from tensorflow.python.eager import context

    ctx = context.Context()  # not the process's own: nothing here starts a server
    coordinate(ctx, 3)
    cfg = ctx.coordination_service
    assert cfg.service_type == "standalone"
    assert cfg.heartbeat_timeout_in_ms == HEARTBEAT_TIMEOUT_S * 1000 >= 60_000
    assert cfg.service_leader == "/job:worker/replica:0/task:0"
    assert [(job.name, job.num_tasks) for job in cfg.coordinated_job_list] == [("worker", 3)]


@pytest.mark.parametrize("cluster, task", [({"worker": ["a:1", "b:1"], "chief": ["c:1"]}, "worker"),
                                           ({"worker": ["a:1", "b:1"]}, "ps")])
def test_a_cluster_with_more_than_workers_is_refused(cluster, task, monkeypatch):
    """coordinate() configures what the strategy would for workers alone; a chief or another job would lead or
    join the coordination, so such a TF_CONFIG is refused, naming the job."""
    from livernode.errors import TrainingError
    from livernode.training.distribute import _tf_config

    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": task, "index": 0}}))
    with pytest.raises(TrainingError, match="workers only") as exc:
        _tf_config()
    assert ("chief" if "chief" in cluster else "ps") in str(exc.value)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": cluster["worker"]},
                                                "task": {"type": "worker", "index": 1}}))
    assert _tf_config()["task"]["index"] == 1


@pytest.mark.slow
def test_two_multi_worker_processes_on_loopback_finish(trained_run, tmp_path):
    """TensorFlow's gRPC server listens on every interface whatever TF_CONFIG says, so both workers run in a
    network namespace of their own (`unshare -n`), where loopback is the only interface there is."""
    import shlex

    data = trained_run[0] / "data"
    workers = ["localhost:23456", "localhost:23457"]  # a fresh namespace: every port is free
    lines = ["ip link set lo up || exit 90"]
    for i in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
        cmd = [*TRAIN, "--data", str(data), "--format", "dicom", "--out", str(tmp_path / f"w{i}"), "--epochs", "2",
               "--steps-per-epoch", "2", "--strategy", "multi-worker"]
        lines.append(f"TF_CONFIG={shlex.quote(tf_config)} {shlex.join(cmd)} > {tmp_path / f'worker{i}.log'} 2>&1 &"
                     f" p{i}=$!")
    lines.append("wait $p0; c0=$?; wait $p1; c1=$?; echo $c0 $c1")
    r = subprocess.run(["unshare", "-n", "sh", "-c", "\n".join(lines)], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, r.stderr  # unshare needs root, as make test's Debian packages do
    codes = [int(c) for c in r.stdout.split()]
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], [lg[-2000:] for lg in logs]
    for lg in logs:  # the strategy kept the coordination configured before it (TensorFlow's own default: 10 s)
        assert f"led by /job:worker/replica:0/task:0, heartbeat timeout {HEARTBEAT_TIMEOUT_S} s" in lg, lg[-2000:]
    assert "multi-worker strategy, 2 replica(s) on 2 worker(s)" in logs[0]
    assert len(_history(tmp_path / "w0")) == 2 and (tmp_path / "w0" / "best.h5").stat().st_size > 0
    assert not (tmp_path / "w1" / "best.h5").exists()  # the chief keeps the run


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes_the_run(trained_run, tmp_path):
    """Ctrl-C in the middle of the second epoch; --resume finishes that epoch with the batches it had left."""
    data, run = trained_run[0] / "data", tmp_path / "run"
    args = ["--data", str(data), "--format", "dicom", "--out", str(run), "--epochs", "3", "--steps-per-epoch", "4",
            "--folds", "3", "--fold", "1"]
    log = tmp_path / "train.log"
    with log.open("w") as fh:
        # A shell that starts a job in the background (as CI may) makes it ignore SIGINT, and the child would
        # inherit that: give it the default disposition, as a terminal's Ctrl-C finds it.
        proc = subprocess.Popen([*TRAIN, *args], stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 600
        while "| 5/12 [" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    text = log.read_text()
    assert code != 0 and "continue with --resume" in text, text[-2000:]
    state = json.loads((run / "state.json").read_text())
    assert state["interrupted"] and 5 <= state["step"] < 8, state  # inside epoch 2
    assert len(_history(run)) == 1
    r = _train(*args, "--resume")
    assert f"resuming {run} at step {state['step']} (epoch 2, batch {state['step'] - 4} of 4)" in r.stderr
    assert len(_history(run)) == 3
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 12 and state["optimizer_steps"] == 12  # the schedule went on from where it stopped
    assert "interrupted" not in state
    summary = json.loads((run / "run.json").read_text())
    folds = summary["folds"]
    assert (folds["folds"], folds["fold"]) == (3, 1) and len(folds["patients"]) == 3
    assert sorted(summary["data"]["cases"]["test"]) == folds["patients"][1]  # fold 1 is the test set
    assert sorted(sum(folds["patients"], [])) == sorted(sum(summary["data"]["cases"].values(), []))


def test_split_score_adds_up_to_the_training_loss_over_the_whole_split():
    """Validation is scored case by case; its loss equals the training loss computed on all slices at once."""
    from livernode.training.data import targets
    from livernode.training.model import import_tf, make_loss
    from livernode.training.train import SplitScore

    _, tf = import_tf()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, (10, 16, 16)).astype(np.uint8)
    known = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], bool)
    logits = rng.normal(size=(10, 16, 16, 3))
    prob = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    score = SplitScore((0.2, 1.0, 3.0), 1.0)
    for i in (0, 3, 7):  # uneven pieces, as cases are
        j = {0: 3, 3: 7, 7: 10}[i]
        score.add(prob[i:j], y[i:j], known[i:j])
    whole = float(make_loss((0.2, 1.0, 3.0), 1.0)(tf.constant(targets(y, known)), tf.constant(prob)))
    assert whole > 0 and score.loss == pytest.approx(whole, rel=1e-5)
