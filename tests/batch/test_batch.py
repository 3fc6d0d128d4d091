"""`livernode batch` on local worker processes, through the real command line: the acceptance of issue 16 (ten
result folders and two failure rows, a resumed run that processes nothing, a run killed half-way and resumed that
processes every study exactly once)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from livernode.batch import CSV_NAME, FAILED_DIR, MARKER, RESULT_FILES
from livernode.cli import main
from tests.batch.conftest import read_rows


def published(out: Path) -> dict[str, tuple[int, str]]:
    """Each published study folder: (inode, the run that made it). Hidden folders are being built."""
    return {m.parent.name: (m.parent.stat().st_ino, json.loads(m.read_text())["run"])
            for m in out.glob(f"[!.]*/{MARKER}")}


def alive_children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc), zombies left out."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return False
        except OSError:
            pass
    return True


def check_results(out: Path, archive) -> list[dict]:
    """Ten complete result folders, two failure rows with their reasons, one row per study."""
    rows = read_rows(out / CSV_NAME)
    assert sorted(r["study"] for r in rows) == sorted(archive.keys)
    by_key = {r["study"]: r for r in rows}
    assert "modality MR, not CT" in by_key[archive.not_ct]["reason"]
    assert "fewer than 8" in by_key[archive.too_few]["reason"]
    assert {by_key[k]["status"] for k in (archive.not_ct, archive.too_few)} == {"failed"}
    assert sorted(published(out)) == sorted(archive.good)
    for key in archive.good:
        assert by_key[key]["status"] in ("done", "skipped-up-to-date") and not by_key[key]["reason"]
        assert all((out / key / name).stat().st_size > 0 for name in RESULT_FILES)
        assert float(by_key[key]["liver_ml"]) > 50 and int(by_key[key]["slices"]) == 12
        assert by_key[key]["providers"] == "CPUExecutionProvider" and by_key[key]["worker"]
    half_written = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".batch.lock"]
    assert not half_written
    return rows


def test_archive_then_resume_processes_nothing(archive, liver_model, tmp_path, capsys, caplog):
    """The results go into a folder inside the archive: their SEG and SR carry the studies' UIDs and must not be
    taken for inputs (a resumed run would otherwise see changed inputs)."""
    out = archive.root / "results"
    try:
        assert main(["batch", str(archive.root), "--model", str(liver_model), "--out", str(out), "--workers", "2"]) == 1
        printed = capsys.readouterr().out
        assert "12 studies, 12 processed" in printed and "10 done, 2 failed" in printed
        assert "1 files skipped" in printed  # notes.txt
        rows = check_results(out, archive)
        assert {r["status"] for r in rows if r["study"] in archive.good} == {"done"}
        assert len({r["worker"] for r in rows if r["status"] == "done"}) == 2  # two processes shared the work
        log = caplog.text
        assert f"study {archive.not_ct} failed: no usable CT series" in log
        assert "PHANTOM" not in log  # the phantoms' patient names and IDs all start so
        before = published(out)
        assert sorted(p.stem for p in (out / FAILED_DIR).glob("*.json")) == sorted([archive.not_ct, archive.too_few])

        assert main(["batch", str(archive.root), "--model", str(liver_model), "--out", str(out), "--resume"]) == 1
        assert "12 studies, 0 processed" in capsys.readouterr().out
        again = check_results(out, archive)
        assert {r["status"] for r in again if r["study"] in archive.good} == {"skipped-up-to-date"}
        assert published(out) == before  # not one folder replaced
        keep = ("liver_ml", "tumour_ml", "lesions", "series", "worker")
        assert [{k: r[k] for k in keep} for r in again] == [{k: r[k] for k in keep} for r in rows]
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the archive is shared with other tests


def test_killed_run_resumes_with_every_study_processed_once(archive, liver_model, tmp_path):
    """SIGKILL of the batch process once a few studies are published; the resumed run does the rest: every
    study is published once, by one of the two runs, and nothing published before the kill is touched."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "livernode.cli", "batch", str(archive.root), "--model", str(liver_model), "--out",
           str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(published(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        workers = alive_children(proc.pid)  # the worker process (and multiprocessing's resource tracker)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while not gone(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(workers), "the killed run's worker processes outlived it"
    before = published(out)
    assert 3 <= len(before) < len(archive.good)
    [killed_run] = {run for _, run in before.values()}
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]  # the two broken studies
    assert "studies/h" in r.stderr  # the progress bar
    assert "PHANTOM" not in r.stderr  # no patient names or IDs in the log
    assert f"{len(archive.keys) - len(before)} processed" in r.stdout
    after = published(out)
    rows = {row["study"]: row for row in check_results(out, archive)}
    runs = {run for _, run in after.values()}
    assert len(runs) == 2  # the killed run and the resumed one
    for key, (inode, run) in after.items():
        if key in before:
            assert (inode, run) == before[key] and rows[key]["status"] == "skipped-up-to-date"
        else:
            assert run != killed_run and rows[key]["status"] == "done"


def test_a_worker_process_killed_mid_study(archive, liver_model, tmp_path):
    """SIGKILL of the worker process (an out-of-memory kill looks the same): the studies it held run again in a new
    pool, and every study is done once."""
    keys = set(archive.good[:6])
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "livernode.cli", "batch", str(archive.subset(tmp_path / "in", keys)),
                             "--model", str(liver_model), "--out", str(out), "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not published(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        [worker] = [pid for pid in alive_children(proc.pid)
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(worker, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "its worker process died (attempt 1 of 3)" in stderr
    rows = read_rows(out / CSV_NAME)
    assert sorted(r["study"] for r in rows) == sorted(keys) == sorted(published(out))
    assert {r["status"] for r in rows} == {"done"}
    assert max(int(r["attempts"]) for r in rows) == 2
