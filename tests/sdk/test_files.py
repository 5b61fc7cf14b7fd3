"""Tests for edgemm._files.atomic_write: links, special files, filesystem errors, killed writers."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import edgemm._files as files_module
from edgemm._files import atomic_write
from edgemm._index import VectorIndex
from edgemm.runtime.errors import EdgemmError, InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals, FIFOs and symlinks")


def _writes(data: bytes):
    return lambda f: f.write(data)


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_writes_what_the_cli_writes(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "emb.npy"
    assert atomic_write(path, lambda f: np.save(f, arr), what="embeddings") == path
    np.testing.assert_array_equal(np.load(path), arr)
    assert os.listdir(tmp_path) == ["emb.npy"]


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write(tmp_path / "new", _writes(b"x"))
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o666 & ~umask
    (tmp_path / "new").chmod(0o640)
    atomic_write(tmp_path / "new", _writes(b"y"))
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o640


@posix_only
def test_a_symlink_is_followed_and_kept(tmp_path: Path) -> None:
    real_dir, link_dir = tmp_path / "data", tmp_path / "links"
    real_dir.mkdir()
    link_dir.mkdir()
    target = real_dir / "index.npz"
    VectorIndex(2).save(target)
    link = link_dir / "current.npz"
    link.symlink_to(target)

    seen: dict[str, list[str]] = {}

    def write(f) -> None:
        seen["data"], seen["links"] = _temps(real_dir), _temps(link_dir)
        f.write(b"new")

    atomic_write(link, write)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new"
    # The temp file sat beside the target, so the rename stayed on one filesystem.
    assert len(seen["data"]) == 1 and seen["data"][0].startswith(".index.npz.") and seen["links"] == []
    assert _temps(real_dir) == [] and _temps(link_dir) == []

    # Through a dangling link, the target is created; an index saves and loads through it.
    fresh = link_dir / "fresh.npz"
    fresh.symlink_to(real_dir / "created.npz")
    index = VectorIndex(3, metric="ip")
    index.add(np.eye(3), ids=["a", "b", "c"])
    index.save(fresh)
    assert fresh.is_symlink() and (real_dir / "created.npz").is_file()
    assert VectorIndex.load(fresh).ids == ["a", "b", "c"]


@posix_only
def test_special_files_are_refused_and_left_alone(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"Cannot save index to '.*pipe': it is a FIFO, not a regular file"):
        VectorIndex(2).save(fifo)
    link = tmp_path / "to-pipe"
    link.symlink_to(fifo)
    with pytest.raises(InputError, match=r"'.*to-pipe' \(a link to '.*pipe'\): it is a FIFO"):
        atomic_write(link, _writes(b"x"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="is a directory; give a file path"):
        atomic_write(tmp_path / "dir", _writes(b"x"))
    assert stat.S_ISFIFO(fifo.stat().st_mode) and _temps(tmp_path) == []


def test_a_full_disk_names_the_users_path_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "emb.npy"
    path.write_bytes(b"old")

    def write(f) -> None:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(EdgemmError) as info:
        atomic_write(path, write, what="embeddings")
    message = str(info.value)
    assert isinstance(info.value, InputError) and isinstance(info.value.__cause__, OSError)
    assert f"Cannot save embeddings to {str(path)!r}: No space left on device" in message
    assert ".tmp" not in message
    assert os.listdir(tmp_path) == ["emb.npy"] and path.read_bytes() == b"old"


@pytest.mark.parametrize("case", ["parent-is-a-file", "missing-directory", "unwritable"])
def test_unwritable_places_are_input_errors_naming_the_path(tmp_path: Path, case: str) -> None:
    (tmp_path / "file").write_bytes(b"")
    path, message = {
        "parent-is-a-file": (tmp_path / "file" / "i.npz", "'.*file' is not a directory"),
        "missing-directory": (tmp_path / "nope" / "i.npz", "directory '.*nope' does not exist"),
        # sysfs refuses new files even to root (read-only mounts give EROFS instead).
        "unwritable": (Path("/sys/edgemm-test.npz"), "(Permission denied|Read-only file system)"),
    }[case]
    if case == "unwritable" and not Path("/sys/kernel").is_dir():
        pytest.skip("needs Linux sysfs")
    with pytest.raises(InputError, match=f"Cannot save index to {str(path)!r}: {message}"):
        VectorIndex(2).save(path)
    assert not path.exists()


# The child starts a save and stalls in its write callback; the parent kills it.
_STALLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from edgemm._files import atomic_write

    def write(f):
        f.write(b"partial")
        f.flush()
        print("WRITING", flush=True)
        time.sleep(60)

    atomic_write(sys.argv[1], write)
    """
)


def _start_stalled_writer(path: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _STALLED_WRITER, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    line = child.stdout.readline().strip()
    assert line == "WRITING", f"child did not start writing: {line!r} {child.stderr.read()}"
    return child


@posix_only
def test_the_next_save_removes_temp_files_of_killed_writers_only(tmp_path: Path) -> None:
    path = tmp_path / "i.npz"
    path.write_bytes(b"old")
    # A leftover of another file whose name starts like ours: not ours to remove.
    other = tmp_path / f".i.npz.bak.{'0' * 16}.tmp"
    other.write_bytes(b"")

    killed = _start_stalled_writer(path)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    (dead,) = set(_temps(tmp_path)) - {other.name}
    alive = _start_stalled_writer(path)
    try:
        (live,) = set(_temps(tmp_path)) - {other.name, dead}
        atomic_write(path, _writes(b"new"))
        # The killed writer's temp file is gone; the live writer's (it holds its lock) stays.
        assert set(_temps(tmp_path)) == {other.name, live}
        assert path.read_bytes() == b"new"
    finally:
        alive.send_signal(signal.SIGKILL)
        alive.wait(timeout=30)
    atomic_write(path, _writes(b"newer"))
    assert _temps(tmp_path) == [other.name] and path.read_bytes() == b"newer"


def test_without_fcntl_only_old_temp_files_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows has no flock: there a temp file an hour old is taken for a dead writer's.
    monkeypatch.setattr(files_module, "fcntl", None, raising=False)
    old, recent = tmp_path / f".i.npz.{'a' * 16}.tmp", tmp_path / f".i.npz.{'b' * 16}.tmp"
    old.write_bytes(b"")
    recent.write_bytes(b"")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    atomic_write(tmp_path / "i.npz", _writes(b"new"))
    assert _temps(tmp_path) == [recent.name] and (tmp_path / "i.npz").read_bytes() == b"new"


@posix_only
def test_sigterm_mid_save_removes_the_temp_file_and_terminates(tmp_path: Path) -> None:
    path = tmp_path / "i.npz"
    path.write_bytes(b"old")
    child = _start_stalled_writer(path)
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGTERM
    assert os.listdir(tmp_path) == ["i.npz"] and path.read_bytes() == b"old"


@posix_only
def test_sigterm_handlers_are_restored_and_the_programs_own_kept(tmp_path: Path) -> None:
    seen = []
    atomic_write(tmp_path / "a", lambda f: seen.append(signal.getsignal(signal.SIGTERM)))
    assert seen[0] not in (signal.SIG_DFL, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def own(signum, frame) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        atomic_write(tmp_path / "b", lambda f: seen.append(signal.getsignal(signal.SIGTERM)))
        assert seen[1] is own and signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)
