"""The filesystem side of profiles: a lock on the directory, atomic writes, and one
``ProfileError`` line (path, problem, fix) for every ``OSError`` on the way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Any
from collections.abc import Iterator
from pathlib import Path

from ..errors import ProfileError

fcntl: Any
try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

PROFILE_DIR_ENV = "AUTOTUNE_PROFILE_DIR"
ELSEWHERE = f"pass --profile-dir DIR (or set {PROFILE_DIR_ENV}) to use another directory"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock for writers of ``path``, released when the block ends."""
    if fcntl is None:  # no flock on this platform: writes stay atomic, merges may race
        yield
        return
    try:
        fd = _lock_fd(path)
    except OSError as exc:
        raise fs_error(exc, path.parent, "write") from None
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _lock_fd(path: Path) -> int:
    """flock the profile directory itself, so no lock file lands among the profiles teams
    commit; where a directory cannot be locked (some network filesystems), a hidden file."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    except OSError:
        os.close(fd)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomic(path: Path, text: str) -> None:
    """Temporary file beside path, fsync, rename: the old file stays whole until the new one
    is, and on any failure (disk full, interrupt) the temporary file is removed."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise fs_error(exc, path.parent, "write") from None
    try:
        try:
            write_all(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise fs_error(exc, path, "write") from None
        raise


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def make_dir(folder: Path) -> Path:
    """The profile directory, created with its parents if missing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fs_error(exc, folder, "create") from None
    return folder


def fs_error(exc: OSError, path: Path, action: str) -> ProfileError:
    """One line for a filesystem failure: the path, what went wrong, and the fix.

    action: "read" a profile file, "list" or "create" the directory, "write" a file or into
    the directory (path is what the message names).
    """
    code, fix = exc.errno, ELSEWHERE
    if code in (errno.ENOTDIR, errno.EEXIST):  # a regular file where a directory should be
        path = next((p for p in (path, *path.parents) if _is_file(p)), path)
        return ProfileError(path, None, f"is a file, not a directory: remove it or {fix}")
    if code == errno.EISDIR:
        return ProfileError(path, None, f"is a directory, not a profile file: remove it or {fix}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ProfileError(path, None, f"disk full while writing ({exc.strerror}): free space "
                                        f"there or {fix}; the previous profile, if any, is kept")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "read-only filesystem" if code == errno.EROFS else "permission denied"
        problem = {"read": f"cannot read ({reason}): make it readable",
                   "list": f"cannot read this directory ({reason}): make it readable",
                   "create": f"cannot create this directory ({reason}): make its parent "
                             "writable"}.get(action, f"cannot write here ({reason}): make it "
                                                     "writable")
        return ProfileError(path, None, f"{problem} or {fix}")
    return ProfileError(path, None, f"cannot {action} ({exc.strerror or exc}): {fix}")


def _is_file(path: Path) -> bool:
    try:
        return path.exists() and not path.is_dir()
    except OSError:  # an unreadable parent: not the one to name
        return False
