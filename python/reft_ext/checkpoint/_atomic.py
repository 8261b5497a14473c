"""Atomic directory writes: a checkpoint directory appears complete at its path, or the
path keeps what it held before (nothing, or the previous checkpoint)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(tmp: Path, path: Path) -> None:
    """Moves the finished directory tmp to path; an old checkpoint at path is replaced
    (renamed aside first, restored if the final rename fails, then deleted)."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_dir(path: Path, files: dict[str, bytes]) -> None:
    """Writes {file name: contents}, in order, into a temporary directory next to path
    and renames it into place when complete (each file and both directories fsynced); on
    any failure the temporary directory is removed and path is left as it was. The caller
    checks that path may be replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)      # mkdtemp makes it 0700; a plain mkdir would not
        subdirs = set()
        for name, data in files.items():     # a name may hold one level of subdirectory
            (tmp / name).parent.mkdir(exist_ok=True)
            subdirs.add((tmp / name).parent)
            _write_file(tmp / name, data)
        for d in subdirs:
            _fsync_dir(d)
        _replace_dir(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
