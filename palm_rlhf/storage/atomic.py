"""Atomic writes: a file or a whole directory is written under a temporary name beside its
target and then swapped into place (one atomic exchange on Linux, see `replace_dir_atomic`), so
an interrupted save never leaves a half-written file, or no file, where a good one was.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_stream_atomic(path: str | Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write a file through `fill(handle)` into a temporary sibling, fsync, then rename: readers
    see the old file or the new one, never half of one (streamed, so a large file need not fit
    in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """`write_stream_atomic` for bytes already in memory."""
    write_stream_atomic(path, lambda handle: handle.write(data))


def replace_dir_atomic(
    directory: str | Path, fill: Callable[[Path], None], owned_names: Iterable[str]
) -> None:
    """Build a directory with `fill(tmp_dir)` and swap it in place of `directory`.

    An existing directory is only replaced if every file in it is one this kind of checkpoint
    writes (`owned_names`); anything else in it is the user's, and we refuse rather than lose it.

    The new directory is built in full beside the target, as `.{name}.tmp-*`, and fsynced. An
    existing target is then exchanged with it in one `renameat2(RENAME_EXCHANGE)` call, so at
    every instant `directory` is the complete old checkpoint or the complete new one; the old
    one, now under the temporary name, is deleted afterwards. Where the exchange is unavailable
    (not Linux, glibc before 2.28, a filesystem that refuses it) the old directory is renamed
    away to `.{name}.old-*` and the new one renamed into place: that fallback leaves a moment
    with nothing at `directory`, though never a partial checkpoint.

    A process killed mid-save can leave a `.{name}.tmp-*` (a partial new directory, or the old
    one after the exchange) or `.{name}.old-*` sibling. They are left for the user to delete:
    their hidden names keep them out of every lookup (`from_pretrained` reads only `directory`,
    checkpoint rotation globs `step_*`), and without a lock a stale leftover cannot be told
    apart from the directory another live process is saving right now.
    """
    directory = Path(directory)
    _check_overwritable(directory, set(owned_names))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        fill(tmp)
        _fsync_files_and_dir(tmp)
        _swap_into_place(tmp, directory)
    except BaseException:
        # Before the swap tmp is the partial new directory; after an exchange it is the old one.
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_overwritable(directory: Path, owned: set[str]) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory")
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in owned)
    if foreign:
        raise ValueError(
            f"{directory}: refusing to overwrite a directory holding other files {foreign}; "
            "save to an empty or new directory"
        )


def _swap_into_place(tmp: Path, directory: Path) -> None:
    """Move the finished `tmp` to `directory`, replacing whatever checkpoint is there."""
    if not directory.exists():
        os.rename(tmp, directory)
        _fsync_dir(directory.parent)
    elif exchange_paths(tmp, directory):
        # Make the new entry durable before deleting the only other copy of the old checkpoint.
        _fsync_dir(directory.parent)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(directory, old)
        try:
            os.rename(tmp, directory)
        except BaseException:
            os.rename(old, directory)  # put the old checkpoint back rather than leave nothing
            raise
        _fsync_dir(directory.parent)
        shutil.rmtree(old, ignore_errors=True)


# From <linux/fs.h> and <fcntl.h>: swap the two names; paths are relative to the working dir.
RENAME_EXCHANGE = 2


AT_FDCWD = -100


# How renameat2 says "not here": a kernel before 3.15 or a libc stub (ENOSYS), a filesystem
# without exchange support (EINVAL; EOPNOTSUPP from some FUSE and network filesystems).
_EXCHANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's renameat2 (2.28+), or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    path, fd = ctypes.c_char_p, ctypes.c_int
    function.argtypes = [fd, path, fd, path, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange_paths(first: str | Path, second: str | Path) -> bool:
    """Atomically swap the two existing paths, so each name now holds what the other held.

    Returns False, having changed nothing, where the system cannot exchange (see
    `_EXCHANGE_UNSUPPORTED`); any other failure (a missing path, no permission) raises OSError.
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    first_bytes, second_bytes = os.fsencode(first), os.fsencode(second)
    if renameat2(AT_FDCWD, first_bytes, AT_FDCWD, second_bytes, RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_UNSUPPORTED:
        return False
    # OSError picks the subclass from the code (FileNotFoundError, PermissionError, ...).
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _fsync_files_and_dir(path: Path) -> None:
    """fsync every file directly in `path` (checkpoints are flat), then `path` itself."""
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    """fsync a directory's entries (the names in it), not the files they point to."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
