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

A signal that stops the process cleanly (`stop_on_signals`: SIGINT, SIGTERM) is held back while
a swap and its clean-up run, so a stop never leaves a staging folder behind; a second signal
forces the stop at once (and the next write or read recovers, as after a kill).

`exclusive(path)` keeps a second process from using a folder while one does (a run's
`--checkpoint`): a lock file beside it, `.NAME.splitpeft-owner.lock`, flock'ed for the owner's
life (so a crash never leaves a stale lock) and removed when the owner is done.

`writing(path)` turns an operating-system error while writing (disk full, permissions, quota; also
safetensors' own error type for them) into one `WriteError` line naming `path` and the errno.

Written by hand: no maintained library swaps a folder atomically (`os.replace` cannot replace a
non-empty folder, and Linux's RENAME_EXCHANGE is not exposed by Python).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

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
def atomic_folder(path: Path, before_swap: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a staging folder beside `path`; on success it replaces `path` (see the module
    docstring), on any error it is removed and `path` is left as it was.

    `before_swap` runs after the staging folder is flushed, just before `path` is moved aside: an
    error it raises leaves `path` as it is (a caller checks there that `path` is still what it
    may replace, after however long filling and flushing took).

    Raises FileExistsError if `path` exists and is not a folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if os.path.lexists(path) and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    ident, fd = _take_lock(path)
    staging, old = _sibling(path, ident, PARTIAL), _sibling(path, ident, OLD)
    filled = False
    try:
        with writing(path):
            staging.mkdir(mode=0o700)
        yield staging
        filled = True
    finally:  # success or not: the old folder goes only if the new one is in place
        with holding_stops():
            try:
                if filled:
                    with writing(path):
                        _fsync_tree(staging)
                    if before_swap is not None:
                        before_swap()
                    with writing(path):
                        if os.path.lexists(path):
                            os.rename(path, old)
                        os.rename(staging, path)
                        _fsync(path.parent)
            finally:
                _finish(path, ident)
                os.close(fd)


# ------------------------------------------------------------------------------------ write errors


class WriteError(OSError):
    """Writing a folder failed for a reason of the system (disk full, permissions, quota): one
    line naming the folder and the errno (also in `.errno`); what the folder held before is intact."""

    def __init__(self, number: int, message: str) -> None:
        super().__init__(message)  # str() is the message alone
        self.errno = number


def _os_errno(error: BaseException) -> int | None:
    """The errno of an OSError, or of a safetensors error, whose text carries `(os error N)`."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"\(os error (\d+)\)", str(error))
    return int(found.group(1)) if found else None


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Raise every OSError inside this block (and safetensors' SafetensorError, which is what it
    raises for a failed write) as one WriteError line: "cannot write PATH: [Errno 28] No space
    left on device"."""
    from safetensors import SafetensorError

    try:
        yield
    except WriteError:
        raise
    except (OSError, SafetensorError) as error:
        number = _os_errno(error)
        why = f"[Errno {number}] {os.strerror(number)}" if number is not None else " ".join(str(error).split())
        raise WriteError(number or errno.EIO, f"cannot write {path}: {why}") from error


# ------------------------------------------------------------------------------------ one owner


OWNER_LOCK = ".splitpeft-owner.lock"


class FolderInUse(OSError):
    """Another live process holds `exclusive(path)` (one line: str() is the message alone)."""


def owner_lock(path: Path) -> Path:
    """The lock file of `exclusive(path)`: beside `path`, since inside it would be swapped away."""
    return path.parent / f".{path.name}{OWNER_LOCK}"


@contextmanager
def exclusive(path: Path, what: str = "folder") -> Iterator[None]:
    """Hold `path` for this process until the block ends; raise FolderInUse (one line naming
    `what`, the path and the holder's process id) if another process holds it.

    The lock file is flock'ed, so it is free the instant its holder dies (SIGKILL included) and a
    file left by a dead holder is simply taken over; the holder removes it when done."""
    path = Path(path)
    lock = owner_lock(path)
    with writing(lock):
        path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with writing(lock):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise FolderInUse(f"{what} {path} is in use by another run (process {holder or '?'}); "
                              "wait for it to end or choose another folder") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its last holder removed it between our open and our lock: take a fresh one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with holding_stops():
            lock.unlink(missing_ok=True)  # while still locked, so that the next holder makes a fresh file
            os.close(fd)


# ------------------------------------------------------------------------------------ clean stops


class Stopped(BaseException):
    """SIGINT or SIGTERM asked the process to stop. A BaseException, as KeyboardInterrupt is, so
    that no `except Exception` swallows it; `exit_status` is 128 + the signal's number. Whoever
    knows where the stop left things adds it in `notes`."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_status = 128 + signum
        self.notes: dict[str, object] = {}
        super().__init__(f"stopped by {self.signal_name}")


_installed = False  # stop_on_signals is active
_held = 0  # depth of holding_stops blocks (main thread)
_pending: int | None = None  # a signal that arrived inside one, not raised yet
_stopping = False  # Stopped was raised: a further signal forces the stop


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    global _pending, _stopping
    if _stopping or _pending is not None:  # a second signal: stop now, whatever is half done
        signal.signal(signum, signal.SIG_DFL)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)
        return
    if _held:
        _pending = signum
        return
    _stopping = True
    raise Stopped(signum)


@contextmanager
def holding_stops() -> Iterator[None]:
    """A first stop signal that arrives inside this block is raised (as `Stopped`) when the
    outermost such block ends normally, so that what it writes is finished, never half done."""
    global _held, _pending, _stopping
    if threading.current_thread() is not threading.main_thread():  # signals are only handled there
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if _held == 0 and _pending is not None and _installed:
        signum, _pending, _stopping = _pending, None, True
        raise Stopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside this block the first SIGINT or SIGTERM raises `Stopped` (at once, or at the end of
    a `holding_stops` block in progress); a second one stops the process as if this were not
    there. Does nothing outside the main thread, where Python cannot handle signals."""
    global _installed, _pending, _stopping
    if threading.current_thread() is not threading.main_thread() or _installed:
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    _installed, _pending, _stopping = True, None, False
    for signum in previous:
        signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _installed, _pending, _stopping = False, None, False
