"""An archive of phantom studies for `livernode batch`, written once per session: twelve studies at 64 px, two of
them broken, a file that is not DICOM, and one study whose files lie in two folders."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from livernode.daemon.spool import uid_key
from livernode.imaging.synth import synthesize

STUDIES, SLICES, SIZE = 12, 12, 64


@dataclass(frozen=True)
class Archive:
    root: Path
    keys: tuple[str, ...]  # every study's digest (`uid_key` of its Study Instance UID), in case order
    not_ct: str  # the study whose CT files now say MR: its only series are MR and the ground-truth SEG
    too_few: str  # the study left with 5 of its 12 slices (livernode needs 8)

    @property
    def good(self) -> tuple[str, ...]:
        return tuple(k for k in self.keys if k not in (self.not_ct, self.too_few))

    def subset(self, dst: Path, keys: set[str]) -> Path:
        """A copy of the archive with only the studies in `keys` (and the stray text file)."""
        for i, key in enumerate(self.keys):
            if key in keys:
                shutil.copytree(self.root / f"case_{i:03d}", dst / f"case_{i:03d}")
                loose = self.root / "loose" / f"case_{i:03d}"
                if loose.is_dir():
                    shutil.copytree(loose, dst / "loose" / f"case_{i:03d}")
        shutil.copy2(self.root / "notes.txt", dst / "notes.txt")
        return dst


def study_key(case: Path) -> str:
    return uid_key(str(pydicom.dcmread(next((case / "ct").glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID))


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> Archive:
    root = tmp_path_factory.mktemp("archive")
    cases = synthesize(root, cases=STUDIES, slices=SLICES, size=SIZE, seed=16, layout="dicom")
    keys = tuple(study_key(c) for c in cases)
    for f in sorted((cases[0] / "ct").glob("*.dcm")):  # an MR series: nothing to segment
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    for f in sorted((cases[1] / "ct").glob("*.dcm"))[5:]:
        f.unlink()
    loose = root / "loose" / cases[2].name  # half of a study's slices elsewhere under the root
    loose.mkdir(parents=True)
    for f in sorted((cases[2] / "ct").glob("*.dcm"))[::2]:
        f.rename(loose / f.name)
    (root / "notes.txt").write_text("not DICOM: counted and skipped\n")
    return Archive(root, keys, keys[0], keys[1])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))

