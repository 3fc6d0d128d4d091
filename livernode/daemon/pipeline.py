"""One study, start to finish, without a network: headers -> series selection -> volume -> model -> findings
-> SEG (checked) + summary.json + preview.png. `livernode infer` and the daemon's worker both call `process_study`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from livernode import __version__
from livernode.daemon.postprocess import Findings, postprocess
from livernode.daemon.report import preview, summary_dict, write_json
from livernode.daemon.select import select_series
from livernode.daemon.seg import write_result_seg
from livernode.daemon.sr import build_sr, write_sr
from livernode.errors import InputError, SeriesRejected
from livernode.imaging.dicomio import (SliceOrder, dicom_files, hu_of, order_slices, ordered_volume,
                                      read_dataset)
from livernode.imaging.volume import CtVolume
from livernode.imaging.segwrite import Algorithm
from livernode.inference.runner import Segmenter

log = logging.getLogger(__name__)
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


def process_study(study_dir: Path, segmenter: Segmenter, out_dir: Path) -> StudyResult:
    """Segment the best CT series found under `study_dir` and write the results into `out_dir`."""
    files = dicom_files(study_dir)
    if not files:
        raise SeriesRejected(f"{study_dir}: no DICOM files")
    return process_files(files, segmenter, out_dir)


def process_files(files: list[Path], segmenter: Segmenter, out_dir: Path, *,
                  series_number_offset: int = 0, progress: Progress = _no_progress) -> StudyResult:
    """Segment the best CT series among `files` (one study) and write the results into `out_dir`.
    `series_number_offset` numbers a reprocess's SEG and SR series after the ones they supersede; `progress` is
    told of every file read, every inference batch and every stage finished."""
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 3)
        t = now
        progress(name, 0, 0)  # a stage finished; no counts

    headers, skipped = [], []
    for i, path in enumerate(files):
        progress("read", i, len(files))
        try:
            headers.append((str(path), read_dataset(path, pixels=False)))
        except InputError as exc:
            log.warning("skipping %s", exc)
            skipped.append(str(exc))
    if not headers:
        raise SeriesRejected(f"no readable DICOM files among {len(files)} ({'; '.join(skipped[:3])})")
    series_uid, decisions = select_series(headers)
    lap("select")
    chosen = [(src, ds) for src, ds in headers if str(ds.SeriesInstanceUID) == series_uid]
    order = order_slices(chosen, series_uid)
    kept = [chosen[i] for i in order.kept]
    source = [ds for _, ds in kept]  # headers only: the pixels live in the volume below, once
    lap("load")
    volume, labels, slices = _segment(kept, order, segmenter, series_uid, progress)
    lap("infer")
    # From here on only a preview's dozen slices need pixels: they are read again from disk (`slices`), and the
    # study's HU volume (2 bytes a voxel) is not held through post-processing and SEG writing.
    spacing, described, shape = volume.spacing, volume.source, volume.hu.shape
    del volume
    findings = postprocess(labels, spacing)
    del labels
    lap("postprocess")
    out_dir.mkdir(parents=True, exist_ok=True)
    m = segmenter.manifest
    algorithm = Algorithm(name=f"livernode {m.architecture.name}-{m.architecture.backbone}",
                          version=f"{m.livernode_version} ({m.weights_sha256[:12]})")
    seg_path = out_dir / "seg.dcm"
    seg = write_result_seg(source, findings.labels, seg_path, algorithm=algorithm, series_uid=generate_uid(),
                           sop_uid=generate_uid(), series_number=9001 + 2 * series_number_offset)
    lap("seg")
    sr_path = out_dir / "sr.dcm"
    write_sr(build_sr(seg, source, findings, algorithm, series_uid=generate_uid(), sop_uid=generate_uid(),
                      series_number=9002 + 2 * series_number_offset), sr_path)
    lap("sr")
    preview_path = preview(slices, findings, out_dir / "preview.png")
    lap("preview")
    summary = summary_dict(
        findings,
        livernode_version=__version__,
        study_instance_uid=str(source[0].StudyInstanceUID),
        series={"chosen": series_uid, "decisions": [asdict(d) for d in decisions], "skipped_files": skipped},
        volume={"slices": int(shape[0]), "rows": int(shape[1]), "columns": int(shape[2]), "spacing_mm": list(spacing)},
        model={"file": segmenter.path.name, "architecture": m.architecture.name, "backbone": m.architecture.backbone,
               "weights_sha256": m.weights_sha256, "created": m.created},
        providers=segmenter.providers_used,
        timings_s=timings,
    )
    summary_path = out_dir / "summary.json"
    write_json(summary_path, summary)
    log.info("study %s: liver %.1f mL, %d lesions, %.1f mL tumour; %s", described, findings.liver_volume_ml,
             len(findings.lesions), findings.tumour_volume_ml,
             ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return StudyResult(out_dir, seg_path, sr_path, summary_path, preview_path, findings, timings, int(shape[0]))


class _Slices:
    """The study's slices in order, decoded from their files when indexed: `slices[k]` is slice k in HU."""

    def __init__(self, kept: list[tuple[str, Dataset]], dtype) -> None:
        self.kept, self.dtype = kept, np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, i: int) -> np.ndarray:
        src = self.kept[i][0]
        hu = hu_of(read_dataset(Path(src)), src)
        return np.clip(hu, -32768, 32767).astype(self.dtype) if self.dtype == np.int16 else hu


def _segment(kept: list[tuple[str, Dataset]], order: SliceOrder, segmenter: Segmenter,
             series_uid: str, progress: Progress) -> tuple[CtVolume, np.ndarray, _Slices]:
    """Decode the ordered slices into a volume while the network runs on the ones already decoded; returns the
    volume, the labels and the slices' reader. Integer HU (slope 1, integer intercept: every CT scanner we know of)
    are held as int16, otherwise as float32."""
    ref = kept[0][1]
    exact = all(float(getattr(ds, "RescaleSlope", 1) or 1) == 1.0 and
                float(getattr(ds, "RescaleIntercept", 0) or 0).is_integer() for _, ds in kept)
    shape = (int(ref.Rows), int(ref.Columns))
    slices = _Slices(kept, np.int16 if exact else np.float32)
    hu, labels = segmenter.segment_streamed(len(kept), shape, slices.__getitem__, slices.dtype,
                                            on_batch=lambda done, total: progress("infer", done, total))
    return ordered_volume([ds for _, ds in kept], order, hu, series_uid), labels, slices


def infer_folder(study_dir: Path, model: Path, out_dir: Path, providers: str = "auto") -> StudyResult:
    """`livernode infer`: the daemon's pipeline on a folder, no network."""
    return process_study(Path(study_dir), Segmenter(model, providers=providers), Path(out_dir))


