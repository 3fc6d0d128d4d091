"""Training smoke test, ONNX export with parity, and evaluation, on tiny phantoms (minutes on 2 CPU cores)."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from livernode.daemon.sr import MAX_SR_LESIONS
from livernode.inference.manifest import METADATA_KEY
from livernode.inference.runner import Segmenter

pytestmark = pytest.mark.slow


def test_run_folder_holds_checkpoint_history_plots_and_metrics(trained_run):
    _, run = trained_run
    for name in ("best.h5", "history.csv", "learning_curves.png", "metrics.csv", "metrics.png", "overlay.png",
                 "run.json", "validation_sample.npz"):
        assert (run / name).stat().st_size > 0, name
    with (run / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert {"loss", "iou_score", "f1_score", "val_loss", "val_dice_liver"} <= set(rows[0])
    with (run / "metrics.csv").open() as fh:
        metrics = list(csv.DictReader(fh))
    assert {r["split"] for r in metrics} == {"train", "validation", "test"}
    for r in metrics:
        tp, fp, tn, fn = (int(r[k]) for k in ("tp", "fp", "tn", "fn"))
        assert tp + fp + tn + fn > 0
        assert float(r["dice"]) == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    summary = json.loads((run / "run.json").read_text())
    cases = summary["data"]["cases"]
    assert not set(cases["train"]) & set(cases["test"])  # split by patient


def test_resume_continues_from_checkpoint(trained_run, tmp_path):
    root, shared = trained_run
    run = tmp_path / "run"  # the session's run stays as trained: other tests read it
    shutil.copytree(shared, run)
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "train", "--data", str(root / "data"), "--format",
                        "dicom", "--out", str(run), "--size", "64", "--epochs", "4", "--steps-per-epoch", "2",
                        "--resume"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming {run} at step 6 (epoch 4, batch 0 of 2)" in r.stderr
    with (run / "history.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4


def test_export_has_manifest_named_dims_and_parity(exported, trained_run):
    _, run = trained_run
    model = onnx.load(str(exported))
    assert model.opset_import[0].version == 17
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "height", "width", 1]
    assert all(n.op_type != "Resize" or all(a.s != b"tf_half_pixel_for_nn" for a in n.attribute)
               for n in model.graph.node)
    meta = {p.key: p.value for p in model.metadata_props}
    manifest = json.loads(meta[METADATA_KEY])
    assert manifest["schema_version"] == 2
    assert manifest["inference"] == {"dims": 2, "context": 0, "patch_size": None, "target_spacing_mm": None,
                                     "overlap": None}
    assert manifest["input"]["preferred_size"] == 64 and manifest["input"]["size_multiple"] == 32
    assert manifest["preprocessing"]["window"] == {"low": -100.0, "high": 400.0}
    assert manifest["preprocessing"]["orientation"].startswith("axial slices with columns running to patient left")
    assert [lab["name"] for lab in manifest["labels"]] == ["Background", "Liver", "Liver tumour"]
    assert manifest["labels"][2]["property_type"]["value"] == "108369006"
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["parity"]["argmax_agreement"] >= 0.9999
    from livernode.export.onnx_export import weights_sha256

    assert manifest["weights_sha256"] == weights_sha256(model)
    parity = json.loads((run / "parity.json").read_text())
    assert parity["slices"] > 0


def test_onnx_runtime_loads_without_warnings_and_matches_keras(exported, trained_run, capfd):
    _, run = trained_run
    opts = ort.SessionOptions()
    opts.log_severity_level = 1  # warnings and above
    sess = ort.InferenceSession(str(exported), opts, providers=["CPUExecutionProvider"])
    x = np.load(run / "validation_sample.npz")["x"][:4]
    out = sess.run(None, {"image": x})[0]
    assert out.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    err = capfd.readouterr().err
    assert "deprecated" not in err.lower(), err
    # odd sizes work after padding to a multiple of 32 is done by the runner
    seg = Segmenter(exported, providers="cpu")
    assert seg.providers_used == ["CPUExecutionProvider"]
    assert seg.segment(np.zeros((2, 50, 70), np.float32)).shape == (2, 50, 70)


def test_evaluate_writes_tables(exported, trained_run, tmp_path):
    root, _ = trained_run
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "evaluate", "--model", str(exported), "--data",
                        str(root / "data"), "--format", "dicom", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global Dice" in r.stdout
    assert "delivered (post-processed, what PACS receives):" in r.stdout and "network (raw labels" in r.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["providers"] == ["CPUExecutionProvider"]
    assert {c["structure"] for c in report["cases"]} == {"liver", "tumour"}
    assert {c["output"] for c in report["cases"]} == {"delivered", "network"}
    assert set(report["summary"]) == set(report["network_summary"]) == {"liver", "tumour"}
    with (out / "metrics.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 16  # 4 cases x (liver, tumour) x (delivered, network)


def test_one_channel_model_accepts_local_imagenet_style_weights(tmp_path):
    """A local .h5 with backbone weights loads into a 1-channel model via the grey-to-RGB layer."""
    from livernode.training.model import build_model, import_tf

    sm, tf = import_tf()
    get_backbone = sm.inject_global_submodules(sm.Backbones.get_backbone)  # as sm.Unet calls it
    backbone = get_backbone("resnet34", input_shape=(None, None, 3), weights=None, include_top=False)
    weights = tmp_path / "resnet34_imagenet.h5"
    backbone.save_weights(str(weights))
    model = build_model("resnet34", channels=1, encoder_weights=str(weights))
    assert model.input_shape == (None, None, None, 1)
    conv0 = [w for w in model.weights if "conv0" in w.name and "kernel" in w.name][0]
    ref = [w for w in backbone.weights if "conv0" in w.name and "kernel" in w.name][0]
    np.testing.assert_array_equal(conv0.numpy(), ref.numpy())


def test_infer_writes_a_valid_seg_that_matches_the_model(exported, trained_run, tmp_path):
    """`livernode infer` on a phantom study: the SEG passes dciodvfy, reads back in highdicom equal to the
    post-processed model output, and summary.json agrees with it."""
    import highdicom as hd
    import pydicom

    from livernode.imaging.postprocess import postprocess
    from livernode.imaging.dicomio import read_ct_series

    root, _ = trained_run
    study = root / "data" / "case_001"
    out = tmp_path / "result"
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "infer", str(study), "--model", str(exported),
                        "--out", str(out), "--providers", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("seg.dcm", "sr.dcm"):
        report = subprocess.run(["/usr/bin/dciodvfy", str(out / name)], capture_output=True, text=True)
        assert not [ln for ln in (report.stdout + report.stderr).splitlines() if ln.startswith("Error")], name
    seg = hd.seg.segread(out / "seg.dcm")
    ct_files = sorted((study / "ct").glob("*.dcm"))
    vol = read_ct_series(ct_files)
    expected = postprocess(Segmenter(exported, providers="cpu").segment(vol.hu), vol.spacing).labels
    back = seg.get_pixels_by_source_instance(list(vol.sop_instance_uids), segment_numbers=[1, 2],
                                             assert_missing_frames_are_empty=True)
    got = np.where(back[..., 1] > 0, 2, np.where(back[..., 0] > 0, 1, 0))
    assert expected.any() and np.array_equal(got, expected)
    ct = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == ct.StudyInstanceUID
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    summary = json.loads((out / "summary.json").read_text())
    voxel_ml = float(np.prod(vol.spacing)) / 1000
    assert summary["liver_volume_ml"] == pytest.approx((expected > 0).sum() * voxel_ml, abs=0.01)
    assert summary["series"]["chosen"] == ct.SeriesInstanceUID
    assert summary["providers"] == ["CPUExecutionProvider"]
    assert (out / "preview.png").stat().st_size > 0
    sr = hd.sr.srread(out / "sr.dcm")
    assert sr.StudyInstanceUID == ct.StudyInstanceUID
    groups = sr.content.get_volumetric_roi_measurement_groups()
    liver = [g for g in groups if str(g.tracking_identifier) == "Liver"][0]
    volume = [m for m in liver.get_measurements() if m.name.value == "118565006"][0]
    assert volume.value == pytest.approx(summary["liver_volume_ml"], abs=0.01)
    assert len(groups) == 2 + min(MAX_SR_LESIONS, summary["lesion_count"])  # the largest lesions one by one
    assert liver.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID


def test_a_model_trained_in_another_orientation_is_refused(exported, tmp_path):
    from livernode.errors import ManifestError
    from livernode.inference.manifest import parse_manifest
    from livernode.inference.runner import Segmenter

    model = onnx.load(str(exported))
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    manifest = parse_manifest(entry.value, "exported")
    entry.value = manifest.model_copy(update={"preprocessing": manifest.preprocessing.model_copy(
        update={"orientation": "as stored"})}).to_json()
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    with pytest.raises(ManifestError, match="trained on slices oriented as 'as stored'"):
        Segmenter(other, providers="cpu")


def _with_manifest(src: Path, out: Path, change, graph=None) -> Path:
    """A copy of the exported model with its manifest changed by `change(manifest) -> manifest` (and its graph by
    `graph(model)`)."""
    from livernode.inference.manifest import parse_manifest

    model = onnx.load(str(src))
    if graph is not None:
        graph(model)
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    entry.value = change(parse_manifest(entry.value, str(src))).to_json()
    onnx.save(model, str(out))
    return out


def _permute_outputs(model) -> None:
    """One extra node: the output's channels reordered (background, tumour, liver)."""
    from onnx import TensorProto, helper

    out = model.graph.output[0]
    old = out.name
    model.graph.initializer.append(helper.make_tensor("channel_order", TensorProto.INT64, [3], [0, 2, 1]))
    for node in model.graph.node:
        node.output[:] = [f"{old}_unpermuted" if o == old else o for o in node.output]
    model.graph.node.append(helper.make_node("Gather", [f"{old}_unpermuted", "channel_order"], [old], axis=3))


def test_the_label_map_comes_from_the_manifest(exported, trained_run, tmp_path):
    """Output channels permuted in the graph, with a manifest that says so: the same SEG. A label the node cannot
    map: refused at start with one line."""
    import highdicom as hd

    def swapped(m):
        labels = [lab.model_copy(update={"value": {1: 2, 2: 1}.get(lab.value, lab.value)}) for lab in m.labels]
        return m.model_copy(update={"labels": tuple(labels)})
    permuted = _with_manifest(exported, tmp_path / "permuted.onnx", swapped, _permute_outputs)
    study = trained_run[0] / "data" / "case_001"
    segs = {}
    for name, model in (("original", exported), ("permuted", permuted)):
        r = subprocess.run([sys.executable, "-m", "livernode.cli", "infer", str(study / "ct"), "--model", str(model),
                            "--out", str(tmp_path / name), "--providers", "cpu"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        seg = hd.seg.segread(tmp_path / name / "seg.dcm")
        uids = [str(u[2]) for u in seg.get_source_image_uids()]
        segs[name] = seg.get_pixels_by_source_instance(sorted(uids), segment_numbers=[1, 2],
                                                       assert_missing_frames_are_empty=True)
    assert segs["original"].any() and np.array_equal(segs["original"], segs["permuted"])

    def spleen(m):
        labels = list(m.labels)
        labels[2] = labels[2].model_copy(update={"name": "Spleen", "property_type": labels[2].property_type.model_copy(
            update={"value": "78961009", "meaning": "Spleen"})})
        return m.model_copy(update={"labels": tuple(labels)})
    foreign = _with_manifest(exported, tmp_path / "spleen.onnx", spleen)
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "serve", "--model", str(foreign), "--port", "0",
                        "--state", str(tmp_path / "state")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert "label 'Spleen' (output channel 2, SCT 78961009 Spleen) is neither liver, liver tumour nor background" \
        in line, r.stderr


VNET_RECIPE = """
[volume]
spacing_mm = [4.0, 6.0, 6.0]
patch = [16, 32, 32]
batch_size = 2
"""


@pytest.mark.parametrize("arch,args", [("unet", []), ("resnet34-unet", ["--context", "1"]), ("vnet", [])],
                         ids=["unet", "resnet34-unet-k1", "vnet"])
def test_every_architecture_trains_exports_and_segments(trained_run, tmp_path, arch, args):
    """--arch unet (the original U-Net), a 2.5-D U-Net and the 3-D V-Net go through the same loop, export with
    parity and the node's pipeline, whose SEG passes the geometry read-back and equals the network's labels."""
    import highdicom as hd

    from livernode.imaging.dicomio import read_ct_series
    from livernode.imaging.postprocess import postprocess

    root, _ = trained_run
    run, model = tmp_path / "run", tmp_path / f"{arch}.onnx"
    config = tmp_path / "recipe.toml"
    config.write_text(VNET_RECIPE)
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "train", "--data", str(root / "data"), "--format",
                        "dicom", "--out", str(run), "--size", "64", "--epochs", "2", "--steps-per-epoch", "2",
                        "--arch", arch, "--config", str(config), *args], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "run.json").read_text())
    assert summary["arch"] == arch and summary["parameters"] > 0
    assert summary["dims"] == (3 if arch == "vnet" else 2) and summary["context"] == (1 if args else 0)
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "export", str(run), "--out", str(model)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads({p.key: p.value for p in onnx.load(str(model)).metadata_props}[METADATA_KEY])
    assert manifest["schema_version"] == 2 and manifest["parity"]["max_abs_diff"] <= 1e-4
    assert manifest["architecture"]["name"] == {"unet": "U-Net", "vnet": "V-Net", "resnet34-unet": "Unet"}[arch]
    if arch == "vnet":
        assert manifest["inference"] == {"dims": 3, "context": 0, "patch_size": [16, 32, 32],
                                         "target_spacing_mm": [4.0, 6.0, 6.0], "overlap": 0.5}
        assert manifest["input"]["layout"] == "NDHWC" and manifest["input"]["channels"] == 1
    else:
        assert manifest["inference"]["dims"] == 2 and manifest["input"]["channels"] == (3 if args else 1)
    study = root / "data" / "case_001"
    out = tmp_path / "result"
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "infer", str(study), "--model",
                        str(model), "--out", str(out), "--providers", "cpu"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]  # the SEG passed the geometry read-back before it was written
    assert (out / "seg.dcm").stat().st_size > 0 and (out / "sr.dcm").stat().st_size > 0
    vol = read_ct_series(sorted((study / "ct").glob("*.dcm")))
    back = hd.seg.segread(out / "seg.dcm").get_pixels_by_source_instance(
        list(vol.sop_instance_uids), segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    got = np.where(back[..., 1] > 0, 2, np.where(back[..., 0] > 0, 1, 0))
    if args:  # 2.5-D: the SEG is what the network gives on each slice stacked with its neighbours by hand
        from livernode.imaging.preprocess import PreprocessSpec, prepare_slices, restore_probabilities

        m = manifest
        spec = PreprocessSpec(m["preprocessing"]["window"]["low"], m["preprocessing"]["window"]["high"], 1,
                              m["input"]["preferred_size"])
        planes = prepare_slices(vol.hu, spec)[..., 0]
        n = len(planes)
        by_hand = np.stack([np.stack([planes[max(i - 1, 0)], planes[i], planes[min(i + 1, n - 1)]], -1)
                            for i in range(n)])
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        prob = restore_probabilities(sess.run(None, {sess.get_inputs()[0].name: by_hand})[0], vol.hu.shape[1:])
        expected = postprocess(prob.argmax(-1).astype(np.uint8), vol.spacing).labels
    else:
        expected = postprocess(Segmenter(model, providers="cpu").segment(vol.hu, spacing=vol.spacing),
                               vol.spacing).labels
    assert got.shape == vol.hu.shape and np.array_equal(got, expected)