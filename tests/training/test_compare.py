"""`livernode compare`: two architectures trained for two steps on the same six phantoms, split and cache,
exported and scored on the split's test cases only (about 80 s on 2 CPU cores); the plan, the argument checks and
a failing configuration without training anything."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from livernode.cli import main
from livernode.errors import EvaluationError, TrainingError, TrainingInterrupted
from livernode.imaging.synth import synthesize
from livernode.training import compare as C
from livernode.training.compare import Configuration, configurations

ARCHS = ("unet", "resnet34-unet")
NAMES = ("unet-k0", "resnet34-unet-k0")
# 6 cases: 3 train, 1 validation, 2 test (two test cases show that evaluation keeps exactly the split's ones)
TRAINING_TOML = "[preprocess]\nsize = 64\n\n[train]\nepochs = 1\nsteps_per_epoch = 2\n\n[split]\ntest = 0.34\n"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """(data, out, completed process) of one real `livernode compare` run."""
    root = tmp_path_factory.mktemp("compare")
    synthesize(root / "data", cases=6, slices=12, size=64, seed=5, layout="dicom")
    (root / "training.toml").write_text(TRAINING_TOML)
    out = root / "out"
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "compare", "--data", str(root / "data"), "--format",
                        "dicom", "--out", str(out), "--archs", ",".join(ARCHS), "--context", "0", "--config",
                        str(root / "training.toml")], capture_output=True, text=True, timeout=900, check=False,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "data", out, r


def _csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_each_configuration_is_trained_exported_and_scored(compared):
    _, out, r = compared
    rows = _csv(out / "comparison.csv")
    assert [(row["configuration"], row["output"]) for row in rows] == [
        (name, output) for name in NAMES for output in ("delivered", "network")]
    for row in rows:
        assert row["status"] == "ok" and row["reason"] == "" and row["context"] == "0"
        assert row["test_cases"] == "2" and row["epochs"] == "1"
        assert float(row["train_seconds"]) > 0 and float(row["infer_seconds_per_study"]) > 0
        for key in ("liver_dice_global", "liver_dice_mean", "tumour_dice_global", "tumour_dice_mean"):
            assert row[key] != "" and 0.0 <= float(row[key]) <= 1.0, (key, row[key])
    params = {row["configuration"]: int(row["parameters"]) for row in rows}
    assert all(p > 0 for p in params.values()) and params["unet-k0"] != params["resnet34-unet-k0"]
    assert params["unet-k0"] == C.onnx_parameters(out / "unet-k0" / "model.onnx")
    for name in NAMES:
        for f in ("run/run.json", "run/best.h5", "model.onnx", "evaluation/metrics.json"):
            assert (out / name / f).stat().st_size > 0, f
    # progress: a line as each configuration starts and ends; the table at the end
    assert "[1/2] unet-k0: training, export and evaluation" in r.stderr
    assert "[2/2] resnet34-unet-k0: done in" in r.stderr
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["configuration", "output", "parameters"])
    assert [line.split()[:2] for line in lines[head + 1:head + 5]] == [
        [name, output] for name in NAMES for output in ("delivered", "network")]
    assert "2 of 2 configurations scored on 2 test cases" in r.stdout


@pytest.mark.slow
def test_every_configuration_is_scored_on_the_same_test_cases_only(compared):
    _, out, _ = compared
    result = json.loads((out / "comparison.json").read_text())
    assert result["command"]["archs"] == list(ARCHS) and result["command"]["contexts"] == [0]
    assert result["same_split"] and result["wall_seconds"] > 0
    test = result["test_cases"]
    assert len(test) == 2
    for entry in result["configurations"]:
        run = json.loads((out / entry["name"] / "run" / "run.json").read_text())
        assert entry["test_cases"] == run["data"]["cases"]["test"] == test
        assert not set(test) & set(run["data"]["cases"]["train"] + run["data"]["cases"]["validation"])
        assert {c["case"] for c in entry["cases"]} == set(test)  # the per-case rows
        assert all(0 <= c["dice"] <= 1 and c["infer_seconds"] > 0 for c in entry["cases"])
        evaluation = json.loads((out / entry["name"] / "evaluation" / "metrics.json").read_text())
        assert {c["case"] for c in evaluation["cases"]} == set(test)
        assert evaluation["timing"]["cases"] == 2
        assert entry["infer_seconds_per_study"] == pytest.approx(evaluation["timing"]["infer_seconds_total"] / 2)
        assert set(entry["summary"]) == {"delivered", "network"}
        assert set(entry["summary"]["delivered"]) == {"liver", "tumour"}


@pytest.mark.slow
def test_the_figure_is_a_real_png(compared):
    import matplotlib.image

    _, out, _ = compared
    path = out / "comparison.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 500 and image.shape[1] > 800
    colours = np.unique(image[..., :3].reshape(-1, 3).round(2), axis=0)
    assert len(colours) > 20  # bars, text and axes, not a blank canvas


@pytest.mark.slow
def test_evaluate_scores_only_the_cases_asked_for(compared, tmp_path):
    from livernode.training.evaluate import evaluate

    data, out, _ = compared
    model = out / "unet-k0" / "model.onnx"
    report = evaluate(model, data, "dicom", tmp_path / "one", cases=["case_004"])
    assert {c["case"] for c in report["cases"]} == {"case_004"}
    assert report["timing"]["cases"] == 1 and report["timing"]["infer_seconds_total"] > 0
    assert report["summary"]["liver"]["cases"] == 1
    assert len(_csv(tmp_path / "one" / "metrics.csv")) == 4  # liver and tumour, delivered and network
    with pytest.raises(EvaluationError, match="no case case_404, nope among the 6 cases"):
        evaluate(model, data, "dicom", tmp_path / "bad", cases=["case_001", "nope", "case_404"])


@pytest.mark.slow
def test_the_readme_table_is_written_between_its_markers(compared, tmp_path, capsys):
    from bench.render_compare import BEGIN, END
    from bench.render_compare import main as render

    _, out, _ = compared
    readme = tmp_path / "README.md"
    readme.write_text(f"# head\n\n{BEGIN}\nold figures\n{END}\n\ntail\n")
    assert render([str(out / "comparison.json"), str(readme)]) == 0
    text = readme.read_text()
    assert "old figures" not in text and text.startswith("# head") and text.endswith("tail\n")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| configuration | parameters | training | inference s/study | liver Dice")
    assert rows[1].startswith("| --- |")
    assert [line.split(" | ")[0] for line in rows[2:]] == [f"| {n}" for n in NAMES]
    (tmp_path / "plain.md").write_text("# no markers\n")
    assert render([str(out / "comparison.json"), str(tmp_path / "plain.md")]) == 1
    assert "markers are missing" in capsys.readouterr().err


def test_the_plan_crosses_2d_architectures_with_contexts_and_runs_vnet_once():
    assert configurations(["unet", "vnet", "resnet34-unet"], [0, 1]) == [
        Configuration("unet-k0", "unet", 0), Configuration("unet-k1", "unet", 1), Configuration("vnet", "vnet", 0),
        Configuration("resnet34-unet-k0", "resnet34-unet", 0), Configuration("resnet34-unet-k1", "resnet34-unet", 1)]
    assert configurations(["vnet", "unet", "vnet"], [2, 2]) == [Configuration("vnet", "vnet", 0),
                                                                Configuration("unet-k2", "unet", 2)]
    assert C.parse_archs(" unet, resnet34-unet ") == ["unet", "resnet34-unet"]
    assert C.parse_contexts("0,3") == [0, 3]


@pytest.mark.parametrize("flag, value, needles", [
    ("--archs", "unet,vnett", ("--archs: unknown architecture 'vnett'", "known: resnet34-unet, unet, vnet")),
    ("--archs", ",", ("--archs ','", "name at least one")),
    ("--context", "0,4", ("--context: '4' is not a slice context", "integers 0 to 3")),
    ("--context", "-1", ("--context: '-1' is not a slice context",)),
])
def test_bad_arguments_stop_before_anything_runs(tmp_path, capsys, flag, value, needles):
    out = tmp_path / "out"
    assert main(["compare", "--data", str(tmp_path), "--format", "dicom", "--out", str(out), flag, value]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and err[0].startswith("livernode compare: error: "), err
    for n in needles:
        assert n in err[0], err[0]
    assert not out.exists()


def test_a_failing_configuration_is_a_row_and_the_next_one_runs(tmp_path, monkeypatch, capsys):
    import livernode.training.train as train_module

    tried = []

    def failing_train(data, fmt, out, cfg, **kw):
        tried.append((cfg.model.arch, kw["cache"]))
        if cfg.model.arch == "unet":
            raise TrainingError(f"{out}: no checkpoint was saved (validation score never improved)")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train_module, "train", failing_train)
    monkeypatch.setattr(C, "_prepare_cache", lambda *args: 0.0)  # no data: these configurations never get to it
    out = tmp_path / "out"
    argv = ["compare", "--data", str(tmp_path), "--format", "dicom", "--out", str(out), "--archs", "unet,resnet34-unet",
            "--cache", str(tmp_path / "cache")]
    assert main(argv) == 1
    assert tried == [("unet", tmp_path / "cache"), ("resnet34-unet", tmp_path / "cache")]
    captured = capsys.readouterr()
    assert "2 configuration(s) failed: unet-k0, resnet34-unet-k0" in captured.err
    assert "unet-k0 failed: " in captured.out
    rows = _csv(out / "comparison.csv")
    assert [(r["configuration"], r["status"]) for r in rows] == [("unet-k0", "failed"), ("resnet34-unet-k0", "failed")]
    assert "no checkpoint was saved" in rows[0]["reason"] and rows[1]["reason"] == "RuntimeError: out of memory"
    assert json.loads((out / "comparison.json").read_text())["test_cases"] is None
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_training_stops_the_comparison_with_what_it_has(tmp_path, monkeypatch):
    import livernode.training.train as train_module

    def interrupted(data, fmt, out, cfg, **kw):
        raise TrainingInterrupted(f"interrupted at step 1 of 2; saved to {out / 'last'}: continue with --resume")

    monkeypatch.setattr(train_module, "train", interrupted)
    monkeypatch.setattr(C, "_prepare_cache", lambda *args: 0.0)
    with pytest.raises(KeyboardInterrupt):
        C.compare(tmp_path, "dicom", tmp_path / "out", None, ["unet", "resnet34-unet"], [0], progress=False)
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [e["name"] for e in result["configurations"]] == ["unet-k0"]
    assert result["configurations"][0]["reason"].startswith("interrupted at step 1")
