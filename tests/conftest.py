"""Shared fixtures: small phantoms written once per session by the real synth code."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from livernode.imaging.synth import synthesize

REPO = Path(__file__).resolve().parent.parent
CHAOS_SAMPLE = REPO.parent / "shared" / "data" / "chaos-ct-sample"
SYNTH = dict(cases=3, slices=12, size=64, seed=7)


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


@pytest.fixture()
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env
