"""Writing users' files atomically: a temp file beside the target, fsynced, renamed over it.

A temp file is named ``.{name}.{16 hex digits}.tmp`` and sits in the directory of
the file it will replace. Its writer holds an exclusive ``flock`` on it until the
rename, so a later save of the same file can tell a dead writer's leftover (it can
take the lock) from a live one's and remove it. Without ``fcntl`` (Windows),
leftovers older than an hour are removed instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from edgemm.runtime.errors import InputError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_STALE_AGE_S = 3600  # without fcntl, a temp file this old is taken for a dead writer's


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, what: str = "file") -> Path:
    """Write ``path`` through ``write(f)`` so that readers see the old file or the whole new one.

    A symlink is followed: its target is replaced and the link stays. Temp files
    that killed writers left for the same file are removed first. A SIGTERM
    during the write (when this is the main thread and SIGTERM has its default
    action) removes the temp file and then terminates the process as usual.

    Args:
        path: Destination; its directory must exist.
        write: Writes the contents to the open binary file it is given.
        what: How to name the file in error messages (``"index"``, ``"embeddings"``).

    Returns:
        ``path`` (as a ``Path``; if it is a symlink, its target was written).

    Raises:
        InputError: The directory does not exist; ``path`` is a directory, FIFO,
            device or other non-regular file; or the filesystem refused the write
            (permissions, full disk, ...). The message names ``path`` as given and
            the system's reason; no temp file is left behind. The ``OSError`` is
            the ``__cause__``.
    """
    real = Path(os.path.realpath(path))
    shown = repr(str(path)) + (f" (a link to {str(real)!r})" if os.path.islink(path) else "")

    def fail(why: str) -> InputError:
        return InputError(f"Cannot save {what} to {shown}: {why}.")

    parent = real.parent
    if not parent.is_dir():
        raise fail(f"{str(parent)!r} is not a directory" if parent.exists()
                   else f"directory {str(parent)!r} does not exist")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise fail(e.strerror or str(e)) from e
    if mode is not None and not stat.S_ISREG(mode):
        raise fail("it is a directory; give a file path" if stat.S_ISDIR(mode)
                   else f"it is a {_kind(mode)}, not a regular file; give the path of a regular file")
    try:
        with _sigterm_cleans_up():
            _remove_stale_temps(real)
            _write_and_replace(real, write, None if mode is None else stat.S_IMODE(mode))
    except OSError as e:
        raise fail(f"{e.strerror or e}; check the directory's permissions and free space, "
                   "or choose another path") from e
    fsync_dir(parent)
    return Path(path)


def _write_and_replace(real: Path, write: Callable[[BinaryIO], None], mode: int | None) -> None:
    fd, tmp = _create_temp(real)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)  # replacing a file keeps its permissions
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:
                os.replace(tmp, real)  # still locked, so no cleaner can take it for a dead writer's
        if fcntl is None:
            os.replace(tmp, real)  # Windows cannot rename an open file
    except BaseException:
        # BaseException too: Ctrl-C or SIGTERM must not leave a temp file behind.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _create_temp(real: Path) -> tuple[int, Path]:
    """Create and lock a new temp file beside ``real``."""
    while True:
        tmp = real.with_name(f".{real.name}.{secrets.token_hex(8)}.tmp")
        # 0o666 minus the umask: the saved file gets the permissions a plain open() would give it.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, tmp
        # A cleaner locked it between our create and lock, took it for a leftover and removed it.
        os.close(fd)


def _remove_stale_temps(real: Path) -> None:
    """Remove temp files for ``real`` whose writers died (kill -9, power loss)."""
    pattern = re.compile(rf"\.{re.escape(real.name)}\.[0-9a-f]{{16}}\.tmp")
    try:
        names = os.listdir(real.parent)
    except OSError:
        return  # a directory we may write but not list: cleaning is a courtesy, not a reason to fail
    for name in names:
        if pattern.fullmatch(name):
            with contextlib.suppress(OSError):  # someone else's file, or gone meanwhile: leave it
                _remove_if_dead(real.parent / name)


def _remove_if_dead(tmp: Path) -> None:
    if fcntl is None:
        if time.time() - tmp.stat().st_mtime > _STALE_AGE_S:
            tmp.unlink()
        return
    fd = os.open(tmp, os.O_RDWR)  # O_RDWR: NFS emulates flock with write locks
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its writer is alive
        # Our lock proves the writer dead, unless the name now belongs to another file.
        if os.path.samestat(os.fstat(fd), os.stat(tmp)):
            os.unlink(tmp)
    finally:
        os.close(fd)


class _Terminated(BaseException):
    """SIGTERM arrived during a write: unwinds through the temp-file cleanup."""


@contextlib.contextmanager
def _sigterm_cleans_up() -> Iterator[None]:
    """Turn SIGTERM into ``_Terminated`` for the block, then die of SIGTERM after the cleanup ran.

    Only where SIGTERM would kill the process outright anyway (main thread,
    default action); a program with its own handler keeps it.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # the exit status shows the signal, as without us
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device")]
    return next((name for test, name in kinds if test(mode)), "special file")


def fsync_dir(directory: Path) -> None:
    """Make a rename durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A hidden sibling directory to fill; on a clean exit it replaces ``out`` in one rename.

    An exception (or a killed process) leaves at most a hidden ``.<name>.tmp-*`` folder, never a half-written
    ``out``; an existing ``out`` is kept until the new one is complete.

    Raises:
        InputError: ``out`` exists and ``overwrite`` is off, or it is not a directory.
    """
    import shutil
    import uuid

    out = Path(out).absolute()
    if out.exists() and (not overwrite or not out.is_dir()):
        raise InputError(f"'{out}' exists{'' if out.is_dir() else ' and is not a directory'}; choose another path"
                         + (" or pass --force (overwrite=True)." if out.is_dir() else "."))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}" if out.exists() else None
        if old is not None:
            os.replace(out, old)
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
