"""A model file's packed projections kept on disk between starts, and memory-mapped at the next one.

Why: loading GPT-2 1.5B spends most of its time writing 6 GB of packed weights into memory the process has never
touched (docs/PERFORMANCE.md: 0.3-1.9 GB/s on a VM, against 13-15 GB/s for pages already touched). The packed
panels written once to a file and mapped at the next start come from the page cache: no packing and no fresh
memory. The step graph reads such Parameters in place: `Parameter.set_data(Tensor.from_numpy(view))` shares the
array's memory (`Parameter(Tensor(array))` would copy it). The mapping is private (copy-on-write), so nothing the
process does can change the file.

The file is written after a load that packed the weights itself (`write_pending`: the server calls it once its
graphs are compiled), by a background thread, under a temporary name that is renamed once complete. Its name is a hash of the model file
(path, size, modification time, and its safetensors header), the packed form, the panel width and this format's
version: a changed model file, another form or another machine's vector width gets another file. At most
MAX_FILES are kept, the least recently used removed first (only files of this cache). GPT2_PACKED_CACHE names the
directory (default ~/.cache/gpt2-mindspore/packed); GPT2_PACKED_CACHE=0 turns it off. It costs disk: as much as
the float32 projections (GPT-2 124M: 0.34 GB, 1.5B: 5.9 GB).

Layout: an 8-byte little-endian header length, a JSON header {"key", "tensors": {name: {"dtype", "shape",
"offset"}}}, then each tensor's bytes at a page-aligned offset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

ENV = "GPT2_PACKED_CACHE"
VERSION = 1
MAX_FILES = 4
_ALIGN = 4096
_DTYPES = ("float32", "int32", "uint32")


def cache_dir() -> Path | None:
    """The cache's directory, or None when GPT2_PACKED_CACHE turns it off."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() in ("0", "false", "no", "off"):
        return None
    return Path(env) if env else Path.home() / ".cache" / "gpt2-mindspore" / "packed"


def cache_key(weights: str, form: str, panel_width: int) -> str:
    """What the packed file depends on: the weights file (path, size, mtime, its first 1 MB: a safetensors header
    names every tensor with its shape and offsets), the packed form and the panel width."""
    st = os.stat(weights)
    h = hashlib.sha256(f"v{VERSION} {os.path.realpath(weights)} {st.st_size} {st.st_mtime_ns} {form} "
                       f"{panel_width}".encode())
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
        out = {name: np.memmap(path, dtype=np.dtype(t["dtype"]), mode="c", offset=int(t["offset"]),
                               shape=tuple(t["shape"])) for name, t in tensors.items()}
        os.utime(path)  # most recently used
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("packed cache %s unreadable (%s): packing the weights instead", path, e)
        return None


def write(key: str, arrays: dict[str, np.ndarray]) -> Path | None:
    """Write `arrays` as the file for `key` (temporary name, then renamed); older files beyond MAX_FILES are
    removed. Returns the path, or None when the cache is off or the write failed (logged, not raised)."""
    path = path_for(key)
    if path is None:
        return None
    # replicas may share the directory (a volume): the host name keeps their temporary files apart
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, offset = {}, 0
        for name, a in arrays.items():
            tensors[name] = {"dtype": str(a.dtype), "shape": list(a.shape), "offset": offset}
            offset += -(-a.nbytes // _ALIGN) * _ALIGN
        header = json.dumps({"key": key, "tensors": tensors}).encode()
        # the data starts at a page boundary after the header; offsets count from there
        base = -(-(8 + len(header)) // _ALIGN) * _ALIGN
        for t in tensors.values():
            t["offset"] += base
        header = json.dumps({"key": key, "tensors": tensors}).encode()
        if 8 + len(header) > base:  # the offsets' digits grew past the page: one more page
            for t in tensors.values():
                t["offset"] += _ALIGN
            base += _ALIGN
            header = json.dumps({"key": key, "tensors": tensors}).encode()
        with open(tmp, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for name, a in arrays.items():
                f.seek(tensors[name]["offset"])
                f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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


def write_pending(model) -> threading.Thread | None:
    """Write the packed arrays that `model`'s load left for the cache (load_model_dir(pack=) with the cache on and
    no file yet) on a daemon thread, once: the server calls this when its graphs are compiled, so that the writing
    does not compete with compiling for the CPUs. None when there is nothing to write."""
    pending = getattr(model, "packed_cache_pending", None)
    if pending is None:
        return None
    model.packed_cache_pending = None
    t = threading.Thread(target=write, args=(pending.key, pending.arrays), name="packed-cache-writer", daemon=True)
    t.keep_alive = pending.keep_alive  # the arrays' memory lives as long as the thread object
    t.start()
    return t


def _trim(d: Path) -> None:
    # Keep the MAX_FILES most recently used files; remove temporary files that no live process is writing (this
    # host's, by process id; another host's once untouched for an hour).
    files = sorted(d.glob("*.packed"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in files[MAX_FILES:]:
        p.unlink(missing_ok=True)
    host = socket.gethostname()
    for p in d.glob(".*.packed.tmp-*"):
        try:
            writer_host, pid = p.name.rsplit(".tmp-", 1)[1].rsplit("-", 2)[:2]
            if writer_host == host:
                os.kill(int(pid), 0)
            elif time.time() - p.stat().st_mtime > 3600:  # another host's, untouched for an hour
                p.unlink(missing_ok=True)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            pass
