"""Crash-safe file writing: every file is written to a temporary name and renamed."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds.

    A crash inside the block leaves `path` as it was, never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file as 0600; give it the permissions a plain open() would.
    os.fchmod(handle, 0o666 & ~_current_umask())
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        with open(temporary_path, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, path)
    finally:
        temporary_path.unlink(missing_ok=True)


def atomic_copytree(source: str | Path, destination: str | Path) -> None:
    """Copy folder `source` to `destination`, which must not exist, through a hidden
    temporary folder beside it and a rename.

    A crash midway leaves no partial folder under `destination`, so a reader that finds
    it can trust it.
    """
    destination = Path(destination)
    temporary = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        shutil.copytree(source, temporary, dirs_exist_ok=True)
        os.rename(temporary, destination)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
