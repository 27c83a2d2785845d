"""Process-wide MindSpore settings: device target, execution mode, compile cache, compute dtypes.

The one place that chooses a device; the model code never names CPU, GPU or Ascend, and the server, the trainer,
the MindFormers-style API and the tests all call `set_device`. Call it before building models (MindSpore binds
parameters to the device when they are first used); a process runs on one device.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import mindspore as ms

DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
_target: str | None = None  # the device this process runs on, once set

_DTYPES = {
    "float32": ms.float32,
    "float16": ms.float16,
    "bfloat16": ms.bfloat16,
}


def set_device(
    target: str = "CPU",
    device_id: int | None = None,
    *,
    cpu_threads: int | None = None,
    compile_cache_dir: str | None = None,
) -> None:
    """Select the device and graph mode; with `compile_cache_dir`, reuse compiled graphs across restarts.

    `cpu_threads` sizes MindSpore's CPU kernel thread pool (default: the CPUs this process may use). MindSpore's
    own default is 25 threads, which oversubscribes small machines badly. Calling it again for the same target
    is harmless; another target is a ValueError (MindSpore cannot move a process to another device).
    """
    global _target
    if target not in DEVICE_TARGETS:
        raise ValueError(f"unknown device target {target!r}; use one of {', '.join(DEVICE_TARGETS)}")
    if _target is not None and target != _target:
        raise ValueError(f"this process already runs on {_target}; cannot switch to {target}")
    if device_id is None:
        ms.set_device(target)
    else:
        ms.set_device(target, device_id)
    if target == "CPU":
        n = cpu_threads or len(os.sched_getaffinity(0))
        # model.kernels' thread pool (read when the kernels first run) uses as many threads as MindSpore's ops.
        os.environ.setdefault("GPT2_KERNEL_THREADS", str(n))
        try:
            ms.device_context.cpu.op_tuning.threads_num(n)
        except RuntimeError:
            # MindSpore allows setting it once per process; a second set_device call keeps the first value.
            pass
    # Graph mode everywhere: PyNative is 7-17x slower for decode on CPU, and the training step is compiled too.
    ms.set_context(mode=ms.GRAPH_MODE)
    _target = target
    if compile_cache_dir and not enable_compile_cache(compile_cache_dir):
        logging.getLogger(__name__).info("compile cache %s is in use by another process: compiling without it",
                                         compile_cache_dir)


def graph_cache_dir(root: str, *key) -> str:
    """The compile-cache directory under `root` for graphs described by `key` (whatever shapes them: the model's
    config, the session's layout), this MindSpore and this package's source.

    MindSpore checks only the entry script's imports before reusing a cached graph: a server restarted on a model
    with more layers, same code, read back the old graph and silently ran the wrong network (measured). Hence one
    directory per key."""
    h = hashlib.sha256(repr((ms.__version__, key)).encode())
    package = Path(__file__).parent
    for f in sorted(package.rglob("*")):
        if f.suffix in (".py", ".c", ".cc"):
            h.update(f.relative_to(package).as_posix().encode() + f.read_bytes())
    return os.path.join(root, h.hexdigest()[:16])


_cache_lock = None  # the open lock file of this process's compile-cache directory, held until exit


def enable_compile_cache(path: str) -> bool:
    """Cache compiled graphs on disk in `path` (see graph_cache_dir: one directory per network), unless another
    process has it: MindSpore writes its cache files in place, so a directory is used by one process at a time
    (an exclusive lock on `path`.lock, held until exit); a second server on the same network compiles for
    itself. Returns whether the cache is on."""
    import fcntl

    global _cache_lock
    if _cache_lock is not None:
        return os.environ.get("MS_COMPILER_CACHE_PATH") == path
    os.makedirs(path, exist_ok=True)
    lock = open(path + ".lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return False
    _cache_lock = lock
    # The environment variables are what MindSpore 2.x reads; set them before the first compile.
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
    os.environ["MS_COMPILER_CACHE_PATH"] = path
    return True


def resolve_dtype(name: str | ms.Type) -> ms.Type:
    """'float32' | 'float16' | 'bfloat16' (or the MindSpore dtype itself) -> MindSpore dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown compute dtype {name!r}; use one of {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if name not in _DTYPES.values():
        raise ValueError(f"unsupported compute dtype {name}; use one of {', '.join(_DTYPES)}")
    return name

