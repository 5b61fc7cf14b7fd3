"""Writing users' files atomically: a temp file beside the target, fsynced, renamed over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from edgemm.runtime.errors import InputError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, what: str = "file") -> Path:
    """Write ``path`` through ``write(f)`` so that readers see the old file or the whole new one.

    Args:
        path: Destination; its directory must exist.
        write: Writes the contents to the open binary file it is given.
        what: How to name the file in error messages (``"index"``, ``"embeddings"``).

    Returns:
        The path written.

    Raises:
        InputError: The directory does not exist or ``path`` is a directory.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"Cannot save {what} to {str(path)!r}: directory {str(parent)!r} does not exist.")
    if path.is_dir():
        raise InputError(f"Cannot save {what} to {str(path)!r}: it is a directory; give a file path.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # BaseException too: a KeyboardInterrupt must not leave a temp file behind.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(parent)
    return path


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
