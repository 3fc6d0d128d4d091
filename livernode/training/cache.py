"""The prepared cache: every case written once at training resolution, read back a slice at a time.

A case's entry is a folder named by its case id and a digest of (its source files' paths, sizes and modification
times, the preprocessing settings, the cache layout version). Changing the window or the size makes new entries;
changing the epochs, the split or the architecture reuses them. An entry holds:

- `image.npy`  float16 (slices, size, size): the windowed slice in [0, 1], resized like the node resizes it,
  turned to the orientation convention and ordered foot to head (what 2.5-D and 3-D models see);
- `labels.npy` uint8 (slices, size, size): 0 background, 1 liver, 2 tumour;
- `flags.npy`  bool (slices, 3): has liver, has tumour, tumour labelled;
- `case.json`  the case id, format, source files, spacing after orientation, phantom or not, slice count.

A case the node would refuse (not axial) gets a `skipped.json` with the reason instead, so it is not read again.
Entries are built aside and renamed into place (fsutil.building_dir), so a run killed mid-way leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm import tqdm

from livernode.errors import DatasetError, SeriesRejected
from livernode.fsutil import building_dir, write_json
from livernode.imaging.orient import Orientation
from livernode.imaging.preprocess import PreprocessSpec, prepare_labels, prepare_slices, prepared_spacing
from livernode.training.datasets import CaseRef, load_case

log = logging.getLogger(__name__)
LAYOUT = 2  # bump when the entry format changes (2: slices foot to head)
IMAGE, LABELS, FLAGS, META, SKIPPED = "image.npy", "labels.npy", "flags.npy", "case.json", "skipped.json"
HAS_LIVER, HAS_TUMOUR, TUMOUR_LABELLED = 0, 1, 2


def default_cache_dir() -> Path:
    """$LIVERNODE_CACHE, else ~/.cache/livernode/prepared."""
    env = os.environ.get("LIVERNODE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "livernode" / "prepared"


def entry_key(ref: CaseRef, spec: PreprocessSpec) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"layout": LAYOUT, "fmt": ref.fmt, "spec": asdict(spec)}, sort_keys=True).encode())
    for f in ref.files:
        for p in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if p.is_file():
                st = p.stat()
                h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-ordered .npy file, from its header."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        if fortran:
            raise DatasetError(f"{path}: Fortran-ordered array in the cache")
        return shape, dtype, fh.tell()


def read_rows(path: Path, start: int, stop: int, layout: tuple | None = None) -> np.ndarray:
    """Rows start..stop (clipped to the array) of a .npy file along its first axis, by pread."""
    shape, dtype, offset = layout or _npy_layout(path)
    per = int(np.prod(shape[1:])) * dtype.itemsize
    start, stop = max(0, start), min(shape[0], stop)
    with open(path, "rb", buffering=0) as fh:
        raw = os.pread(fh.fileno(), per * (stop - start), offset + per * start)
    if len(raw) != per * (stop - start):
        raise DatasetError(f"{path}: truncated (delete the entry to prepare it again)")
    return np.frombuffer(raw, dtype).reshape((stop - start, *shape[1:]))


@dataclass(frozen=True)
class CachedCase:
    """One prepared case. Slices are read with pread when asked for, not memory-mapped: mapped pages would count
    in the trainer's resident memory and grow with every case it touches; read ones live in the page cache, which
    the kernel shares and reclaims."""

    case_id: str
    path: Path
    n: int
    spacing: tuple[float, float, float]
    synthetic: bool
    tumour_labelled: bool
    plane_spacing: tuple[float, float, float]  # (slice, row, column) mm of the prepared slices

    @cached_property
    def _layouts(self) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
        return {name: _npy_layout(self.path / name) for name in (IMAGE, LABELS)}

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        return read_rows(self.path / name, start, stop, self._layouts[name])

    @property
    def size(self) -> int:
        return int(self._layouts[IMAGE][0][-1])

    def images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float16 (k, size, size) windowed slices start..stop."""
        return self._read(IMAGE, start, self.n if stop is None else stop)

    def labels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """uint8 (k, size, size) labels of slices start..stop."""
        return self._read(LABELS, start, self.n if stop is None else stop)

    @cached_property
    def flags(self) -> np.ndarray:
        return np.load(self.path / FLAGS)

    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in (IMAGE, LABELS, FLAGS))

    @classmethod
    def open(cls, path: Path) -> "CachedCase":
        meta = json.loads((path / META).read_text())
        return cls(meta["case_id"], path, int(meta["slices"]), tuple(meta["spacing"]), bool(meta["synthetic"]),
                   bool(meta["tumour_labelled"]), tuple(meta["plane_spacing"]))


def _entry(root: Path, ref: CaseRef, spec: PreprocessSpec) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in ref.case_id)[:60]
    return root / f"{safe}-{entry_key(ref, spec)}"


def _prepare_one(ref: CaseRef, spec: PreprocessSpec, entry: Path) -> tuple[str, str | None]:
    """Write one entry (in a worker process); (case id, reason it was skipped or None)."""
    case = load_case(ref)
    try:
        turn = Orientation.from_iop(case.volume.orientation)  # every case the way the node will show it
    except SeriesRejected as exc:  # an oblique or non-axial case: the node would refuse such a study too
        with building_dir(entry) as tmp:
            write_json(tmp / SKIPPED, {"case_id": ref.case_id, "reason": str(exc)})
        return ref.case_id, str(exc)
    hu, lab = turn.forward(case.volume.hu), turn.forward(case.labels)
    if turn.reverse_slices:  # stored head to foot: the cache runs foot to head, as context_index reads a volume
        hu, lab = hu[::-1], lab[::-1]
    one = PreprocessSpec(spec.window_low, spec.window_high, 1, spec.size, spec.size_multiple, spec.bilateral)
    image = prepare_slices(hu, one)[..., 0].astype(np.float16)
    labels = prepare_labels(lab, spec.size)
    flat = labels.reshape(len(labels), -1)
    flags = np.stack([(flat > 0).any(1), (flat == 2).any(1), np.full(len(labels), case.tumour_labelled)], 1)
    with building_dir(entry) as tmp:
        for name, arr in ((IMAGE, image), (LABELS, labels), (FLAGS, flags)):
            np.save(tmp / name, arr)
        write_json(tmp / META, {"case_id": ref.case_id, "format": ref.fmt, "files": [str(f) for f in ref.files],
                                "slices": len(labels), "spacing": list(turn.spacing(case.volume.spacing)),
                                "plane_spacing": list(prepared_spacing(hu.shape[1:], turn.spacing(
                                    case.volume.spacing), spec.size)),
                                "synthetic": case.synthetic, "tumour_labelled": case.tumour_labelled,
                                "preprocess": asdict(spec)})
    return ref.case_id, None


@dataclass(frozen=True)
class Prepared:
    cases: dict[str, CachedCase]  # case id -> entry, for every usable case
    skipped: dict[str, str]  # case id -> reason
    built: int  # entries written by this call (the rest were found ready)


def prepare(refs: list[CaseRef], spec: PreprocessSpec, root: Path | None = None, workers: int | None = None,
            progress: bool = True) -> Prepared:
    """Make sure every case has its entry under `root`; cases are prepared in `workers` processes."""
    root = Path(root) if root else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    entries = {ref.case_id: _entry(root, ref, spec) for ref in refs}
    if len(entries) != len(refs):
        raise DatasetError("two cases share one case id; rename one of them")
    todo = [ref for ref in refs if not entries[ref.case_id].is_dir()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    t0 = time.monotonic()
    if todo:
        log.info("preparing %d of %d cases at %d px into %s (%d workers)", len(todo), len(refs), spec.size, root,
                 workers)
        bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=not progress)
        if workers == 1:
            for ref in todo:
                _prepare_one(ref, spec, entries[ref.case_id])
                bar.update(1)
        else:
            # spawned, not forked: the trainer may already run TensorFlow's threads (and a multi-worker server)
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_prepare_one, ref, spec, entries[ref.case_id]): ref for ref in todo}
                for fut in as_completed(futures):
                    fut.result()  # a loader's DatasetError names the file and stops the run
                    bar.update(1)
        bar.close()
        log.info("prepared %d cases (%d slices) in %.1f s", len(todo), sum(
            CachedCase.open(entries[r.case_id]).n for r in todo if (entries[r.case_id] / META).exists()),
            time.monotonic() - t0)
    cases, skipped = {}, {}
    for ref in refs:
        entry = entries[ref.case_id]
        if (entry / SKIPPED).exists():
            skipped[ref.case_id] = json.loads((entry / SKIPPED).read_text())["reason"]
            log.warning("skipping case %s: %s", ref.case_id, skipped[ref.case_id])
        else:
            cases[ref.case_id] = CachedCase.open(entry)
    return Prepared(cases, skipped, len(todo))
