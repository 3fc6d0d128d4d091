"""One study, start to finish, without a network: headers -> series selection -> volume -> model -> findings
-> SEG (checked) + summary.json + preview.png. `livernode infer` and the daemon's worker both call `process_study`."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from livernode import __version__
from livernode.config import SelectionConfig
from livernode.daemon.coverage import coverage_pass
from livernode.daemon.report import preview, summary_dict, write_json
from livernode.daemon.select import select_series, short_key
from livernode.daemon.seg import write_result_seg
from livernode.daemon.sr import SrJob, build_sr, write_sr
from livernode.daemon.sr_process import SrProcess
from livernode.errors import InputError, SeriesRejected
from livernode.imaging.dicomio import (SliceOrder, dicom_files, hu_int16_of, hu_of, order_slices,
                                      ordered_volume, read_dataset)
from livernode.imaging.headers import LightHeader, light_header, without_pixels
from livernode.imaging.orient import Orientation
from livernode.imaging.postprocess import Findings, Lesion, postprocess
from livernode.imaging.segwrite import Algorithm
from livernode.imaging.volume import LIVER, TUMOUR, CtVolume
from livernode.inference.manifest import Manifest
from livernode.inference.runner import Segmenter

log = logging.getLogger(__name__)
# Stages of the study as a whole, in every series' timings (`StudyResult.timings`) but spent once.
STUDY_STAGES = ("coverage", "select")
# progress(stage, done, total): called as each file is read, after each inference batch, and with (0, 0) as each
# stage ends. The daemon's worker uses it as its heartbeat and raises from it (StudyInterrupted) to stop between
# batches.
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class StudyResult:
    out_dir: Path
    seg_path: Path
    sr_path: Path
    summary_path: Path
    preview_path: Path
    findings: Findings
    timings: dict[str, float]
    slices: int
    decisions: tuple[dict, ...] = ()  # every series of the study with its reason (as in summary.json)


def process_study(study_dir: Path, segmenter: Segmenter, out_dir: Path,
                  rules: SelectionConfig | None = None) -> StudyResult:
    """Segment the best CT series found under `study_dir` and write the results into `out_dir`."""
    files = dicom_files(study_dir)
    if not files:
        raise SeriesRejected(f"{study_dir}: no DICOM files")
    return process_files(files, segmenter, out_dir, rules=rules)


def process_files(files: list[Path], segmenter: Segmenter, out_dir: Path, *, series_number_offset: int = 0,
                  progress: Progress = _no_progress, rules: SelectionConfig | None = None,
                  sr_process: SrProcess | None = None) -> StudyResult:
    """Segment the best CT series among `files` (one study) and write the results into `out_dir`; see
    `process_all`, of which this is the first result."""
    return process_all(files, segmenter, out_dir, series_number_offset=series_number_offset, progress=progress,
                       rules=rules, sr_process=sr_process)[0]


def process_all(files: list[Path], segmenter: Segmenter, out_dir: Path, *, series_number_offset: int = 0,
                progress: Progress = _no_progress, rules: SelectionConfig | None = None,
                known: Mapping[str, str] | None = None, sr_process: SrProcess | None = None) -> list[StudyResult]:
    """Choose the series to segment among `files` (one study) by `rules`, segment each and write its results:
    into `out_dir` for one series, into `out_dir/series-N` for each of several (`rules.segment_all`).
    `series_number_offset` numbers a reprocess's SEG and SR series after the ones they supersede; `progress` is
    told of every file read, every inference batch and every stage finished. `known` maps a file to its header
    facts from the node's index (imaging/headers.py): those files are not read to choose the series.
    `sr_process`: builds the SRs beside the SEGs (the daemon's; without it, each SR is built after its SEG)."""
    headers, chosen, shared, clock = _choose(files, lambda: segmenter, rules, progress, known)
    results = []
    for i, uid in enumerate(chosen):
        target = out_dir / _subdir(i, len(chosen))
        results.append(_process_series(headers, uid, segmenter, target, clock.fork(),
                                       series_number=_series_number(i, series_number_offset), series=shared,
                                       sr_process=sr_process))
    return results


def _subdir(i: int, count: int) -> str:
    return "" if count == 1 else f"series-{i + 1}"


def _series_number(i: int, series_number_offset: int) -> int:
    return 9001 + 2 * series_number_offset + 10000 * i


def _choose(files: list[Path], segmenter: Callable[[], Segmenter], rules: SelectionConfig | None,
            progress: Progress, known: Mapping[str, str] | None = None
            ) -> tuple[list[tuple[str, Dataset]], list[str], dict, "_Clock"]:
    """Read the headers of `files` (from `known` facts where given) and choose the series to segment: (headers,
    chosen series UIDs, the selection's record for summary.json, the study's clock). `segmenter()` gives the model
    for the coverage pass, asked for only when there is a choice to make."""
    rules = rules or SelectionConfig()
    clock = _Clock(progress)
    known = known or {}
    headers, skipped = [], []
    for i, path in enumerate(files):
        progress("read", i, len(files))
        try:
            light = light_header(known.get(str(path)))
            headers.append((str(path), light if light is not None else read_dataset(path, pixels=False)))
        except InputError as exc:
            log.warning("skipping %s", exc)
            skipped.append(str(exc))
    if not headers:
        raise SeriesRejected(f"no readable DICOM files among {len(files)} ({'; '.join(skipped[:3])})")

    def timed_coverage(candidates):
        t = time.perf_counter()
        try:
            measure = coverage_pass(segmenter(), rules.coverage_step_mm,
                                    lambda done, total: progress("coverage", done, total))
            return measure(candidates)
        finally:
            clock.timings["coverage"] = round(time.perf_counter() - t, 3)
    chosen, decisions = select_series(headers, rules, timed_coverage)
    clock.lap("select")
    clock.timings["select"] = round(clock.timings["select"] - clock.timings.get("coverage", 0.0), 3)
    shared = {"chosen": chosen, "decisions": [asdict(d) for d in decisions], "skipped_files": skipped}
    return headers, chosen, shared, clock


@dataclass(frozen=True)
class ModelFacts:
    """What the results say of the model that made them: its manifest, file name and the providers it ran on."""

    manifest: Manifest
    file: str
    providers: tuple[str, ...]

    @classmethod
    def of(cls, segmenter: Segmenter) -> "ModelFacts":
        return cls(segmenter.manifest, segmenter.path.name, tuple(segmenter.providers_used))

    @property
    def algorithm(self) -> Algorithm:
        """The model as the SEG and SR name it."""
        a = self.manifest.architecture
        return Algorithm(name=f"livernode {a.name}-{a.backbone}",
                         version=f"{self.manifest.livernode_version} ({self.manifest.weights_sha256[:12]})")


@dataclass(frozen=True)
class DecodedSeries:
    """One chosen series, decoded, with everything its results need but the labels: what a decoding worker hands
    to the model's worker and then to the one that writes the results (`livernode batch` on Ray). Picklable."""

    series_uid: str
    source: tuple[Dataset, ...]  # the kept slices' headers, in order (no pixels)
    hu: np.ndarray  # (slices, rows, cols) HU as stored, int16 when exact
    spacing: tuple[float, float, float]  # slice step, row, column mm
    turn: Orientation
    subdir: str  # "" for a study's only series, else series-N
    series_number: int
    series: dict  # the selection's record, as in summary.json
    timings: dict[str, float]


def decode_study(files: list[Path], segmenter: Callable[[], Segmenter], *, series_number_offset: int = 0,
                 rules: SelectionConfig | None = None) -> list[DecodedSeries]:
    """The first half of `process_all`, without the network (but for the coverage pass, which asks
    `segmenter()` when there is a choice): choose the series and decode each into memory."""
    headers, chosen, shared, clock = _choose(files, segmenter, rules, _no_progress)
    out = []
    for i, uid in enumerate(chosen):
        series_clock = clock.fork()
        kept, order, turn = _ordered(headers, uid)
        slices = _Slices(kept, _hu_dtype(kept))
        hu = np.empty((len(kept), int(kept[0][1].Rows), int(kept[0][1].Columns)), slices.dtype)
        for k in range(len(kept)):
            hu[k] = slices[k]
        series_clock.lap("load")
        volume = ordered_volume([ds for _, ds in kept], order, hu, uid)
        out.append(DecodedSeries(uid, tuple(slices.sources()), hu, volume.spacing, turn,
                                 _subdir(i, len(chosen)), _series_number(i, series_number_offset), shared,
                                 series_clock.timings))
    return out


def segment_decoded(decoded: DecodedSeries, segmenter: Segmenter) -> np.ndarray:
    """The second half's first step, where the model is: uint8 labels of a decoded series."""
    hu = decoded.hu
    return segmenter.segment_streamed(len(hu), hu.shape[1:], hu.__getitem__, hu.dtype, orientation=decoded.turn,
                                      spacing=decoded.spacing)[1]


def write_decoded(decoded: DecodedSeries, labels: np.ndarray, model: ModelFacts, out_dir: Path,
                  infer_s: float) -> StudyResult:
    """The rest of the second half: post-processing, SEG, SR, preview and summary.json of a decoded series into
    `out_dir / decoded.subdir`, as `process_all` writes them."""
    clock = _Clock(_no_progress, {**decoded.timings, "infer": round(infer_s, 3)})
    return _write_series(decoded.source, labels, decoded.spacing, decoded.hu.shape, decoded.hu, decoded.turn,
                         out_dir / decoded.subdir, clock, model, decoded.series_uid,
                         series_number=decoded.series_number, series=decoded.series)


class _Clock:
    """Stage timings: `lap(name)` records the time since the last lap and tells `progress` the stage ended."""

    def __init__(self, progress: Progress, timings: dict[str, float] | None = None) -> None:
        self.progress, self.timings, self.t = progress, dict(timings or {}), time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.t, 3)
        self.t = now
        self.progress(name, 0, 0)  # a stage finished; no counts

    def fork(self) -> "_Clock":
        """A clock for one series that starts with the study's timings so far."""
        return _Clock(self.progress, self.timings)


def _ordered(headers: list[tuple[str, Dataset]], series_uid: str
             ) -> tuple[list[tuple[str, Dataset]], SliceOrder, Orientation]:
    """The slices of one series to use, in order, with their order and how they are turned."""
    chosen = [(src, ds) for src, ds in headers if str(ds.SeriesInstanceUID) == series_uid]
    order = order_slices(chosen, series_uid)
    return [chosen[i] for i in order.kept], order, Orientation.from_iop(order.orientation)


def _process_series(headers: list[tuple[str, Dataset]], series_uid: str, segmenter: Segmenter, out_dir: Path,
                    clock: _Clock, *, series_number: int, series: dict,
                    sr_process: SrProcess | None = None) -> StudyResult:
    """Segment one series of the study and write its SEG, SR, summary.json and preview.png into `out_dir`."""
    kept, order, turn = _ordered(headers, series_uid)
    clock.lap("load")
    network_before = segmenter.network_s
    volume, labels, slices = _segment(kept, order, segmenter, series_uid, clock.progress, turn)
    clock.lap("infer")
    network_s = segmenter.network_s - network_before  # of infer, the network's own runs
    source = slices.sources()
    # From here on only a preview's dozen slices need pixels: they are read again from disk (`slices`), and the
    # study's HU volume (2 bytes a voxel) is not held through post-processing and SEG writing.
    spacing, shape = volume.spacing, volume.hu.shape
    del volume
    return _write_series(source, labels, spacing, shape, slices, turn, out_dir, clock,
                         ModelFacts.of(segmenter), series_uid, series_number=series_number, series=series,
                         network_s=network_s, sr_process=sr_process)


def _write_series(source: Sequence[Dataset], labels: np.ndarray, spacing: tuple[float, float, float],
                  shape: tuple[int, ...], slices, turn: Orientation, out_dir: Path, clock: _Clock,
                  model: ModelFacts, series_uid: str, *, series_number: int, series: dict,
                  network_s: float | None = None, sr_process: SrProcess | None = None) -> StudyResult:
    """Post-process a series' labels and write its SEG, SR, summary.json and preview.png (from `slices`, HU slice
    by index) into `out_dir`. `network_s`: of the infer stage, the seconds the network itself ran, where known."""
    source = list(source)  # headers only
    findings = postprocess(labels, spacing, overwrite=True)  # the network's labels are not needed after this
    del labels
    clock.lap("postprocess")
    out_dir.mkdir(parents=True, exist_ok=True)
    m, algorithm = model.manifest, model.algorithm
    note = " (liver cut off)" if findings.liver_touches_scan_edge else ""  # SeriesDescription holds 64
    statement = m.research_use  # a phantom-trained model says so in every result
    # The preview needs the findings and a dozen slices only: it is drawn beside the SEG and the SR (OpenCV and
    # numpy release the interpreter lock), its time its own. With an SR process, the SR is built there from the
    # SEG's object model while this process writes the SEG's frames; its time too is its own.
    seg_path, sr_path = out_dir / "seg.dcm", out_dir / "sr.dcm"
    sr_kw = dict(series_uid=generate_uid(), sop_uid=generate_uid(), series_number=series_number + 1, note=note,
                 description=statement)
    started: list = []
    what = f"series {short_key(series_uid)}"

    def start_sr(seg_model: Dataset) -> None:
        try:
            job = SrJob.of(seg_model, source, findings, algorithm, sr_path, **sr_kw)
        except Exception as exc:  # noqa: BLE001 - never the SEG's failure: the SR is then built after it
            log.warning("%s: no SR job (%s: %s); building the SR after the SEG", what, type(exc).__name__, exc)
            return
        future = sr_process.submit(job, what)
        if future is not None:
            started.append((job, future))

    with ThreadPoolExecutor(1, thread_name_prefix="preview") as beside:
        drawn = beside.submit(_timed, preview, slices, findings, out_dir / "preview.png", turn)
        try:
            seg = write_result_seg(source, findings.labels, seg_path, algorithm=algorithm, series_uid=generate_uid(),
                                   sop_uid=generate_uid(), series_number=series_number, note=note,
                                   description=statement, on_model=None if sr_process is None else start_sr)
            clock.lap("seg")  # raises StudyInterrupted when the node is stopping
        except BaseException:
            for _, future in started:  # nothing of this attempt is written after it has failed or stopped
                sr_process.settle(future)
            raise
        if started:
            (job, future), = started
            clock.timings["sr"] = sr_process.wait(future, job, what)
            clock.t = time.perf_counter()
            clock.progress("sr", 0, 0)
        else:
            write_sr(build_sr(seg, source, findings, algorithm, **sr_kw), sr_path)
            clock.lap("sr")
        preview_path, clock.timings["preview"] = drawn.result()
    clock.t = time.perf_counter()
    clock.progress("preview", 0, 0)
    summary = summary_dict(
        findings,
        livernode_version=__version__,
        research_use=statement,
        study_instance_uid=str(source[0].StudyInstanceUID),
        series={**series, "chosen": series_uid},
        volume={"slices": int(shape[0]), "rows": int(shape[1]), "columns": int(shape[2]), "spacing_mm": list(spacing),
                "orientation": turn.describe()},
        model={"file": model.file, "architecture": m.architecture.name, "backbone": m.architecture.backbone,
               "weights_sha256": m.weights_sha256, "created": m.created, "training_data": m.training_data},
        providers=list(model.providers),
        timings_s=clock.timings,
        **({} if network_s is None else {"network_s": round(network_s, 3)}),
    )
    summary_path = out_dir / "summary.json"
    write_json(summary_path, summary)
    log.info("series %s: liver %.1f mL%s, %d lesions, %.1f mL tumour; %s", short_key(series_uid),
             findings.liver_volume_ml, note, len(findings.lesions), findings.tumour_volume_ml,
             ", ".join(f"{k} {v:.2f} s" for k, v in clock.timings.items()))
    return StudyResult(out_dir, seg_path, sr_path, summary_path, preview_path, findings, clock.timings,
                       int(shape[0]), tuple(series["decisions"]))


def warm_up(model: ModelFacts, sr_process: SrProcess | None = None) -> float:
    """Write one tiny SEG, SR and preview into a temporary folder and throw them away; returns the seconds it took.
    highdicom reads its tables of the standard when it first builds a SEG or an SR (about 0.6 s here, a third of
    writing a 200-slice SEG), so without this the first study after every start would wait for it. With
    `sr_process`, its helper is started and builds the SR too."""
    import tempfile

    from livernode.imaging.ctwrite import StudyInfo, ct_datasets

    t = time.perf_counter()
    labels = np.zeros((3, 32, 32), np.uint8)
    labels[:, 8:24, 8:24] = LIVER
    labels[1, 12:16, 12:16] = TUMOUR
    hu = np.where(labels > 0, 60, -100).astype(np.int16)
    source = ct_datasets(CtVolume(hu.astype(np.float32), (2.0, 1.0, 1.0)), StudyInfo("livernode warm-up"))
    lesion = Lesion(index=1, voxels=16, volume_ml=0.032, longest_axial_diameter_mm=4.2,
                    bbox=(1, 12, 12, 2, 16, 16), diameter_line=(1, 12, 12, 15, 15))
    findings = Findings(labels, 3.1, 0.032, (lesion,), True)  # what post-processing makes of them
    algorithm = model.algorithm
    with tempfile.TemporaryDirectory(prefix="livernode-warm-up-") as tmp:
        seg = write_result_seg(source, findings.labels, Path(tmp) / "seg.dcm", algorithm=algorithm,
                               series_uid=generate_uid(), sop_uid=generate_uid())
        write_sr(build_sr(seg, source, findings, algorithm, series_uid=generate_uid(), sop_uid=generate_uid()),
                 Path(tmp) / "sr.dcm")
        if sr_process is not None:
            job = SrJob.of(seg, source, findings, algorithm, Path(tmp) / "sr-beside.dcm", series_uid=generate_uid(),
                           sop_uid=generate_uid())
            future = sr_process.submit(job, "warm-up")
            if future is not None:
                sr_process.wait(future, job, "warm-up")
        preview(hu, findings, Path(tmp) / "preview.png")
    return time.perf_counter() - t


def _timed(fn, *args):
    """(fn(*args), the seconds it took)."""
    t = time.perf_counter()
    result = fn(*args)
    return result, round(time.perf_counter() - t, 3)


class _Slices:
    """The study's slices in order, decoded from their files when indexed: `slices[k]` is slice k in HU. A slice
    chosen by its header facts from the index (a LightHeader) keeps the full header its decoding read, for the
    SEG and SR (`sources`)."""

    def __init__(self, kept: list[tuple[str, Dataset]], dtype) -> None:
        self.kept, self.dtype = kept, np.dtype(dtype)
        self.full: dict[int, Dataset] = {}

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, i: int) -> np.ndarray:
        src, header = self.kept[i]
        light = isinstance(header, LightHeader)  # from the index: a receiver checked every element at ingest
        ds = read_dataset(Path(src), checked=light)
        hu = hu_int16_of(ds, src) if self.dtype == np.int16 else hu_of(ds, src)
        if light:
            self.full[i] = without_pixels(ds)
        return hu

    def sources(self) -> list[Dataset]:
        """Every slice's full header (no pixels), in order: as decoded, or as selection read it from the file."""
        out = []
        for i, (src, header) in enumerate(self.kept):
            if isinstance(header, LightHeader):
                header = self.full.get(i) or read_dataset(Path(src), pixels=False)
            out.append(header)
        return out


def _hu_dtype(kept: list[tuple[str, Dataset]]):
    """int16 for integer HU (slope 1, integer intercept: every CT scanner we know of), else float32."""
    exact = all(float(getattr(ds, "RescaleSlope", 1) or 1) == 1.0 and
                float(getattr(ds, "RescaleIntercept", 0) or 0).is_integer() for _, ds in kept)
    return np.int16 if exact else np.float32


def _segment(kept: list[tuple[str, Dataset]], order: SliceOrder, segmenter: Segmenter,
             series_uid: str, progress: Progress, turn: Orientation) -> tuple[CtVolume, np.ndarray, _Slices]:
    """Decode the ordered slices into a volume while the network runs on the ones already decoded; returns the
    volume, the labels and the slices' reader. Integer HU (slope 1, integer intercept: every CT scanner we know of)
    are held as int16, otherwise as float32."""
    ref = kept[0][1]
    shape = (int(ref.Rows), int(ref.Columns))
    slices = _Slices(kept, _hu_dtype(kept))
    row_mm, col_mm = (float(v) for v in ref.PixelSpacing)
    hu, labels = segmenter.segment_streamed(len(kept), shape, slices.__getitem__, slices.dtype,
                                            on_batch=lambda done, total: progress("infer", done, total),
                                            orientation=turn, spacing=(order.step, row_mm, col_mm))
    return ordered_volume([ds for _, ds in kept], order, hu, series_uid), labels, slices


def infer_folder(study_dir: Path, model: Path, out_dir: Path, providers: str = "auto",
                 rules: SelectionConfig | None = None) -> StudyResult:
    """`livernode infer`: the daemon's pipeline on a folder, no network; `rules` as the node's [selection]."""
    return process_study(Path(study_dir), Segmenter(model, providers=providers), Path(out_dir), rules)


