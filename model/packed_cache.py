"""A model file's packed projections kept on disk between starts, and memory-mapped at the next one.

Why: loading GPT-2 1.5B spends most of its time writing 6 GB of packed weights into memory the process has never
touched (docs/PERFORMANCE.md: 0.3-1.9 GB/s on a VM, against 13-15 GB/s for pages already touched). The packed
panels written once to a file and mapped at the next start come from the page cache: no packing and no fresh
memory. The step graph reads such Parameters in place: `Parameter.set_data(Tensor.from_numpy(view))` shares the
array's memory (`Parameter(Tensor(array))` would copy it). The mapping is private (copy-on-write), so nothing the
process does can change the file.

The file is written after a load that packed the weights itself (`write_pending`: the server starts it once it
serves, with a pause that lets a piece go only while no request runs), by a background thread, under a temporary
name, then linked to its name once complete
(never replacing a file another process may have mapped). Its name is a hash of the weights file (path, inode,
size, modification and change times: copying a file, even with its times kept, gives it a new change time; and
its first 1 MB, the safetensors header), the packed form, the panel width, the kernel library (its source and
build flags) and this format's version. A load also packs the first 32 rows of every projection from the weights
file and compares them with the mapped bytes before using the file. At most MAX_FILES are kept, the least
recently used removed first; a process holds a shared lock on each file it maps and on the temporary file it
writes, so that another never removes a file in use (and removes a temporary file whose writer died). Put the
directory on a local filesystem (or one volume per host): a mapping is read lazily. GPT2_PACKED_CACHE names the
directory (default ~/.cache/gpt2-mindspore/packed); GPT2_PACKED_CACHE=0 turns it off. It costs disk: as much as
the float32 projections (GPT-2 124M: 0.34 GB, 1.5B: 5.9 GB).

Layout: an 8-byte little-endian header length, a JSON header {"key", "tensors": {name: {"dtype", "shape",
"offset"}}}, then each tensor's bytes at a page-aligned offset.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

ENV = "GPT2_PACKED_CACHE"
VERSION = 1
MAX_FILES = 4
# Bytes written between two calls of write's pause (a server's waits for it to be idle): how much writing a request
# that arrives meanwhile runs beside.
PIECE = 8 << 20
_ALIGN = 4096
_DTYPES = ("float32", "int32")  # the panels' and the AMX packing's
_held: dict[str, object] = {}  # path -> open file this process holds a shared lock on (a file it maps)


def cache_dir() -> Path | None:
    """The cache's directory, or None when GPT2_PACKED_CACHE turns it off."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() in ("0", "false", "no", "off"):
        return None
    return Path(env) if env else Path.home() / ".cache" / "gpt2-mindspore" / "packed"


def cache_key(weights: str, form: str, panel_width: int, library: str | None) -> str:
    """What the packed file depends on: the weights file (path, inode, size, mtime, ctime, its first 1 MB: a
    safetensors header names every tensor with its shape and offsets), the packed form, the panel width and the
    kernel library's file name (a hash of its source, flags and the CPU's features)."""
    st = os.stat(weights)
    h = hashlib.sha256(f"v{VERSION} {os.path.realpath(weights)} {st.st_ino} {st.st_size} {st.st_mtime_ns} "
                       f"{st.st_ctime_ns} {form} {panel_width} {os.path.basename(library or '')}".encode())
    with open(weights, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:24]


def path_for(key: str) -> Path | None:
    d = cache_dir()
    return None if d is None else d / f"{key}.packed"


def load(key: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
    """The cached arrays for `key`, memory-mapped copy-on-write, if a complete file has exactly these tensors
    (name -> shape); None otherwise (no file, another key, damaged: the caller packs as usual)."""
    path = path_for(key)
    if path is None or not path.is_file():
        return None
    held = None
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(size - 8, 1 << 26):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        tensors = header["tensors"]
        if header.get("key") != key or set(tensors) != set(shapes):
            return None
        for name, t in tensors.items():  # all checked before anything is mapped
            shape, offset = tuple(t["shape"]), int(t["offset"])
            if shape != tuple(shapes[name]) or t["dtype"] not in _DTYPES or offset % _ALIGN:
                return None
            if offset + np.dtype(t["dtype"]).itemsize * int(np.prod(shape)) > size:
                raise ValueError(f"{name} runs past the end of the file")
        held = open(path, "rb")  # noqa: SIM115 - held for the process's lifetime (see _trim)
        fcntl.flock(held, fcntl.LOCK_SH)
        out = {name: np.memmap(path, dtype=np.dtype(t["dtype"]), mode="c", offset=int(t["offset"]),
                               shape=tuple(t["shape"])) for name, t in tensors.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("packed cache %s unreadable (%s): packing the weights instead", path, e)
        if held is not None:
            held.close()  # not mapped: its lock must not keep the file from being trimmed
        return None
    if str(path) in _held:
        held.close()  # mapped before: already held
    else:
        _held[str(path)] = held
    try:
        os.utime(path)  # most recently used (a read-only cache is used all the same)
    except OSError:
        pass
    return out


def release(key: str, arrays: dict[str, np.ndarray]) -> None:
    """Give up a load's arrays that will not be used (they failed the check against the weights file): unmap them
    and drop this process's lock on the file."""
    for a in arrays.values():
        mm = getattr(a, "_mmap", None)
        if mm is not None:
            try:
                mm.close()
            except (BufferError, ValueError):
                pass
    held = _held.pop(str(path_for(key)), None)
    if held is not None:
        held.close()


def write(key: str, arrays: dict[str, np.ndarray], pause: Callable[[], None] | None = None) -> Path | None:
    """Write `arrays` as the file for `key` (under a temporary name, then linked to its own; a file already there
    is kept); unlocked files beyond MAX_FILES are removed. pause, if given, is called before each piece of at most
    PIECE bytes (a server's: it returns once no request is running). Returns the path, or None when the cache is
    off or the write failed (logged, not raised)."""
    path = path_for(key)
    if path is None:
        return None
    tmp = path.with_name(f".{path.name}.tmp-{os.urandom(8).hex()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # another process wrote it meanwhile
            return path
        tensors, offset = {}, 0
        for name, a in arrays.items():
            tensors[name] = {"dtype": str(a.dtype), "shape": list(a.shape), "offset": offset}
            offset += -(-a.nbytes // _ALIGN) * _ALIGN
        # the data starts at a page boundary after the header, with room for each offset to grow by 20 digits
        size = len(json.dumps({"key": key, "tensors": tensors})) + 20 * len(tensors)
        base = -(-(8 + size) // _ALIGN) * _ALIGN
        for t in tensors.values():
            t["offset"] += base
        header = json.dumps({"key": key, "tensors": tensors}).encode()
        with open(tmp, "wb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # in use: _trim leaves it alone
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for name, a in arrays.items():
                f.seek(tensors[name]["offset"])
                data = memoryview(np.ascontiguousarray(a)).cast("B")
                for i in range(0, len(data), PIECE):
                    if pause is not None:
                        pause()
                    f.write(data[i : i + PIECE])
            f.flush()
            os.fsync(f.fileno())
            try:  # a new name, never over a file that another process may have mapped
                os.link(tmp, path)
            except FileExistsError:
                pass
        tmp.unlink()
        _trim(path.parent)
        return path
    except OSError as e:
        log.warning("could not write the packed cache %s: %s", path, e)
        try:
            tmp.unlink()
        except OSError:
            pass
        return None


class Pending(NamedTuple):
    """A load's packed arrays not yet in the cache (model.packed_cache_pending): keep_alive holds the Parameters
    that own their memory."""

    key: str
    arrays: dict[str, np.ndarray]
    keep_alive: list


def write_pending(model, pause: Callable[[], None] | None = None) -> threading.Thread | None:
    """Write the packed arrays that `model`'s load left for the cache (load_model_dir(pack=) with the cache on and
    no file yet) on a daemon thread, once, pausing before each piece with `pause` (see write): the server calls
    this once it serves, with a pause that waits for it to be idle, so that the writing neither competes with
    compiling nor slows requests. None when there is nothing to write."""
    pending = getattr(model, "packed_cache_pending", None)
    if pending is None:
        return None
    packing = getattr(model, "packing", None)  # a deferred load's (model.checkpoint): its arrays are complete only then
    if packing is not None:
        packing.result()
    model.packed_cache_pending = None
    # At the process's CPU priority, not lower: a thread at nice 19 that the kernel preempts while it holds the GIL
    # (a nice-0 thread waking up preempts it at once) stalls every Python thread until it runs again.
    t = threading.Thread(target=write, args=(pending.key, pending.arrays, pause), name="packed-cache-writer",
                         daemon=True)
    t.keep_alive = pending.keep_alive  # the arrays' memory lives as long as the thread object
    t.start()
    return t


def _trim(d: Path) -> None:
    # Keep the MAX_FILES most recently used files and remove the temporary files of writers that are gone: only
    # files that no process holds a lock on (a process holds one on each file it maps or is writing).
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    files = sorted(d.glob("*.packed"), key=mtime, reverse=True)
    for p in files[MAX_FILES:] + list(d.glob(".*.packed.tmp-*")):
        try:
            with open(p, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                p.unlink()
        except OSError:  # locked (in use), or gone already
            pass
