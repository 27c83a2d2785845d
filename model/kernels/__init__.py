"""Hand-written CPU kernels for the inference step, run inside the compiled graphs as MindSpore AOT Custom ops.

Why: on CPU, MindSpore 2.10's MatMul streams weights at about half the machine's memory bandwidth for the one to
few rows of a decode step, keeps a packed copy of every weight per compiled graph (360 MB per prefill shape of
GPT-2 124M: a server with a dozen step shapes held gigabytes of copies), and attention over the KV cache needs a
gather (a copy of every cached row in use) plus small batched matmuls. `cpu_kernels.c` has two kernels: `Linear`
(x @ W^T + b, with GELU or residual fused) and `CachedAttention` (each token attends over its own slot's cached
rows in place, no gather, no context padding). No library offers these for MindSpore's CPU backend; the Ascend
equivalents (PagedAttention) are Ascend-only. A layer's step is five calls of them (ln_1 + c_attn, attention,
c_proj + residual, ln_2 + c_fc + GELU, c_proj + residual), and the `Block` op makes the five one call
(`block_kernels`): the same functions on the same inputs, so the same bits, without MindSpore's cost per op (GPT-2
124M's layers are 12 ops instead of 60). GPT2_BLOCK_OP=0 makes sessions call the five ops.

Batch invariance: both kernels compute a row's (a token's) result with one fixed sequence of operations, whatever
else is in the call: `Linear` sums each output element as one FMA chain over k in order for every row count (a
register tile across output columns, fed from weights packed as "panels" of columns), and `CachedAttention`
computes a token the same way alone or in a group. So a request's logits are bitwise the same alone, in a batch
of any size, or with its prompt chunked differently. The build uses no -ffast-math (which lets the compiler
reorder sums differently from one loop to the next) and its own vectorised exp.

Packed weights: a session may keep each projection's weight and the LM head packed for `Linear`
(`packed_weights=True`, the server's setting): as panels (`pack_panels`, float32, W^T in blocks of `panel_width()`
columns, so decode streams each weight once, contiguously), or, on CPUs with AMX (Intel Sapphire Rapids and
later; Linux grants the tile state per process), for the tile unit (`pack_weight_amx`: two bf16 parts, hi + lo;
`Linear` then runs every call there, summing hi.hi + hi.lo + lo.hi in float32, "bf16x3", with errors of ~5e-6 of
the output's scale against 1-2e-6 for float32). Either copy costs as much memory as the weights and is not
updated when they change, so only sessions that ask for it have one; without it `Linear` packs panels per call
(same arithmetic, slower for few rows). GPT2_AMX=0 turns the AMX form off, and the int8 ops' tile path (read once
per process).

Int8 weights (`--quantize int8`): `quantize_int8` rounds each weight row (output channel) to int8 with one float32
scale, max |w| / 127, and `pack_panels_int8` lays the int8 out in panels of 16 columns, k's in pairs. The Q8 ops
(`step_kernels_q8`) take those panels and scales in the weight's place. They quantize each row of x on its own to
int16 (one scale, max |x| / QMAX, QMAX from 2,621 at K = 6,400 to 32,767 at K <= 512) and compute exact int32
sums (AVX2 `vpmaddwd`; AVX-512BW the same on a panel's 16 columns at once, with VNNI `vpdpwssd`), then y = (sum * sx) * s[n] before the bias: a quarter of the bytes per decode step and about twice float32's
multiply-adds per instruction. Integer sums are exact in any order, so a row's bits depend on nothing else in the
call (batch invariance) and are the same on every machine.

ARM: on aarch64 (Graviton, Kunpeng, Ampere) the kernels use NEON's 4-float vectors: an 8-row GEMM micro-kernel of
FMAs by lane, the portable path's lane order in every vector sum (so NEON computes the portable build's bits), and
worker threads take the caller's FPCR (denormal flushing) as they take its MXCSR on x86. With no ARM machine at
hand, tests/test_kernels_cross.py cross-compiles the kernels with tests/kernel_harness.c (Debian's
gcc-aarch64-linux-gnu; the harness calls the ops as MindSpore does) and runs them under qemu-user with 1 and 3
threads: against numpy, for batch invariance, and bit for bit against the portable x86 build. `make test` installs
the tools.

Shape functions: `infer_shapes.cc` gives MindSpore each op's output shape in C++ (its Custom ops take Python shape
functions only for fixed shapes), which lets InferenceSession compile one step graph with an unknown token axis
(`dynamic_shapes()`). It is C++ because MindSpore's interface returns a std::vector; without a C++ compiler the
library is built without it and sessions compile one graph per padded step size (slower start, same results).

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
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..atomic_write import write_atomically

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
INFER_SOURCE = Path(__file__).with_name("infer_shapes.cc")
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-std=c11")
ENV_SWITCH = "GPT2_CPU_KERNELS"
ENV_CACHE = "GPT2_KERNEL_CACHE"
ENV_AMX = "GPT2_AMX"  # 0: never use AMX, even for sessions with packed weights
ENV_BLOCK = "GPT2_BLOCK_OP"  # 0: a layer's step as its five ops, not one Block op (the tests compare the two)


def _switched_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def enabled_by_env() -> bool:
    return not _switched_off(ENV_SWITCH)


def block_enabled() -> bool:
    """Whether a session made now runs each layer's step as one Block op (GPT2_BLOCK_OP=0: as five; same bits)."""
    return not _switched_off(ENV_BLOCK)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, ARM
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "gpt2-mindspore" / "kernels"


@lru_cache(maxsize=1)
def library_path() -> str | None:
    """Path of the compiled kernel library, building it if needed; None (with a warning) if it cannot be built.

    With a C++ compiler the library also carries the ops' shape functions (infer_shapes.cc), which let a step
    graph take any number of tokens (`dynamic_shapes`); without one, the kernels alone (graphs per padded size)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: CPU kernels off, using MindSpore's ops (slower decode)")
        return None
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    src = SOURCE.read_bytes() + (INFER_SOURCE.read_bytes() if cxx else b"")
    key = hashlib.sha256(src + " ".join(CFLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return str(out)

    def run(cmd: list[str]) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(f"{cmd[0]} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")

    def build(tmp: str) -> None:
        if cxx is None:
            run([compiler, *CFLAGS, "-shared", "-o", tmp, str(SOURCE), "-lm", "-lpthread", "-ldl"])
        else:
            obj = tmp + ".o"
            try:
                run([compiler, *CFLAGS, "-c", "-o", obj, str(SOURCE)])
                run([cxx, "-O2", "-fPIC", "-std=c++17", "-shared", "-o", tmp, obj, str(INFER_SOURCE),
                     "-lm", "-lpthread", "-ldl"])
            finally:
                if os.path.exists(obj):
                    os.unlink(obj)
        os.chmod(tmp, 0o755)

    try:
        write_atomically(out, build)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("building CPU kernels failed: %s: CPU kernels off, using MindSpore's ops", e)
        return None
    return str(out)


@lru_cache(maxsize=1)
def dynamic_shapes() -> bool:
    """Whether the library has the ops' shape functions, so that one step graph serves every token count."""
    import ctypes

    path = library_path()
    return path is not None and hasattr(ctypes.CDLL(path), "LinearInferShape")


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


@lru_cache(maxsize=1)
def amx_available() -> bool:
    """Whether `Linear` can use AMX with weights from `pack_weight_amx` in this process (the library was built
    with AMX and Linux granted the tile state)."""
    import ctypes

    if _switched_off(ENV_AMX):
        return False
    path = library_path()
    return path is not None and bool(ctypes.CDLL(path).AmxAvailable())


@lru_cache(maxsize=1)
def panel_width() -> int:
    """The column count of `pack_panels`' panels on this machine (twice the vector width the library was built for)."""
    import ctypes

    path = library_path()
    if path is None:
        raise RuntimeError("the CPU kernels are not available")
    return int(ctypes.CDLL(path).PanelWidth())


def _panels(w: np.ndarray) -> np.ndarray:
    # (N, K) -> (P, K, NR) in w's dtype: panel p holds W^T's columns p*NR .. p*NR+NR-1 k-major, zero past N.
    nr = panel_width()
    n, k = w.shape
    p = -(-n // nr)
    out = np.empty((p, k, nr), w.dtype)
    full = n // nr
    out[:full] = w[: full * nr].reshape(full, nr, k).transpose(0, 2, 1)
    if full < p:
        last = np.zeros((nr, k), w.dtype)
        last[: n - full * nr] = w[full * nr :]
        out[full] = last.T
    return out


def pack_panels(w: np.ndarray) -> np.ndarray:
    """A (N, K) float32 weight ([out, in]) -> (P, K, NR) float32 for `Linear`: P = ceil(N / NR) panels, panel p
    holding W^T's columns p*NR .. p*NR+NR-1 k-major (zero past N), NR = panel_width()."""
    return _panels(np.ascontiguousarray(w, dtype=np.float32))


def pack_panels_kn(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """pack_panels of the weight whose (K, N) transpose is `w`: a Conv1D weight as a Hugging Face file stores it
    ([in, out]), into `out` when given. Panel p is then w's columns p*NR .. p*NR+NR-1 as they lie, copied row by
    row, with no transpose of the whole matrix (loading GPT-2 1.5B: seconds instead of the ~30 s of transposing to
    [out, in] and back)."""
    w = np.asarray(w, dtype=np.float32)
    nr = panel_width()
    k, n = w.shape
    p = -(-n // nr)
    if out is None:
        out = np.empty((p, k, nr), np.float32)
    elif out.shape != (p, k, nr) or out.dtype != np.float32:
        raise ValueError(f"pack_panels_kn: out must be float32 {(p, k, nr)}, got {out.dtype} {out.shape}")
    full = n // nr
    out[:full] = w[:, : full * nr].reshape(k, full, nr).transpose(1, 0, 2)
    if full < p:
        out[full] = 0
        out[full, :, : n - full * nr] = w[:, full * nr :]
    return out


def packed_parameter(w: np.ndarray, form: str, name: str, *, kn: bool = False):
    """`w` packed in `form` (pack_weight's arguments) as a MindSpore Parameter `name`, packed straight into the
    Parameter's own memory where the layout allows (panels from (K, N)): Parameter(Tensor(array)) copies, and on
    a fresh VM each first touch of a page costs more than the copy itself."""
    import mindspore as ms
    from mindspore import Parameter
    from mindspore.common.initializer import Zero, initializer

    if form == "panels" and kn:
        param = Parameter(initializer(Zero(), packed_shape(*np.shape(w), "panels"), ms.float32), name=name,
                          requires_grad=False)
        pack_panels_kn(w, out=param.asnumpy())  # CPU tensors' asnumpy is a view of their memory
        return param
    return Parameter(ms.Tensor(pack_weight(w, form, kn=kn)), name=name, requires_grad=False)


def packed_shape(k: int, n: int, form: str) -> tuple[int, ...]:
    """The shape pack_weight(w, form) gives a weight of n outputs and k inputs."""
    if form == "panels":
        nr = panel_width()
        return (-(-n // nr), k, nr)
    if form == "amx":
        return (2, -(-n // 32) * 2, k // 2, 16)
    raise ValueError(f"unknown packed form {form!r}")


def parameter_over(a: np.ndarray, name: str):
    """A MindSpore Parameter `name` whose memory is `a`'s (a memory-mapped packed weight: model.packed_cache), not
    a copy: the step graph reads it in place."""
    import mindspore as ms
    from mindspore import Parameter
    from mindspore.common.initializer import Zero, initializer

    dtype = {np.dtype(np.float32): ms.float32, np.dtype(np.int32): ms.int32}[a.dtype]
    param = Parameter(initializer(Zero(), a.shape, dtype), name=name, requires_grad=False)
    param.set_data(ms.Tensor.from_numpy(a))
    return param


def packed_form(config, compute_dtype) -> str | None:
    """How a session packs the projections' and the LM head's float weights for `Linear` on this machine: "amx"
    (pack_weight_amx), "panels" (pack_panels), or None when the kernels are not used or the widths do not allow
    it. A packed projection carries its own output width (a multiple of 32: the AMX tiles and the widest panels),
    and the AMX tiles take 32 k's at a time: every projection's N and K is a multiple of n_embd or inner_dim."""
    if not available(config, compute_dtype) or config.n_embd % 32 or config.inner_dim % 32:
        return None
    return "amx" if amx_available() else "panels"


def pack_weight(w: np.ndarray, form: str, *, kn: bool = False) -> np.ndarray:
    """`w` ((N, K) [out, in]; kn: its (K, N) transpose) packed in `form` ("panels" or "amx")."""
    if form == "panels":
        return pack_panels_kn(w) if kn else pack_panels(w)
    if form == "amx":
        return pack_weight_amx(np.asarray(w).T if kn else w)
    raise ValueError(f"unknown packed form {form!r}")


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (N, K) float weight ([out, in]) -> (q (N, K) int8, scale (N,) float32), symmetric per output row:
    scale = max |w[n]| / 127 (1 for a row of zeros), q = clip(rint(w / scale), -127, 127), all in float32, so
    that w ~ q * scale[:, None]. Works through the rows a few MB at a time: the LM head (50,257 rows) makes no
    temporaries of its whole size."""
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] == 0:
        raise ValueError(f"quantize_int8 takes a (N, K) weight with K > 0, got shape {w.shape}")
    n, k = w.shape
    q = np.empty((n, k), np.int8)
    scale = np.empty(n, np.float32)
    rows = max(1, (1 << 20) // k)  # 4 MB of float32 per chunk
    for a in range(0, n, rows):
        chunk = np.asarray(w[a : a + rows], np.float32)
        if not np.isfinite(chunk).all():
            raise ValueError(f"quantize_int8: the weight has NaN or infinite values in rows {a}..{a + len(chunk) - 1}")
        s = np.abs(chunk).max(axis=1) / np.float32(127)
        # a row of zeros (or of values so small that the scale underflows): zeros times 1
        s[s == 0] = 1
        q[a : a + rows] = np.clip(np.rint(chunk / s[:, None]), -127, 127)
        scale[a : a + rows] = s
    return q, scale


Q8_PANEL = 16  # columns per int8 panel, on every machine (cpu_kernels.c's Q8_NR)


def pack_panels_int8(q: np.ndarray) -> np.ndarray:
    """A (N, K) int8 weight (quantize_int8's q, K even) -> (P, K, 16) int8 for the Q8 ops: P = ceil(N / 16) panels
    of 16 columns (zero past N), each laid out [K / 2][16][2]: for each pair of k's, every column's two weights
    side by side (what one vpmaddwd multiplies against a broadcast pair of x)."""
    q = np.asarray(q)
    if q.dtype != np.int8 or q.ndim != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_panels_int8 takes a (N, K) int8 array with K even (quantize_int8's), got {q.dtype} "
                         f"{q.shape}")
    n, k = q.shape
    p = -(-n // Q8_PANEL)
    if n % Q8_PANEL:
        q = np.concatenate([q, np.zeros((p * Q8_PANEL - n, k), np.int8)])
    out = q.reshape(p, Q8_PANEL, k // 2, 2).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(out).reshape(p, k, Q8_PANEL)


def _bf16_round(v: np.ndarray) -> np.ndarray:
    # float32 -> bf16 bits, round to nearest even (what the kernel's conversion of x does); finite inputs only.
    u = v.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def pack_weight_amx(w: np.ndarray) -> np.ndarray:
    """A (N, K) float32 weight ([out, in]) -> (2, Np/16, K/2, 16) int32 for `Linear`'s AMX path, Np = N rounded
    up to a multiple of 32 (zero rows: the LM head has 50,257).

    Part 0 is bf16(w), part 1 bf16(w - part 0); within a part, for each 16 output columns, each pair of
    consecutive k's two bf16 side by side in one 32-bit word (the tile unit's "VNNI" layout for the B operand).
    K must be a multiple of 32.
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    n, k = w.shape
    if k % 32:
        raise ValueError(f"pack_weight_amx needs K (the second dimension) a multiple of 32, got {w.shape}")
    if n % 32:
        w = np.concatenate([w, np.zeros((32 - n % 32, k), np.float32)])
        n = w.shape[0]
    hi = _bf16_round(w)
    lo = _bf16_round((w - (hi.astype(np.uint32) << np.uint32(16)).view(np.float32)).astype(np.float32))
    out = np.empty((2, n // 16, k // 2, 16), np.uint32)
    for i, part in enumerate((hi, lo)):
        out[i] = part.view(np.uint32).reshape(n // 16, 16, k // 2).transpose(0, 2, 1)
    return out.view(np.int32)


def _op(name: str, out_shape, inputs: str):
    """A Custom op calling `name` in the library. inputs: one letter per input, f float32, i int32, w a weight
    (float32, or int32 when packed for AMX), q int8 (a quantized weight's panels). With the library's shape
    functions (`dynamic_shapes`) the op is registered with its inputs and takes its output shape from C++, so
    graphs may leave the token axis unknown."""
    from mindspore import ops

    func = f"{library_path()}:{name}"
    if not dynamic_shapes():
        return ops.Custom(func, out_shape=out_shape, out_dtype=lambda *a: a[0], func_type="aot")
    from mindspore.ops import CustomRegOp, DataType

    reg = CustomRegOp(f"{name}_{inputs}")  # registered per signature: Linear takes 2 or 3 inputs
    for i in range(len(inputs)):
        reg = reg.input(i, f"x{i}")
    reg = reg.output(0, "y")
    f32, i32, i8 = DataType.F32_Default, DataType.I32_Default, DataType.I8_Default
    for types in product(*[{"f": (f32,), "i": (i32,), "w": (f32, i32), "q": (i8,)}[c] for c in inputs]):
        reg = reg.dtype_format(*types, f32)
    return ops.Custom(func, out_shape=None, out_dtype=lambda *a: a[0], func_type="aot",
                      reg_info=reg.target("CPU").get_op_info())


class StepKernels(NamedTuple):
    """The Custom ops an InferenceSession's step graph calls (one set per process; see cpu_kernels.c).

    linear, linear_gelu, linear_add: x (..., K), w (N, K) [, wp] [, b (N,)] [, r (..., N)] -> (..., N):
    x @ w^T [+ b], gelu(x @ w^T + b) (GPT-2's tanh form), x @ w^T + b + r; wp, if given, is w packed:
    pack_panels(w) or pack_weight_amx(w) (then every call runs on AMX); wp may come in w's place when N is a
    multiple of the packing's column block (the panel width, or 32 for AMX), so that w itself can be freed.
    `linear` takes three inputs (x, w or wp, b; or x, w, wp), `linear_nobias` two (x, w).
    ln_linear, ln_linear_gelu, ln_linear_nobias: the same of layer_norm(x), the norm's weight, bias and eps (1,)
    after x: (x, g, b, eps, w or wp, bias), (x, g, b, eps, w, wp) or (x, g, b, eps, w).
    attention: (qkv (B, T, 3d), k_cache, v_cache, write_base (B*T,), read_base (B,) or (B*T,), positions (B, T),
    meta (2,), scale (1,)) -> (B, T, d); writes this step's keys and values into the caches in place.
    """

    linear: object
    linear_gelu: object
    linear_add: object
    attention: object
    linear_nobias: object
    ln_linear: object
    ln_linear_gelu: object
    ln_linear_nobias: object


@lru_cache(maxsize=1)
def step_kernels() -> StepKernels:
    def linear_shape(x, w, *rest):
        # w (N, K), or the packed copy alone: panels (P, K, NR) or AMX (2, Np / 16, K / 2, 16).
        n = w[0] if len(w) == 2 else w[0] * w[2] if len(w) == 3 else w[1] * 16
        return list(x[:-1]) + [n]

    def ln_linear_shape(x, g, b, eps, w, *rest):
        return linear_shape(x, w)

    return StepKernels(
        _op("Linear", linear_shape, "fww"),
        _op("LinearGelu", linear_shape, "fwf"),
        _op("LinearAdd", linear_shape, "fwff"),
        _op("CachedAttention", lambda qkv, *rest: list(qkv[:-1]) + [qkv[-1] // 3], "fffiiiif"),
        _op("Linear", linear_shape, "fw"),
        _op("LnLinear", ln_linear_shape, "ffffww"),
        _op("LnLinearGelu", ln_linear_shape, "ffffwf"),
        _op("LnLinear", ln_linear_shape, "ffffw"),
    )


@lru_cache(maxsize=1)
def copy_slot_rows():
    """The Custom op copying a slot's first positions to another slot in one cache (prefix caching):
    (cache (rows, head_dim), meta (5,) int32 [src_base, dst_base, n, n_head, max_seq_len]) -> (1,) zero; fixed
    shapes, so no shape function."""
    from mindspore import ops

    return ops.Custom(f"{library_path()}:CopySlotRows", out_shape=lambda *a: [1], out_dtype=lambda *a: a[0],
                      func_type="aot")


class StepKernelsQ8(NamedTuple):
    """StepKernels' projections for int8 weights (cpu_kernels.c's Q8 ops): the weight's place takes wq, its
    panels (pack_panels_int8 of quantize_int8's q), then s, its scales (N,); N is s's length, x stays float32.

    linear (x, wq, s, b), linear_nobias (x, wq, s), linear_gelu (x, wq, s, b), linear_add (x, wq, s, b, r):
    x @ (q * s)^T [+ b], then GELU or + r; ln_linear (x, g, beta, eps, wq, s, b), ln_linear_nobias (x, g, beta,
    eps, wq, s), ln_linear_gelu (x, g, beta, eps, wq, s, b): the same of layer_norm(x).
    """

    linear: object
    linear_nobias: object
    linear_gelu: object
    linear_add: object
    ln_linear: object
    ln_linear_nobias: object
    ln_linear_gelu: object


@lru_cache(maxsize=1)
def step_kernels_q8() -> StepKernelsQ8:
    def linear_shape(x, wq, s, *rest):
        return list(x[:-1]) + [s[0]]

    def ln_linear_shape(x, g, b, eps, wq, s, *rest):
        return linear_shape(x, wq, s)

    return StepKernelsQ8(
        _op("LinearQ8", linear_shape, "fqff"),
        _op("LinearQ8", linear_shape, "fqf"),
        _op("LinearQ8Gelu", linear_shape, "fqff"),
        _op("LinearQ8Add", linear_shape, "fqfff"),
        _op("LnLinearQ8", ln_linear_shape, "ffffqff"),
        _op("LnLinearQ8", ln_linear_shape, "ffffqf"),
        _op("LnLinearQ8Gelu", ln_linear_shape, "ffffqff"),
    )


class BlockKernels(NamedTuple):
    """The Block op (cpu_kernels.c's), a whole layer's step in one call: what StepKernels' ln_linear, attention,
    linear_add, ln_linear_gelu and linear_add compute one after the other, with their bits, without the cost of
    five ops (MindSpore's dispatch of each and the bookkeeping of its output).

    Inputs: x (B, T, d); ln_1's weight, bias, eps; c_attn's weight, bias; attention's k_cache, v_cache, write_base,
    read_base, positions, meta, scale (StepKernels.attention's after qkv); attn.c_proj's weight, bias; ln_2's weight,
    bias, eps; mlp.c_fc's weight, bias; mlp.c_proj's weight, bias -> (B, T, d); writes the step's K/V into the
    caches in place. block: each weight one tensor, w (N, K) or alone its packing (pack_panels or
    pack_weight_amx); block_q8: each weight two, its int8 panels and scales (StepKernelsQ8's form). GELU is the
    tanh form (the model's "gelu" activation, erf, takes the five-op path with MindSpore's GELU).
    """

    block: object
    block_q8: object


@lru_cache(maxsize=1)
def block_kernels() -> BlockKernels:
    def signature(w: str) -> str:
        # x, ln_1, c_attn (weight, bias), attention's inputs after qkv, c_proj, ln_2, c_fc, mlp.c_proj
        return "f" + "fff" + w + "f" + "ffiiiif" + w + "f" + "fff" + w + "f" + w + "f"

    def shape(x, *rest):
        return list(x)

    return BlockKernels(_op("Block", shape, signature("w")), _op("Block", shape, signature("qf")))
