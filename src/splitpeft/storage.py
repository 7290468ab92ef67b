"""Writing folders so that a crash at any instant leaves the old folder or the new one, complete.

`atomic_folder(path)` writes beside `path` and swaps by rename; the old folder is removed only
once the new one is in place::

    .NAME.splitpeft-ID.lock      created first, locked (flock) while the writer lives, removed last
    .NAME.splitpeft-ID.partial   the staging folder the caller fills (then fsync'ed)
    1. NAME -> .NAME.splitpeft-ID.old          (if NAME exists)
    2. .NAME.splitpeft-ID.partial -> NAME
    3. remove .NAME.splitpeft-ID.old, then the lock

The lock file is splitpeft's marker: only siblings whose ID has a lock file with splitpeft's
text are ever touched, and only when no live process holds that lock (the kernel drops a flock
when its process dies, SIGKILL included); an empty lock file nobody holds (its writer died
before writing the text, so before making anything else) is removed alone. `recover(path)` finishes what such a dead writer left:
its `.old` folder becomes NAME again if NAME is missing (killed between steps 1 and 2), else it is
removed; its staging folder and lock go. Every write and every checkpoint read recovers first.

Written by hand: no maintained library swaps a folder atomically (`os.replace` cannot replace a
non-empty folder, and Linux's RENAME_EXCHANGE is not exposed by Python).
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK, PARTIAL, OLD = ".lock", ".partial", ".old"
LOCK_TEXT = b"splitpeft: staging lock of an atomic folder write\n"
_ID = re.compile(r"[0-9a-f]{16}")


def _sibling(path: Path, ident: str, suffix: str) -> Path:
    return path.parent / f".{path.name}.splitpeft-{ident}{suffix}"


def _writer_ids(path: Path) -> list[str]:
    """IDs of the lock files beside `path` (live writers' and dead ones')."""
    prefix = f".{path.name}.splitpeft-"
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    ids = [name[len(prefix):-len(LOCK)] for name in names if name.startswith(prefix) and name.endswith(LOCK)]
    return sorted(ident for ident in ids if _ID.fullmatch(ident))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` so that the rename publishes written data."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def recover(path: Path) -> None:
    """Finish every write to `path` whose writer died (see the module docstring)."""
    path = Path(path)
    for ident in _writer_ids(path):
        lock = _sibling(path, ident, LOCK)
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:  # finished or recovered meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its writer is alive
                continue
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino  # not removed by another recovery
            except FileNotFoundError:
                continue
            text = os.read(fd, len(LOCK_TEXT) + 1) if same else None
            if text == LOCK_TEXT:
                _finish(path, ident)
            elif text == b"":  # its writer died before writing the text, so before making anything else
                lock.unlink()
        finally:
            os.close(fd)


def _finish(path: Path, ident: str) -> None:
    """Clean up after writer `ident` (whose lock the caller holds), wherever it stopped."""
    old = _sibling(path, ident, OLD)
    if os.path.lexists(old):
        if os.path.lexists(path):  # stopped after the new folder was in place
            _remove(old)
        else:  # stopped between the two renames: the old folder is still the current one
            os.rename(old, path)
    _remove(_sibling(path, ident, PARTIAL))
    _sibling(path, ident, LOCK).unlink(missing_ok=True)


def _take_lock(path: Path) -> tuple[str, int]:
    """A fresh writer ID for `path` and the descriptor holding its lock."""
    while True:
        ident = secrets.token_hex(8)
        lock = _sibling(path, ident, LOCK)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, LOCK_TEXT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return ident, fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a recovery took it for a dead writer's in the instant before the lock: retry


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a staging folder beside `path`; on success it replaces `path` (see the module
    docstring), on any error it is removed and `path` is left as it was.

    Raises FileExistsError if `path` exists and is not a folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if os.path.lexists(path) and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    ident, fd = _take_lock(path)
    staging, old = _sibling(path, ident, PARTIAL), _sibling(path, ident, OLD)
    try:
        staging.mkdir(mode=0o700)
        yield staging
        _fsync_tree(staging)
        if os.path.lexists(path):
            os.rename(path, old)
        os.rename(staging, path)
        _fsync(path.parent)
    finally:  # success or not: the old folder goes only if the new one is in place
        _finish(path, ident)
        os.close(fd)
