"""The pipeline reads a study's pixels twice: streamed into the network, then a dozen slices again for the
preview (the HU volume is not kept through post-processing). Both reads must give the same HU."""

from pathlib import Path

import numpy as np

from livernode.daemon.pipeline import _Slices
from livernode.imaging.dicomio import order_slices, read_ct_series, read_dataset


def test_slices_read_again_are_the_volumes_slices(chaos_sample):
    """Real scanner data (CHAOS: intercept -1000, files in descending z): slice k read again equals slice k of the
    volume the reader builds, as int16 HU."""
    files = sorted((chaos_sample / "DICOM_anon").glob("*.dcm"))
    headers = [(str(f), read_dataset(f, pixels=False)) for f in files]
    series = str(headers[0][1].SeriesInstanceUID)
    order = order_slices(headers, series)
    kept = [headers[i] for i in order.kept]
    volume = read_ct_series([Path(p) for p, _ in kept])
    slices = _Slices(kept, np.int16)
    assert len(slices) == len(volume.hu) == 78
    for k in (0, 20, 77):
        got = slices[k]
        assert got.dtype == np.int16 and np.array_equal(got, volume.hu[k])
    assert volume.hu.min() < -900  # HU, not raw stored values


def test_split_pipeline_gives_the_results_of_process_all(chaos_sample, liver_model, tmp_path):
    """`livernode batch --ray` runs a study in three steps on different processes (decode_study, segment_decoded,
    write_decoded); on real scanner data they give the SEG pixels, lesions and volumes of process_all, the
    streamed path `livernode infer` and the node use."""
    import json
    import pickle

    import pydicom

    from livernode.daemon.pipeline import ModelFacts, decode_study, process_all, segment_decoded, write_decoded
    from livernode.inference.runner import Segmenter

    files = sorted((chaos_sample / "DICOM_anon").glob("*.dcm"))
    segmenter = Segmenter(liver_model, providers="cpu", threads=1)
    whole = process_all(files, segmenter, tmp_path / "whole")
    decoded = pickle.loads(pickle.dumps(decode_study(files, lambda: segmenter)))  # as Ray hands it over
    assert len(decoded) == len(whole) == 1 and decoded[0].hu.shape == (78, 512, 512)
    labels = segment_decoded(decoded[0], segmenter)
    assert labels.dtype == np.uint8 and labels.any()
    split = write_decoded(decoded[0], labels, ModelFacts.of(segmenter), tmp_path / "split", 1.0)
    a, b = (pydicom.dcmread(r.seg_path) for r in (whole[0], split))
    assert a.NumberOfFrames == b.NumberOfFrames > 0 and a.PixelData == b.PixelData
    sa, sb = (json.loads(r.summary_path.read_text()) for r in (whole[0], split))
    for key in ("liver_volume_ml", "tumour_volume_ml", "lesion_count", "volume", "series", "model", "providers"):
        assert sa[key] == sb[key], key
    assert split.preview_path.stat().st_size > 0 and split.sr_path.stat().st_size > 0
    assert sb["timings_s"]["infer"] == 1.0 and sb["timings_s"]["load"] > 0
    # the streamed path says how much of its infer stage the network itself took; the split one cannot know
    assert 0 < sa["network_s"] <= sa["timings_s"]["infer"] and "network_s" not in sb
    assert segmenter.network_s >= sa["network_s"]


def _same_but_generated(a, b, sources, where="") -> None:
    """`a` and `b` equal element by element, at every depth, but for the UIDs made for each result (and the
    moments it was made): a UID that names a source image, series, study or frame of reference, or a standard
    class or code, must be the same."""
    named = {str(v) for ds in sources for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                                                "FrameOfReferenceUID") if (v := ds.get(k))}
    assert [e.tag for e in a] == [e.tag for e in b], where
    for x, y in zip(a, b):
        at = f"{where}/{x.keyword or x.tag}"
        if x.VR == "SQ":
            assert len(x.value) == len(y.value), at
            for i, (p, q) in enumerate(zip(x.value, y.value)):
                _same_but_generated(p, q, sources, f"{at}[{i}]")
        elif x.VR == "UI" and not (str(x.value) in named or str(x.value).startswith("1.2.840.10008")):
            continue
        elif x.VR in ("DA", "TM", "DT") and x.keyword.startswith(("Content", "Series", "InstanceCreation", "Contribution")):
            continue
        else:
            assert x.value == y.value, at


def test_a_study_chosen_from_the_index_gives_the_results_of_one_read_from_its_files(chaos_sample, liver_model,
                                                                                     tmp_path):
    """The node chooses the series from the header facts its index keeps (no file read again); the SEG and SR
    then describe the study from the full headers its decoding read: element by element what reading every
    file gives, on real scanner data."""
    import pydicom

    from livernode.daemon.pipeline import process_all
    from livernode.imaging.headers import header_facts
    from livernode.inference.runner import Segmenter

    files = sorted((chaos_sample / "DICOM_anon").glob("*.dcm"))
    segmenter = Segmenter(liver_model, providers="cpu", threads=1)
    read = process_all(files, segmenter, tmp_path / "read")[0]
    facts = {str(f): header_facts(read_dataset(f, pixels=False)) for f in files}
    assert all(facts.values())
    opened = []
    real = read_dataset

    def counting(path, **kw):
        opened.append(kw.get("pixels", True))
        return real(path, **kw)
    import livernode.daemon.pipeline as pipeline
    pipeline.read_dataset = counting
    try:
        indexed = process_all(files, segmenter, tmp_path / "indexed", known=facts)[0]
    finally:
        pipeline.read_dataset = real
    assert opened.count(False) == 0 and opened.count(True) == 78 + 12  # decoding and the preview's slices
    sources = [read_dataset(f, pixels=False) for f in files]
    for x, y in ((read.seg_path, indexed.seg_path), (read.sr_path, indexed.sr_path)):
        a, b = pydicom.dcmread(x), pydicom.dcmread(y)
        assert a.StudyInstanceUID == b.StudyInstanceUID == sources[0].StudyInstanceUID and len(a) > 30
        _same_but_generated(a, b, sources)
    assert indexed.findings.lesions == read.findings.lesions


def test_a_ray_node_actor_keeps_no_copy_of_the_model_on_disk(exported, tmp_path, monkeypatch):
    """Ray ends actors without running their clean-up (ray.kill, a lost worker): an actor that kept its copy of the
    model in /tmp left 94 MB behind at every start (172 such folders, 16 GB, had piled up on this machine)."""
    import tempfile

    from livernode.daemon.ray_backend import NodeActor

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    actor = NodeActor("model.onnx", exported.read_bytes(), "cpu")
    assert actor.segmenter.path.name == "model.onnx" and actor.segmenter.session is not None
    assert list(tmp_path.iterdir()) == []


def test_integer_hu_equal_the_float_path(chaos_sample, synth_dirs):
    """Slices decoded for the network as int16 HU in integers equal pydicom's pixels through the float32 path,
    clipped and cast, on CHAOS and phantom files: from the stored words (which these uncompressed files take), with
    a padding value that occurs, with fewer bits stored than allocated and the unused bits set (unsigned and
    signed), with an intercept beyond int16 whose sums are not, and by pydicom's own decoding for a slope and a
    fractional intercept."""
    from livernode.imaging.dicomio import _native_words, hu_int16_of, hu_of

    files = sorted((chaos_sample / "DICOM_anon").glob("*.dcm"))[:3]
    files += sorted((synth_dirs["dicom"] / "case_000" / "ct").glob("*.dcm"))[:3]
    garbage = {"BitsStored": 12, "PixelData": "high bits set"}
    padded = {"PixelPaddingValue": "the brightest pixel's value"}
    for f in files:
        for change in ({}, padded, {"RescaleSlope": "2"}, {"RescaleIntercept": "-1000.5"},
                       {"RescaleIntercept": "31500"}, garbage, {**garbage, "PixelRepresentation": 1},
                       {**garbage, "PixelRepresentation": 1, **padded},
                       {"PixelRepresentation": 1, "BitsStored": 16, "PixelData": "less 30000",
                        "RescaleIntercept": "40000"}):
            ds = read_dataset(f)
            assert _native_words(ds) is not None, f.name  # the fast path is what is tested
            for k, v in change.items():
                if v == "high bits set":  # stored values in the low 12 bits, the 4 unused bits set to 1010
                    v = ((np.frombuffer(ds.PixelData, "<u2") & 0x0FFF) | 0xA000).astype("<u2").tobytes()
                elif v == "less 30000":  # signed values far below zero: with 40000 added, well inside int16
                    v = (np.frombuffer(ds.PixelData, "<u2").astype(np.int32) - 30000).astype("<i2").tobytes()
                elif v == "the brightest pixel's value":  # not air already, so the padding shows
                    unpadded = hu_int16_of(ds, str(f))
                    at = int(unpadded.argmax())
                    v = int(ds.pixel_array.flat[at])
                setattr(ds, k, v)
            want = np.clip(hu_of(ds, str(f)), -32768, 32767).astype(np.int16)
            got = hu_int16_of(ds, str(f))
            assert got.dtype == np.int16 and np.array_equal(got, want), (f.name, change)
            assert (got != got.flat[0]).any()
            if "PixelPaddingValue" in change:  # the padding value occurs and becomes air
                assert got.flat[at] == -1000 and (got == -1000).sum() > (unpadded == -1000).sum()
