"""Hand-written CPU kernels for the inference step, run inside the compiled graphs as MindSpore AOT Custom ops.

Why: on CPU, MindSpore 2.10's MatMul streams weights at about half the machine's memory bandwidth for the one to
few rows of a decode step, keeps a packed copy of every weight per compiled graph (360 MB per prefill shape of
GPT-2 124M: a server with a dozen step shapes held gigabytes of copies), and attention over the KV cache needs a
gather (a copy of every cached row in use) plus small batched matmuls. `cpu_kernels.c` has two kernels: `Linear`
(x @ W^T + b, with GELU or residual fused: register-blocked so each weight row is read once per call for up to
96 rows, a packed GEMM above that; both pack into small per-thread buffers, never a persistent copy) and
`CachedAttention` (each token attends over its own slot's cached rows in place, no gather, no context padding).
No library offers these for MindSpore's CPU backend; the Ascend equivalents (PagedAttention) are Ascend-only.

The source is compiled once per machine with the system C compiler (`cc -O3 -march=native`) into a cache
directory (GPT2_KERNEL_CACHE, default ~/.cache/gpt2-mindspore/kernels), keyed by the source, the flags and the
CPU's feature flags, written under a temporary name and renamed. Used only when MindSpore's device target is CPU
and the compute dtype is float32; GPT2_CPU_KERNELS=0 turns them off, and without a C compiler (or if the build
fails) the model falls back to MindSpore's own ops with a warning. Training never uses them (they have no
gradient).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-shared", "-fPIC", "-std=c11")
ENV_SWITCH = "GPT2_CPU_KERNELS"
ENV_CACHE = "GPT2_KERNEL_CACHE"


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "gpt2-mindspore" / "kernels"


@lru_cache(maxsize=1)
def library_path() -> str | None:
    """Path of the compiled kernel library, building it if needed; None (with a warning) if it cannot be built."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: CPU kernels off, using MindSpore's ops (slower decode)")
        return None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(CFLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cpu_kernels-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *CFLAGS, "-o", tmp, str(SOURCE), "-lm", "-lpthread", "-ldl"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log.warning("building CPU kernels failed (%s): CPU kernels off.\n%s", compiler, proc.stderr[-2000:])
            return None
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("building CPU kernels failed: %s: CPU kernels off", e)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(out)


# Widths must be multiples of the widest vector the kernels use (AVX-512: 16 floats); GPT-2's are multiples of 64.
ALIGN = 16


def available(config, compute_dtype) -> bool:
    """Whether the step should use the CPU kernels: CPU target, float32, aligned widths, not switched off, and
    the library builds."""
    import mindspore as ms

    if not enabled_by_env() or compute_dtype != ms.float32:
        return False
    if config.n_embd % ALIGN or config.head_dim % ALIGN:
        return False
    if ms.get_context("device_target") != "CPU":
        return False
    return library_path() is not None


def _op(name: str, out_shape):
    from mindspore import ops

    return ops.Custom(f"{library_path()}:{name}", out_shape=out_shape, out_dtype=lambda *a: a[0], func_type="aot")


class StepKernels(NamedTuple):
    """The Custom ops an InferenceSession's step graph calls (one set per process; see cpu_kernels.c).

    linear, linear_gelu, linear_add: x (..., K), w (N, K) [, b (N,)] [, r (..., N)] -> (..., N): x @ w^T [+ b],
    gelu(x @ w^T + b) (GPT-2's tanh form), x @ w^T + b + r.
    attention: (qkv (B, T, 3d), k_cache, v_cache, write_base (B*T,), read_base (B,) or (B*T,), positions (B, T),
    meta (2,), scale (1,)) -> (B, T, d); writes this step's keys and values into the caches in place.
    """

    linear: object
    linear_gelu: object
    linear_add: object
    attention: object


@lru_cache(maxsize=1)
def step_kernels() -> StepKernels:
    linear_shape = lambda x, w, *rest: list(x[:-1]) + [w[0]]  # noqa: E731
    return StepKernels(
        _op("Linear", linear_shape),
        _op("LinearGelu", linear_shape),
        _op("LinearAdd", linear_shape),
        _op("CachedAttention", lambda qkv, *rest: list(qkv[:-1]) + [qkv[-1] // 3]),
    )
