"""The fused model (`livernode fuse`): preprocessing and restoring inside the ONNX graph give the labels of the host
path (OpenCV windowing, padding, resizing and argmax) on at least 99.99 % of voxels, on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from livernode.errors import ManifestError
from livernode.export.fused import PARITY, fusable, fuse, resize_matrices
from livernode.export.onnx_export import weights_sha256
from livernode.imaging.dicomio import read_ct_series
from livernode.imaging.orient import Orientation
from livernode.imaging.preprocess import PreprocessSpec, prepare_slices, restore_probabilities, window
from livernode.inference.manifest import METADATA_KEY, Inference, parse_manifest
from livernode.inference.runner import Segmenter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fused(liver_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "fused.onnx"
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "fuse", str(liver_model), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "labels equal to the host path on" in r.stdout
    return out


def _manifest(path):
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY])


@pytest.mark.parametrize("shape,size", [((512, 512), 64), ((490, 467), 64), ((40, 52), 64), ((64, 64), 64)])
def test_the_matrices_are_opencvs_padding_and_resizes(shape, size):
    """rows_in @ window(hu) @ cols_in is prepare_slices' input; rows_out @ p @ cols_out is restore_probabilities."""
    rng = np.random.default_rng(1)
    hu = rng.normal(100, 200, (2, *shape)).astype(np.float32)
    rows_in, cols_in, rows_out, cols_out = resize_matrices(shape, size)
    want = prepare_slices(hu, PreprocessSpec(size=size))[..., 0]
    np.testing.assert_allclose(rows_in @ window(hu, -100, 400) @ cols_in, want, atol=1e-5)
    p = rng.random((2, size, size, 3)).astype(np.float32)
    got = np.einsum("rs,nsck,cw->nrwk", rows_out, p, cols_out, optimize=True)  # two matmuls, not one 6e9-step loop
    np.testing.assert_allclose(got, restore_probabilities(p, shape), atol=1e-5)


def test_fused_labels_equal_the_host_paths_on_the_real_chaos_case(fused, liver_model, chaos_sample):
    files = sorted((chaos_sample / "DICOM_anon").rglob("*.dcm"))
    hu = read_ct_series(files).hu[20:44]
    plain, fast = Segmenter(liver_model, providers="cpu"), Segmenter(fused, providers="cpu")
    assert fast.fused and not plain.fused
    for turn in (Orientation(), Orientation(flip_rows=True, transpose=True)):
        for part in (hu, hu[:, 7:500, 30:491]):  # 512 x 512 and a non-square crop
            want, got = plain.segment(part, turn), fast.segment(part, turn)
            assert got.dtype == np.uint8 and got.shape == part.shape
            assert (want > 0).sum() > 1000  # the model sees something: the comparison is not of empty volumes
            assert (got == want).mean() >= PARITY, (got == want).mean()


def test_streamed_inference_with_the_fused_model(fused, liver_model, chaos_sample):
    files = sorted((chaos_sample / "DICOM_anon").rglob("*.dcm"))
    hu = np.clip(np.rint(read_ct_series(files).hu[10:40]), -32768, 32767).astype(np.int16)
    turn = Orientation(flip_cols=True)
    runs = [Segmenter(m, providers="cpu").segment_streamed(len(hu), hu.shape[1:], hu.__getitem__, np.int16,
                                                           orientation=turn) for m in (liver_model, fused)]
    (hu_plain, want), (hu_fused, got) = runs
    assert np.array_equal(hu_plain, hu_fused) and np.array_equal(hu_fused, hu)
    assert (want > 0).sum() > 1000 and (got == want).mean() >= PARITY


def test_the_graph_and_manifest_record_the_fusion(fused, liver_model):
    plain, model = _manifest(liver_model), _manifest(fused)
    assert plain["fused"] is None and model["fused"] == {"input": "hu", "dtype": "int16", "output": "labels"}
    assert model["weights_sha256"] == plain["weights_sha256"] == weights_sha256(onnx.load(str(fused)))
    graph = onnx.load(str(fused)).graph
    ins = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert ins == {"hu": onnx.TensorProto.INT16, "rows_in": onnx.TensorProto.FLOAT, "cols_in": onnx.TensorProto.FLOAT,
                   "rows_out": onnx.TensorProto.FLOAT, "cols_out": onnx.TensorProto.FLOAT}
    assert [o.type.tensor_type.elem_type for o in graph.output] == [onnx.TensorProto.UINT8]
    with pytest.raises(ManifestError, match="a fused model takes HU slices"):
        Segmenter(fused, providers="cpu").run(np.zeros((1, 64, 64, 1), np.float32))


def test_models_the_graph_cannot_hold_are_refused(liver_model, fused):
    manifest = parse_manifest(json.dumps(_manifest(liver_model)), str(liver_model))
    assert fusable(manifest) == ""
    assert "context" in fusable(manifest.model_copy(update={"inference": Inference(dims=2, context=1)}))
    assert "3-D" in fusable(manifest.model_copy(update={"inference": Inference(
        dims=3, patch_size=(16, 32, 32), target_spacing_mm=(4.0, 6.0, 6.0), overlap=0.5)}))
    again = parse_manifest(json.dumps(_manifest(fused)), str(fused))
    with pytest.raises(ManifestError, match="cannot be fused: the model is fused already"):
        fuse(onnx.load(str(fused)), again)


def test_the_command_names_the_file_it_cannot_fuse(fused, tmp_path):
    out = tmp_path / "twice.onnx"
    r = subprocess.run([sys.executable, "-m", "livernode.cli", "fuse", str(fused), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"livernode fuse: error: {fused}: cannot be fused: the model is fused already" in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_infer_with_the_fused_model_gives_the_same_findings(fused, liver_model, tmp_path):
    from livernode.imaging.synth import synthesize

    case = synthesize(tmp_path / "data", cases=1, slices=24, size=96, seed=5, layout="dicom")[0]
    found = []
    for model in (liver_model, fused):
        out = tmp_path / model.stem
        r = subprocess.run([sys.executable, "-m", "livernode.cli", "infer", str(case), "--model", str(model), "--out",
                            str(out), "--providers", "cpu"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (out / "seg.dcm").stat().st_size > 0 and (out / "sr.dcm").stat().st_size > 0
        found.append(json.loads((out / "summary.json").read_text()))
    plain, fast = found
    assert plain["liver_volume_ml"] > 0 and plain["providers"] == fast["providers"] == ["CPUExecutionProvider"]
    assert fast["liver_volume_ml"] == pytest.approx(plain["liver_volume_ml"], rel=1e-3)


def test_bound_batches_give_session_runs_labels(fused, liver_model, chaos_sample):
    """Bound batches (inference/bound.py, what the node uses on a GPU), here bound to CPU buffers that ONNX Runtime
    reads and writes in place: the same labels as session.run for both models, with a last batch shorter than the
    buffer (padded, its padding dropped) and two slice shapes, each with its own binding."""
    files = sorted((chaos_sample / "DICOM_anon").rglob("*.dcm"))
    hu = np.clip(np.rint(read_ct_series(files).hu[20:31]), -32768, 32767).astype(np.int16)  # 11: 4 + 4 + 3
    for model in (liver_model, fused):
        plain = Segmenter(model, providers="cpu", batch_size=4)
        bound = Segmenter(model, providers="cpu", batch_size=4, bound=True)
        assert bound.bound and not plain.bound and bound.engine == plain.engine == "plain"
        for part in (hu, hu[:, 7:500, 30:491]):
            want, got = plain.segment(part), bound.segment(part)
            assert (want > 0).sum() > 1000
            assert got.dtype == np.uint8 and np.array_equal(got, want)
        assert len(bound._bound) == (2 if bound.fused else 1)  # the plain model's input is 64 px for both shapes
        runner = next(iter(bound._bound.values()))
        assert runner.host_in.shape[0] == 4 and not runner.pinned  # nothing to page-lock without CUDA
        with pytest.raises(ValueError, match="does not fit"):
            runner(np.zeros((5, *runner.host_in.shape[1:]), runner.host_in.dtype))
    streamed = Segmenter(fused, providers="cpu", batch_size=4, bound=True).segment_streamed(
        len(hu), hu.shape[1:], hu.__getitem__, np.int16)[1]
    assert np.array_equal(streamed, Segmenter(fused, providers="cpu").segment(hu))


def test_bindings_are_bounded_for_a_node_that_meets_many_slice_sizes(fused, chaos_sample, monkeypatch):
    """A fused model binds one buffer set per slice size. CUDA graph ids go to the first GRAPHS sizes only (ONNX
    Runtime keeps a graph and its buffers for the session's life), later sizes run bound without a graph (id -1),
    and at most BINDINGS of those are kept. The bookkeeping is checked here on a CPU session told it has graphs
    (the CPU provider ignores the graph id); the labels stay those of session.run throughout."""
    from livernode.inference import runner

    monkeypatch.setattr(runner, "GRAPHS", 2)
    monkeypatch.setattr(runner, "BINDINGS", 2)
    files = sorted((chaos_sample / "DICOM_anon").rglob("*.dcm"))
    hu = np.clip(np.rint(read_ct_series(files).hu[25:28]), -32768, 32767).astype(np.int16)
    plain = Segmenter(fused, providers="cpu")
    bound = Segmenter(fused, providers="cpu", batch_size=2, bound=True)
    bound.engine = "cuda graph"
    ids = []
    for side in (200, 210, 220, 230, 240, 250):
        part = hu[:, 100:100 + side, 120:120 + side]
        assert np.array_equal(bound.segment(part), plain.segment(part))
        ids.append(bound._bound[(part.shape[1:], part.dtype.str)].graph_id)
    assert ids == [0, 1, -1, -1, -1, -1]
    assert sorted(b.graph_id for b in bound._bound.values()) == [-1, -1, 0, 1]  # graphs kept, two spares
    assert {k[0] for k in bound._bound} == {(200, 200), (210, 210), (240, 240), (250, 250)}  # 220, 230 let go


def test_the_sessions_tried_on_a_gpu_best_first(monkeypatch, tmp_path):
    """TensorRT where this ONNX Runtime has it, its library loads and the caller gives it a folder for its engines;
    then CUDA graphs; then CUDA as it comes. On the CPU only the CPU."""
    from livernode.inference import runner
    from livernode.inference.runner import _attempts

    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = ["TensorrtExecutionProvider", *cuda]
    assert _attempts(["CPUExecutionProvider"], ["CPUExecutionProvider"], True, tmp_path) == [
        ("plain", ["CPUExecutionProvider"])]
    monkeypatch.setattr(runner, "_tensorrt_loadable", lambda: True)
    tried = _attempts(cuda, trt, True, tmp_path)
    assert [name for name, _ in tried] == ["tensorrt", "cuda graph", "plain"]
    assert tried[0][1][0] == ("TensorrtExecutionProvider", {"trt_engine_cache_enable": True,
                                                            "trt_engine_cache_path": str(tmp_path)})
    assert tried[1][1] == [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    assert [name for name, _ in _attempts(cuda, trt, True)] == ["cuda graph", "plain"]  # no folder, no TensorRT
    assert [name for name, _ in _attempts(cuda, cuda, False, tmp_path)] == ["plain"]
    monkeypatch.setattr(runner, "_tensorrt_loadable", lambda: False)  # listed by ONNX Runtime, not installed
    assert [name for name, _ in _attempts(cuda, trt, True, tmp_path)] == ["cuda graph", "plain"]


class _FakeGpuSession:
    """An ONNX Runtime session on the CPU that reports the providers it was asked for, as a GPU build would, except
    that TensorRT fails to load and the CUDA graph session comes back on the CPU alone (ONNX Runtime's fallback)."""

    made: list = []

    def __init__(self, path, opts, providers):
        first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        _FakeGpuSession.made.append(first if first != "CUDAExecutionProvider" or isinstance(providers[0], str)
                                    else "CUDA graph")
        if first == "TensorrtExecutionProvider":
            raise RuntimeError("libnvinfer.so.10: cannot open shared object file")
        self._real = self.real(path, opts, providers=["CPUExecutionProvider"])
        self._providers = ["CPUExecutionProvider"] if self.made[-1] == "CUDA graph" and self.refuse_graph else \
            [p[0] if isinstance(p, tuple) else p for p in providers]

    refuse_graph = False
    real = None  # ONNX Runtime's own session class

    def get_providers(self):
        return self._providers

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("refuse_graph", [False, True])
def test_the_segmenter_keeps_the_first_session_that_really_runs_where_asked(liver_model, tmp_path, monkeypatch,
                                                                          caplog, refuse_graph):
    """The attempts in order, each one's failure said in one log line, and the first kept whose first provider is
    really in use; a caller that asks for unbound runs never gets a graph session; TensorRT's folder is made
    private only when TensorRT is tried."""
    import logging

    import onnxruntime

    from livernode.inference import runner

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(_FakeGpuSession, "real", onnxruntime.InferenceSession)
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeGpuSession)
    monkeypatch.setattr(runner, "_tensorrt_loadable", lambda: True)
    monkeypatch.setattr(_FakeGpuSession, "refuse_graph", refuse_graph)
    monkeypatch.setattr(_FakeGpuSession, "made", [])
    engines = tmp_path / "state" / "tensorrt"
    with caplog.at_level(logging.INFO, logger="livernode.inference.runner"):
        seg = Segmenter(liver_model, providers="cuda", tensorrt_cache=engines)
    assert _FakeGpuSession.made == ["TensorrtExecutionProvider", "CUDA graph"] + (
        ["CUDAExecutionProvider"] if refuse_graph else [])
    assert seg.engine == ("plain" if refuse_graph else "cuda graph")
    assert seg.bound and seg.batch_size == 16 and seg.device == "cuda"
    assert "tensorrt: libnvinfer.so.10: cannot open" in caplog.text
    assert ("cuda graph: ONNX Runtime fell back to ['CPUExecutionProvider']" in caplog.text) == refuse_graph
    assert engines.is_dir() and engines.stat().st_mode & 0o777 == 0o700
    monkeypatch.setattr(_FakeGpuSession, "made", [])
    unbound = Segmenter(liver_model, providers="cuda", bound=False)
    assert _FakeGpuSession.made == ["CUDAExecutionProvider"] and unbound.engine == "plain" and not unbound.bound


def test_the_sessions_worker_threads_do_not_spin(fused, liver_model):
    """Every session the segmenter makes, plain or bound, tells ONNX Runtime's workers to sleep between runs
    rather than spin on the cores the node's stages beside the network use."""
    key = "session.intra_op.allow_spinning"
    for seg in (Segmenter(liver_model, providers="cpu"), Segmenter(fused, providers="cpu", bound=True)):
        assert seg.session.get_session_options().get_session_config_entry(key) == "0"
        assert seg._plain[0].get_session_config_entry(key) == "0"  # what a session without graphs is made of


def test_a_new_binding_runs_plain_before_its_graph_is_captured(liver_model, monkeypatch):
    """ONNX Runtime captures a graph on the first run with its id once the session has run at all, so each new
    binding's first WARM_RUNS runs carry graph id -1 (no capture) and only then its own id."""
    import onnxruntime as ort

    from livernode.inference.bound import WARM_RUNS, Bound, Shape

    session = ort.InferenceSession(str(liver_model), providers=["CPUExecutionProvider"])
    seen = []
    real = ort.InferenceSession.run_with_iobinding

    def record(self, io, options=None):
        seen.append(options.get_run_config_entry("gpu_graph_id"))
        return real(self, io, options)

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", record)
    size = session.get_inputs()[0].shape[1] if isinstance(session.get_inputs()[0].shape[1], int) else 64
    b = Bound(session, session.get_inputs()[0].name, session.get_outputs()[0].name, 2,
              Shape((size, size, 1), np.float32, (size, size, 3), np.float32), "cpu", graph_id=3)
    x = np.random.default_rng(0).random((2, size, size, 1), np.float32)
    outs = [b(x) for _ in range(WARM_RUNS + 2)]
    assert seen == ["-1"] * WARM_RUNS + ["3", "3"]
    assert all(np.array_equal(o, outs[0]) for o in outs) and outs[0].shape == (2, size, size, 3)
    np.testing.assert_allclose(outs[0], session.run(None, {session.get_inputs()[0].name: x})[0], atol=1e-6)


def test_a_cuda_graph_that_fails_to_run_leaves_a_plain_session(fused, chaos_sample, monkeypatch, caplog):
    """ONNX Runtime may refuse to capture or replay a graph only at the first run. The segmenter then makes a plain
    session for good, says why, and the batch that failed is run again on it (here on a CPU session told it has
    graphs, whose bound runs with a graph id fail as such a run would)."""
    import logging

    from livernode.inference import bound as bound_module

    files = sorted((chaos_sample / "DICOM_anon").rglob("*.dcm"))
    hu = np.clip(np.rint(read_ct_series(files).hu[25:30]), -32768, 32767).astype(np.int16)
    want = Segmenter(fused, providers="cpu").segment(hu)
    real = bound_module.Bound.__call__

    def capture_fails(self, part):
        if self.graph_id not in (None, -1):
            raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")
        return real(self, part)

    monkeypatch.setattr(bound_module.Bound, "__call__", capture_fails)
    seg = Segmenter(fused, providers="cpu", batch_size=2, bound=True)
    seg.engine = "cuda graph"
    first = seg.session
    with caplog.at_level(logging.WARNING, logger="livernode.inference.runner"):
        got = seg.segment(hu)
    assert (want > 0).sum() > 1000 and np.array_equal(got, want)
    assert seg.engine == "plain" and seg.session is not first
    assert all(b.graph_id is None for b in seg._bound.values()) and len(seg._bound) == 1
    assert "CUDA graph run failed (CUDA failure 900" in caplog.text
