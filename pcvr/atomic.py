"""Files and folders written atomically: a reader sees the old version or the new one, never a
half-written one, and never nothing.

Everything is first written under a temporary name in the destination's folder, flushed to
disk (``fsync`` of the files and of the folder, so that a power loss is covered too) and then
renamed into place. A folder that already exists is replaced without a gap: the two are swapped
in one step (Linux ``renameat2(RENAME_EXCHANGE)``) or, where that is not available, the old one
is moved aside, the new one renamed in, and only then is the old one deleted (a reader may then
miss the folder for the instant between the two renames). Temporary names start with
``TMP_PREFIX``, so that a run killed half-way leaves debris that ``remove_stale`` finds.

Written files and folders get the modes an ordinary ``open()`` / ``os.makedirs`` would give
under the process umask (``tempfile`` creates them private, 0600 / 0700, which a platform or
scorer reading them as another user cannot open).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".tmp-old-"


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status", "r", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it, then put it back
    os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    """Flushes a folder's entries (renames, new files) to disk; a no-op where folders cannot
    be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """``fsync`` of every file under ``path``, then of every folder, deepest first."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(root)


def _exchange(a: str, b: str) -> bool:
    """Swaps two paths in one step (``renameat2`` with ``RENAME_EXCHANGE``); False where the C
    library, kernel or file system does not offer it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def atomic_write_json(path: str, obj: Any, indent: Optional[int] = None) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically, with the umask's file mode."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=indent)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_dir(final_path: str) -> Iterator[str]:
    """Yields a temporary folder beside ``final_path``; on success it replaces
    ``final_path`` without a gap (module docstring), on an exception it is removed.

    Args:
        final_path: the folder to create or replace.
    """
    final_path = os.path.abspath(final_path)
    parent, name = os.path.split(final_path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{name}-")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.path.exists(final_path):
        os.replace(tmp, final_path)
        fsync_dir(parent)
    elif _exchange(tmp, final_path):
        fsync_dir(parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
    else:
        old = tempfile.mkdtemp(dir=parent, prefix=f"{OLD_PREFIX}{name}-")
        os.replace(final_path, os.path.join(old, name))  # aside: the old one stays readable
        os.replace(tmp, final_path)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(folder: str) -> List[str]:
    """Removes the temporary files and folders that an interrupted write left in ``folder``
    (names starting with ``TMP_PREFIX``); returns their names."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(TMP_PREFIX):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(name)
    return removed
