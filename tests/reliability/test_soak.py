"""Soak: studies and associations back to back for a few minutes against `livernode serve` (configured from a
TOML file with an AE allow-list). Resident memory and open file descriptors of the node must stay flat.

The soak ends after LIVERNODE_SOAK_S seconds (default 150) or LIVERNODE_SOAK_STUDIES studies (default 80),
whichever comes first, so a fast machine and a slow one do comparable work. Samples are placed on that same
scale: the share of the time or of the studies done, whichever is larger."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from livernode.imaging.synth import synthesize
from tests.peers import ENV, free_port, restamp, start_node, stop_node, storescu, wait_for, wait_port
from tests.reliability.conftest import audit_events

pytestmark = pytest.mark.slow
SOAK_S = float(os.environ.get("LIVERNODE_SOAK_S", "150"))
SOAK_STUDIES = int(os.environ.get("LIVERNODE_SOAK_STUDIES", "80"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _disk_bytes(state: Path) -> int:
    """Bytes of patient data and results on the node: the spool and the results folders. Retention deletes while
    this walks, so a folder or file that vanishes under it counts as gone (os.walk skips an unreadable folder;
    Path.rglob raised FileNotFoundError here once in CI)."""
    total = 0
    for folder in ("spool", "results"):
        for parent, _, names in os.walk(state / folder):
            for name in names:
                try:
                    total += os.stat(os.path.join(parent, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def _window(samples: list[tuple], start: float, end: float, index: int, how=statistics.median):
    chosen = [s[index] for s in samples if start <= s[0] <= end]
    assert len(chosen) >= 3, f"too few samples between {start:.0%} and {end:.0%}"
    return how(chosen)


def test_soak_memory_and_descriptors_stay_flat(tmp_path, exported, pacs, figure):
    pacs_port, pacs_out = pacs
    port = free_port()
    config = tmp_path / "livernode.toml"
    # Retention as a busy node runs it, compressed in time: delivered studies go 2 s after their last activity.
    config.write_text(f'[node]\nallowed_calling_ae_titles = ["STORESCU", "ECHOSCU"]\n'
                      f'[study]\nquiet_seconds = 0.3\n[send]\ndestinations = ["PACS@127.0.0.1:{pacs_port}"]\n'
                      f'[retention]\nkeep_delivered_hours = {2 / 3600}\ninterval_seconds = 1\n')
    synthesize(tmp_path / "src", cases=1, slices=10, size=64, seed=5, layout="dicom")
    template = sorted((tmp_path / "src" / "case_000" / "ct").glob("*.dcm"))
    node = start_node(tmp_path / "state", exported, "--config", str(config), "--port", str(port),
                      "--study-timeout", "0.3")
    samples: list[tuple[float, int, int]] = []
    studies = associations = 0
    try:
        wait_port(port, node)
        t0 = time.monotonic()

        def done() -> float:
            return max((time.monotonic() - t0) / SOAK_S, studies / SOAK_STUDIES)
        while done() < 1:
            files = restamp(template, tmp_path / "studies" / str(studies))
            storescu(port, files)
            r = subprocess.run(["/usr/bin/echoscu", "-aec", "LIVERNODE", "127.0.0.1", str(port)], env=ENV,
                               capture_output=True, timeout=30)
            assert r.returncode == 0
            studies += 1
            associations += 2
            wait_for(lambda: len(list(pacs_out.iterdir())) >= 2 * studies, 60, f"study {studies} delivered", 0.05)
            samples.append((done(), _rss_kib(node.pid), _fds(node.pid), _disk_bytes(tmp_path / "state")))
        seconds = time.monotonic() - t0
        # Once traffic stops, every study must go within its 2 s and a purge interval (20 s allowed for a busy machine).
        quiet = time.monotonic()
        while _disk_bytes(tmp_path / "state") > 0 and time.monotonic() - quiet < 20:
            time.sleep(0.2)
        drained = time.monotonic() - quiet
        left = _disk_bytes(tmp_path / "state")
    finally:
        err = stop_node(node)
    assert "Traceback" not in err, err[-3000:]
    rss_start, rss_end = _window(samples, 0.25, 0.40, 1), _window(samples, 0.85, 1.0, 1)
    # Descriptors: the floor of each window. A leak raises the floor; an association still closing does not.
    fd_start, fd_end = _window(samples, 0.25, 0.40, 2, min), _window(samples, 0.85, 1.0, 2, min)
    rss_growth, fd_growth = rss_end / rss_start - 1, fd_end / fd_start - 1
    # Disk: without retention it grows with every study (about 3x from the first window to the last); with it, only
    # the studies of the last few seconds are on disk, and once traffic stops, none. How many wait for their 2 s at
    # one moment depends on how fast the node runs beside other work (beside another test worker the lowest held
    # doubled in CI: one study more), so the checks are on what retention owes rather than on a level: every
    # delivered study purged, and nothing left once the last one has had its time.
    disk_start, disk_end = _window(samples, 0.25, 0.40, 3, max), _window(samples, 0.85, 1.0, 3, max)
    floor_start, floor_end = _window(samples, 0.25, 0.40, 3, min), _window(samples, 0.85, 1.0, 3, min)
    events = [e for e in audit_events(tmp_path / "state" / "audit.jsonl") if e["event"] == "purge"]
    purged_studies = {u for e in events for u in e["study_instance_uids"]}
    purged = len(events)
    figure("duration_s", round(seconds))
    figure("studies", studies)
    figure("associations", associations)
    figure("rss_mib_after_warmup_and_at_end", [round(rss_start / 1024, 1), round(rss_end / 1024, 1)])
    figure("rss_growth_percent", round(100 * rss_growth, 2))
    figure("open_fds_floor_after_warmup_and_at_end", [fd_start, fd_end])
    figure("open_fds_max", max(s[2] for s in samples))
    figure("disk_mib_most_in_window_after_warmup_and_at_end", [round(disk_start / 2**20, 2), round(disk_end / 2**20, 2)])
    figure("disk_mib_floor_after_warmup_and_at_end", [round(floor_start / 2**20, 2), round(floor_end / 2**20, 2)])
    figure("purge_runs", purged)
    figure("studies_purged", len(purged_studies))
    figure("seconds_until_nothing_left_after_the_last_study", round(drained, 1))
    assert studies >= 20
    assert rss_growth < 0.05, f"RSS grew {100 * rss_growth:.1f} % ({rss_start} -> {rss_end} KiB)"
    assert fd_growth < 0.05, f"open descriptors grew {fd_start} -> {fd_end}"
    assert purged > 0 and len(purged_studies) == studies, f"{len(purged_studies)} of {studies} studies purged"
    assert left == 0, f"{left} bytes of spool and results still on disk {drained:.1f} s after the last study"
