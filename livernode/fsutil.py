"""The one way livernode writes files: atomically and durably. A file is written to a temporary name, fsynced,
renamed into place and its folder fsynced; a folder of results is built aside and renamed into place the same
way. After return it survives a crash or power loss, and a crash before leaves no partial file behind."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


_warned_no_links: list[bool] = []


def _no_links(folder: Path, exc: OSError) -> None:
    if not _warned_no_links:  # once per process
        _warned_no_links.append(True)
        logging.getLogger(__name__).warning(
            "%s: no hard links on this filesystem (%s); a SOP Instance UID received by two receiver processes at "
            "once may be written twice (the same instance, the last copy kept)", folder, exc.strerror)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Sequence[bytes | memoryview], replace: bool = True) -> bool:
    """Write `data` (bytes, or pieces written one after the other) so that after return it survives a crash, and
    a crash before never leaves a partial file. The folder is made only when it is missing (not for every file).
    `replace=False`: never replace an existing `path` (another process may have written it meanwhile); returns
    whether this call created it."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    pieces = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    try:
        try:
            fh = open(tmp, "wb")
        except FileNotFoundError:  # a new folder, or one retention removed
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(tmp, "wb")
        with fh:
            for piece in pieces:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:  # a hard link is created only where no file is: the first writer wins, whole
            try:
                os.link(tmp, path)
            except FileExistsError:  # the other writer's file: durable before anyone answers for it
                fsync_dir(path.parent)
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                _no_links(path.parent, exc)  # a filesystem without hard links: replace, as before
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    except BaseException:  # a full disk (ENOSPC) or an I/O error: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return True


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """For a library that writes a file itself (Keras, ONNX, matplotlib, csv): it writes to the yielded temporary
    path, which is then fsynced and renamed over `path`; on an error nothing replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")  # keeps every extension
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def write_json(path: Path, data, **dump) -> None:
    atomic_write(path, (json.dumps(data, **dump) + "\n").encode())


def write_dataset(path: Path, ds) -> None:
    """A pydicom Dataset as a DICOM Part 10 file, atomically and durably."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    atomic_write(path, buf.getbuffer())


def write_png(path: Path, image) -> None:
    import cv2

    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"{path}: the image could not be encoded as PNG")
    atomic_write(path, encoded.tobytes())


def publish_dir(src: Path, dst: Path) -> None:
    """Copy the folder `src` to `dst` so that readers see all of it or none: every file durable in a hidden
    folder beside `dst`, then one rename. An older `dst` is moved aside first and removed only once the new one
    is in place, so a crash leaves the old folder or the new one, never neither."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = dst.parent / f".{dst.name}.tmp", dst.parent / f".{dst.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    for f in sorted(src.rglob("*")):
        if f.is_file():
            atomic_write(tmp / f.relative_to(src), f.read_bytes())
    fsync_dir(tmp)
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    tmp.rename(dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def building_dir(dst: Path) -> Iterator[Path]:
    """For a folder too large to copy (a prepared case): write its files into the yielded hidden folder beside
    `dst`; on success each file is fsynced and the folder renamed to `dst` in one step. On an error, or when
    another process published `dst` first, the hidden folder is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # unique across hosts too: two machines may prepare the same entry in a shared cache
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(tmp)
        try:
            tmp.rename(dst)
        except OSError:
            if not dst.is_dir():
                raise
        fsync_dir(dst.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_between_markers(path: Path, begin: str, end: str, body: str) -> bool:
    """Replace what lies between the lines `begin` and `end` in the text file `path` with `body` (documents whose
    figures a script writes); False when a marker is missing."""
    text = Path(path).read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    write_text(Path(path), f"{head}{begin}\n{body}\n{end}{tail}")
    return True
