"""Atomic file and directory writes (`write_atomically`): the one implementation every writer here uses.

`write(tmp)` fills a temporary sibling of the destination (a file, or a directory), which is then renamed over
it, so a reader sees the old content or the new, never a half-written one, and a failed or interrupted write
leaves the destination as it was. Temporaries are named `.NAME.tmp-PID-XXXXXXXX` (`.NAME.old-PID-XXXXXXXX` for a
directory being replaced), so the next write to NAME removes those a killed process left behind.

Knows paths and processes only (no MindSpore, no numpy): model directories, training checkpoints, prepared
datasets and benchmark results are all written through it. Which destinations may be replaced is the caller's
rule, given as `check`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable

# Temporaries of earlier versions carry no PID; they count as stale once untouched for this long.
_UNOWNED_STALE_S = 3600.0

log = logging.getLogger(__name__)
_active_temporaries: set[str] = set()  # this process's temporaries still being written


def write_atomically(
    path: str | os.PathLike,
    write: Callable[[str], None],
    *,
    directory: bool = False,
    check: Callable[[str], None] | None = None,
) -> None:
    """`write(tmp)` fills a temporary sibling of `path` (a directory, or a file with the same extension), which
    then replaces `path`.

    `check(path)` runs before writing and again just before the rename (something may have appeared at `path`
    meanwhile); it raises to refuse the destination. Without it what is at `path` is replaced. Stale temporaries
    of `path` are removed first.
    """
    path = os.path.abspath(os.fspath(path))
    if check is not None:
        check(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary(path, "tmp", directory=directory)
    try:
        write(tmp)
        _apply_umask(tmp)
        if check is not None:
            check(path)
        if directory:
            _replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        _active_temporaries.discard(tmp)


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove the temporaries that writers of `path` killed mid-write left next to it; returns their paths.

    Only `.NAME.tmp-PID-*` / `.NAME.old-PID-*` whose process is gone count (this process's own count too
    unless still being written: a restarted container reuses PIDs), plus the PID-less names of earlier
    versions once untouched for an hour. When `path` itself is missing, a stale `.old-` directory is the
    previous content caught between the two renames of a replacement: it is moved back, not removed.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    ext = os.path.splitext(name)[1]
    pattern = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(?:(\d+)-)?[a-z0-9_]{{8}}(\.old)?"
                         rf"(?:{re.escape(ext)})?$")
    try:
        entries = sorted(os.listdir(parent))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        m = pattern.match(entry)
        full = os.path.join(parent, entry)
        if not m or full in _active_temporaries:
            continue
        # Another process may clean up at the same time; a failure here must not stop the write itself.
        try:
            if not _is_stale(full, m.group(2)):
                continue
            is_old = m.group(1) == "old" or m.group(3) is not None
            if is_old and os.path.isdir(full) and not os.path.lexists(path):
                os.rename(full, path)
                log.warning("restored %s from %s (a replacement of it was interrupted)", path, full)
                continue
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
        except OSError as e:
            log.warning("cannot remove stale temporary %s: %s", full, e)
            continue
        owner = f"process {m.group(2)}, no longer running" if m.group(2) else "an earlier version"
        log.warning("removed stale temporary %s (left by %s)", full, owner)
        removed.append(full)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 checks without signalling)."""
    if os.name != "posix":
        return True  # os.kill would terminate it on Windows: never call anything stale there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):  # not a valid process id
        return False
    return True


def _temporary(path: str, kind: str, *, directory: bool) -> str:
    parent, name = os.path.split(path)
    prefix = f".{name}.{kind}-{os.getpid()}-"
    if directory:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    else:
        # Same extension: MindSpore appends .ckpt to a checkpoint name without it.
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(name)[1], dir=parent)
        os.close(fd)
    _active_temporaries.add(tmp)
    return tmp


def _is_stale(path: str, pid: str | None) -> bool:
    if pid is None:
        return time.time() - _newest_mtime(path) > _UNOWNED_STALE_S
    return int(pid) == os.getpid() or not process_alive(int(pid))


def _newest_mtime(path: str) -> float:
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for entry in os.scandir(path):
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def _apply_umask(tmp: str) -> None:
    # mkstemp/mkdtemp create owner-only modes; what is written here is meant to be shared (a model directory
    # served by another user, copied into an image), so give it the modes a plain mkdir/open would.
    umask = os.umask(0)
    os.umask(umask)
    if not os.path.isdir(tmp):
        os.chmod(tmp, 0o666 & ~umask)
        return
    os.chmod(tmp, 0o777 & ~umask)
    for entry in os.scandir(tmp):
        os.chmod(entry.path, (0o777 if entry.is_dir(follow_symlinks=False) else 0o666) & ~umask)


def _replace_dir(tmp: str, path: str) -> None:
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    if not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    old = _temporary(path, "old", directory=True)
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    finally:
        _active_temporaries.discard(old)
    shutil.rmtree(old, ignore_errors=True)
