"""The CPU kernels built for other CPUs: model/kernels/cpu_kernels.c compiled with tests/kernel_harness.c (which
calls the ops as MindSpore does, without MindSpore) for ARM (aarch64, NEON; run under qemu-user), for this machine
with the real build's flags, portably (x86-64 without AVX: the kernels' portable branch), and with its AVX-512
branches on any x86-64 machine (AVX-512F/BW with VNNI and AMX-int8 as on Sapphire Rapids, and without them as on
Skylake-SP), each 512-bit intrinsic computed by SIMDe and the AMX tiles by an emulator where the CPU lacks them
(tests/x86_emulated.h); each run with 1 and 3 kernel threads.

They must match numpy (float64), keep a row's (a token's) bits independent of the rest of the call, compute with
the calling thread's denormal mode on every thread, give Block the bits of the five ops it replaces, and agree
bitwise across builds where the arithmetic is the same (Linear and its int8-weight form LinearQ8 everywhere;
attention and Block between NEON and portable, whose vector sums add lanes in the same order).

The ARM build needs Debian's gcc-aarch64-linux-gnu and qemu-user, the AVX-512 build Debian's libsimde-dev (`make
test` installs them when run as root, as CI does); without them the tests fail saying so, never skip.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from model import kernels
from model_helpers import q8_reference

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "tests" / "kernel_harness.c"
X86_EMULATED = REPO / "tests" / "x86_emulated.h"
SIMDE_AVX512 = Path("/usr/include/simde/x86/avx512.h")
HOST = platform.machine()
BUILDS = ("aarch64", "native", "portable", "avx512", "avx512bw")
THREADS = (1, 3)
# The real build's flags, less those for a shared library.
FLAGS = [f for f in kernels.CFLAGS if f not in ("-shared", "-fPIC")]
DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.int32): 1, np.dtype(np.int8): 2}  # kernel_harness.c's
MISSING_CROSS_TOOLS = (
    "the ARM kernel tests need gcc-aarch64-linux-gnu and qemu-user: `apt-get install gcc-aarch64-linux-gnu "
    "qemu-user` (`make test` does it when run as root)"
)
MISSING_SIMDE = "the AVX-512 kernel tests need SIMDe's headers: `apt-get install libsimde-dev` (`make test` does it)"


def _avx512_header(out: Path) -> Path:
    """tests/x86_emulated.h, then each 512-bit name the kernel source uses mapped to SIMDe's (simde_ + name)."""
    names = sorted(set(re.findall(r"\b(_mm512_\w+|__m512\w*)\b", kernels.SOURCE.read_text())))
    lines = [f'#include "{X86_EMULATED}"'] + [f"#undef {n}\n#define {n} simde{n}" for n in names]
    path = out / "avx512_aliases.h"
    path.write_text("\n".join(lines) + "\n")
    return path


def _march(flags: list[str], arch: str) -> list[str]:
    return [f"-march={arch}" if f.startswith("-march=") else f for f in flags]


@dataclass(frozen=True)
class Call:
    """One op call: tensors are its params (inputs, then outputs), flush: the calling thread flushes denormals."""

    op: str
    tensors: tuple[np.ndarray, ...]
    flush: bool = False


class Harness:
    """A built tests/kernel_harness.c: runs lists of calls in one process and returns every call's tensors."""

    def __init__(self, name: str, argv: list[str], obj: Path):
        self.name, self.argv, self.obj = name, argv, obj
        out = subprocess.run([*argv, "--panel-width"], capture_output=True, text=True, timeout=60, check=True)
        self.panel_width = int(out.stdout)
        self.stderr = ""  # the last run's

    def run(self, calls: list[Call], threads: int, tmp: Path, env: dict | None = None) -> list[list[np.ndarray]]:
        """env: variables for this run; GPT2_AMX is unset otherwise, so that no setting of the caller's turns the
        emulated AMX path off unseen."""
        blob = bytearray()
        for c in calls:
            blob += struct.pack("<q", len(c.op)) + c.op.encode() + struct.pack("<qq", c.flush, len(c.tensors))
            for t in c.tensors:
                assert t.dtype in DTYPE_CODES and t.flags.c_contiguous
                blob += struct.pack(f"<qq{t.ndim}q", DTYPE_CODES[t.dtype], t.ndim, *t.shape) + t.tobytes()
        blob += struct.pack("<q", 0)
        (tmp / "calls.bin").write_bytes(bytes(blob))
        env = {**{k: v for k, v in os.environ.items() if k != "GPT2_AMX"}, "GPT2_KERNEL_THREADS": str(threads),
               **(env or {})}
        proc = subprocess.run([*self.argv, str(tmp / "calls.bin"), str(tmp / "results.bin")], env=env,
                              capture_output=True, text=True, timeout=300)
        self.stderr = proc.stderr
        assert proc.returncode == 0, proc.stderr[-2000:]
        data, at, results = (tmp / "results.bin").read_bytes(), 0, []
        for c in calls:
            (status,) = struct.unpack_from("<q", data, at)
            at += 8
            assert status == 0, (self.name, c.op, [t.shape for t in c.tensors])
            outs = []
            for t in c.tensors:
                outs.append(np.frombuffer(data, t.dtype, t.size, at).reshape(t.shape))
                at += t.nbytes
            results.append(outs)
        assert at == len(data)
        return results


def _compile(name: str, out: Path) -> Harness:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("the kernel tests need a C compiler (cc)")
    runner: list[str] = []
    if name == "native":
        flags = FLAGS
    elif name == "portable":
        if HOST != "x86_64":
            pytest.skip("the portable build is x86-64 without AVX: an x86-64 machine's")
        flags = _march(FLAGS, "x86-64")
    elif name in ("avx512", "avx512bw"):
        if HOST != "x86_64":
            pytest.skip("the AVX-512 builds are x86-64's")
        if not SIMDE_AVX512.exists():
            pytest.fail(MISSING_SIMDE)
        # This machine's flags (AVX2 at least, as the AVX-512 branches assume), the 512-bit intrinsics SIMDe's.
        flags = [*FLAGS, "-Wno-psabi", "-include", str(_avx512_header(out))]
        if name == "avx512bw":
            flags.append("-DGPT2_EMULATE_NO_VNNI")
    else:
        flags = _march(FLAGS, "armv8-a")
        if HOST != "aarch64":
            cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
            if not (cc and qemu):
                pytest.fail(MISSING_CROSS_TOOLS)
            # Static: qemu-user then needs no ARM libraries.
            flags, runner = [*flags, "-static"], [qemu]
    exe, obj = out / f"harness-{name}", out / f"cpu_kernels-{name}.o"
    for cmd in (
        [cc, *flags, "-c", "-o", str(obj), str(kernels.SOURCE)],
        [cc, *flags, "-o", str(exe), str(HARNESS), str(obj), "-lm", "-lpthread", "-ldl"],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return Harness(name, [*runner, str(exe)], obj)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(name): that build's Harness, compiled on first use."""
    built: dict[str, Harness] = {}

    def get(name: str) -> Harness:
        if name not in built:
            built[name] = _compile(name, tmp_path_factory.mktemp(f"build-{name}"))
        return built[name]

    return get


@pytest.fixture(params=BUILDS)
def harness(request, build) -> Harness:
    return build(request.param)


# ---- Linear ---------------------------------------------------------------------------------------------------

# K = 272: K-blocked (KC = 256) for more than MR rows; N = 100: an edge panel; N = 512: panels alone (a multiple of
# every panel width) and many of them for the threads to share.
SHAPES = ((100, 272), (512, 48))
M = 70  # more than one MC block (8 MR rows) but on AVX-512
ROW_COUNTS = range(1, 18)  # 1 .. MR + 3 for every build (MR: 4 portable, 6 AVX2, 8 NEON, 14 AVX-512)


def _panels(w: np.ndarray, nr: int) -> np.ndarray:
    # model.kernels.pack_panels for a given panel width (it asks this machine's library). The int8 panels
    # (pack_panels_int8) are 16 columns wide on every machine.
    n, k = w.shape
    p = -(-n // nr)
    padded = np.zeros((p * nr, k), w.dtype)
    padded[:n] = w
    return np.ascontiguousarray(padded.reshape(p, nr, k).transpose(0, 2, 1))


def _linear_case(n: int, k: int, nr: int):
    """Calls of every op and weight form on M rows, the expected values, and the calls for batch invariance."""
    rng = np.random.default_rng(n * 1000 + k)
    x = rng.standard_normal((M, k), np.float32) * 2
    w = rng.standard_normal((n, k), np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    r = rng.standard_normal((M, n)).astype(np.float32)
    panels = _panels(w, nr)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    with np.errstate(over="ignore"):
        gelu = ref / (1 + np.exp(-1.5957691216057308 * (ref + 0.044715 * ref**3)))
    forms = [(w,), (w, panels)] + ([(panels,)] if n % nr == 0 else [])

    def y(m: int) -> np.ndarray:
        return np.full((m, n), np.nan, np.float32)

    full = []  # (call, want)
    for form in forms:
        full += [
            (Call("Linear", (x, *form, y(M))), ref - b),
            (Call("Linear", (x, *form, b, y(M))), ref),
            (Call("LinearGelu", (x, *form, b, y(M))), gelu),
            (Call("LinearAdd", (x, *form, b, r, y(M))), ref + r),
        ]
    # The same rows in calls of other sizes: the first m rows, the last m, and single rows packed per call.
    parts = [(0, m) for m in ROW_COUNTS] + [(M - m, M) for m in (1, 5, 17)] + [(i, i + 1) for i in (0, 35, M - 1)]
    sub = [Call("LinearGelu", (x[a:e].copy(), w, *(() if e - a == 1 else (panels,)), b, y(e - a))) for a, e in parts]
    # Single rows with the panels too (decode's path: four panels at a time where they are whole).
    singles = [(i, i + 1) for i in (0, 35, M - 1)]
    sub += [Call("LinearGelu", (x[a:e].copy(), w, panels, b, y(1))) for a, e in singles]
    return full, parts + singles, sub


def _check_linear(got_full, full, got_sub, parts):
    for got, (call, want) in zip(got_full, full):
        scale = 1 + np.abs(want).max()
        assert np.abs(got[-1] - want).max() / scale < 1e-5, call.op
    # Every weight form (w packed per call, w and its panels, panels alone) gives the same bits: full holds the same
    # four calls for each form.
    outs = [got[-1] for got in got_full]
    for i in range(4, len(outs)):
        assert np.array_equal(outs[i], outs[i % 4]), full[i][0].op
    whole = outs[4 + 2]  # LinearGelu with w and panels
    for got, (a, e) in zip(got_sub, parts):
        assert np.array_equal(got[-1], whole[a:e]), (a, e)


@pytest.mark.parametrize("threads", THREADS)
def test_linear_matches_numpy_and_a_rows_bits_do_not_depend_on_the_call(harness, threads, tmp_path):
    calls, cases = [], []
    for n, k in SHAPES:
        full, parts, sub = _linear_case(n, k, harness.panel_width)
        cases.append((full, parts, sub))
        calls += [c for c, _ in full] + sub
    results = harness.run(calls, threads, tmp_path)
    for full, parts, sub in cases:
        got_full, results = results[: len(full)], results[len(full) :]
        got_sub, results = results[: len(sub)], results[len(sub) :]
        _check_linear(got_full, full, got_sub, parts)


@pytest.mark.parametrize("threads", THREADS)
def test_linear_over_many_rows_runs_in_passes_with_the_same_bits(harness, threads, tmp_path):
    # More rows than one pass packs (128 MR: at most 1,792), then rows from its second pass in a call of their own.
    rng = np.random.default_rng(7)
    m, n, k = 1900, 64, 48
    x = rng.standard_normal((m, k), np.float32)
    w = rng.standard_normal((n, k), np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    panels = _panels(w, harness.panel_width)
    big, part = harness.run([Call("Linear", (x, panels, b, np.full((m, n), np.nan, np.float32))),
                             Call("Linear", (x[1795:1810].copy(), panels, b, np.full((15, n), np.nan, np.float32)))],
                            threads, tmp_path)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    assert np.abs(big[-1] - ref).max() < 1e-4
    assert np.array_equal(part[-1], big[-1][1795:1810])


@pytest.mark.parametrize("threads", THREADS)
def test_layer_norm_fused_into_linear_matches_numpy_and_keeps_a_rows_bits(harness, threads, tmp_path):
    rng = np.random.default_rng(11)
    m, n, k = 70, 64, 48
    x = (rng.standard_normal((m, k)) * 3 + 1).astype(np.float32)
    g, beta = rng.standard_normal(k).astype(np.float32), rng.standard_normal(k).astype(np.float32)
    eps = np.array([1e-5], np.float32)
    w = rng.standard_normal((n, k), np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    panels = _panels(w, harness.panel_width)

    def call(op, rows, *weights):
        return Call(op, (x[rows].copy(), g, beta, eps, *weights, np.full((len(x[rows]), n), np.nan, np.float32)))

    every = slice(0, m)
    got = harness.run([call("LnLinear", every, w, b), call("LnLinear", every, panels, b),
                       call("LnLinearGelu", every, w, panels, b), call("LnLinear", every, w),
                       call("LnLinearGelu", slice(3, 4), w, panels, b), call("LnLinearGelu", slice(60, 70), w, panels, b)],
                      threads, tmp_path)
    x64 = x.astype(np.float64)
    ln = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5) * g + beta
    ref = ln @ w.T.astype(np.float64) + b
    with np.errstate(over="ignore"):
        gelu = ref / (1 + np.exp(-1.5957691216057308 * (ref + 0.044715 * ref**3)))
    scale = 1 + np.abs(ref).max()
    assert np.abs(got[0][-1] - ref).max() / scale < 1e-5
    assert np.array_equal(got[1][-1], got[0][-1])  # panels alone: the same bits
    assert np.abs(got[2][-1] - gelu).max() / scale < 1e-5
    assert np.abs(got[3][-1] - (ref - b)).max() / scale < 1e-5  # no bias (the LM head)
    assert np.array_equal(got[4][-1], got[2][-1][3:4]) and np.array_equal(got[5][-1], got[2][-1][60:70])


# ---- LinearQ8: int8 weights ----------------------------------------------------------------------------------


def _gelu(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v / (1 + np.exp(-1.5957691216057308 * (v + 0.044715 * v**3)))


def _q8_case(n: int, k: int):
    """As _linear_case for the Q8 ops (int8 panels and per-column scales): the expected values bit for bit where
    numpy's float32 computes them too (model_helpers.q8_reference: integer sums, then float32), GELU's close."""
    rng = np.random.default_rng(n * 1000 + k + 1)
    x = rng.standard_normal((M, k), np.float32) * 2
    q, s = kernels.quantize_int8(rng.standard_normal((n, k), np.float32))
    wq = kernels.pack_panels_int8(q)
    b = rng.standard_normal(n).astype(np.float32)
    r = rng.standard_normal((M, n)).astype(np.float32)
    y0 = q8_reference(x, q, s)

    def y(m: int) -> np.ndarray:
        return np.full((m, n), np.nan, np.float32)

    exact = [
        (Call("LinearQ8", (x, wq, s, y(M))), y0),
        (Call("LinearQ8", (x, wq, s, b, y(M))), y0 + b),
        (Call("LinearQ8Add", (x, wq, s, b, r, y(M))), (y0 + b) + r),
    ]
    gelu = (Call("LinearQ8Gelu", (x, wq, s, b, y(M))), _gelu((y0 + b).astype(np.float64)))
    parts = [(0, m) for m in ROW_COUNTS] + [(M - m, M) for m in (1, 5, 17)] + [(i, i + 1) for i in (0, 35, M - 1)]
    sub = [Call("LinearQ8Gelu", (x[a:e].copy(), wq, s, b, y(e - a))) for a, e in parts]
    return exact, gelu, parts, sub


@pytest.mark.parametrize("threads", THREADS)
def test_linear_q8_is_its_integer_definition_and_keeps_a_rows_bits(harness, threads, tmp_path):
    calls, cases = [], []
    # K = 192 and 128: multiples of 64, so calls of 16 rows or more take the AMX tiles where the build has them (they
    # take two panels at a time: 7 panels, the last partial; 8, the last partial)
    for n, k in (*SHAPES, (100, 192), (120, 128)):
        case = _q8_case(n, k)
        cases.append(case)
        exact, gelu, _, sub = case
        calls += [c for c, _ in exact] + [gelu[0]] + sub
    results = iter(harness.run(calls, threads, tmp_path))
    for exact, (_, gelu_want), parts, _ in cases:
        for call, want in exact:
            assert np.array_equal(next(results)[-1], want), call.op
        whole = next(results)[-1]
        assert np.abs(whole - gelu_want).max() / (1 + np.abs(gelu_want).max()) < 1e-5
        for a, e in parts:
            assert np.array_equal(next(results)[-1], whole[a:e]), (a, e)
    assert next(results, None) is None


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("k", [48, 64])
def test_linear_q8_over_many_rows_keeps_a_rows_bits(harness, threads, k, tmp_path):
    # Many row blocks (48 rows each; 16 on AMX, where K = 64 takes it) for the threads to share, against the
    # definition and in parts.
    rng = np.random.default_rng(8)
    m, n = 1900, 72
    x = rng.standard_normal((m, k), np.float32)
    q, s = kernels.quantize_int8(rng.standard_normal((n, k), np.float32))
    wq = kernels.pack_panels_int8(q)
    b = rng.standard_normal(n).astype(np.float32)

    def call(rows: slice) -> Call:
        xr = x[rows].copy()
        return Call("LinearQ8", (xr, wq, s, b, np.full((len(xr), n), np.nan, np.float32)))

    big, part, one = harness.run([call(slice(0, m)), call(slice(1795, 1810)), call(slice(1899, m))], threads, tmp_path)
    assert np.array_equal(big[-1], q8_reference(x, q, s) + b)
    assert np.array_equal(part[-1], big[-1][1795:1810]) and np.array_equal(one[-1], big[-1][1899:])


@pytest.mark.parametrize("threads", THREADS)
def test_layer_norm_fused_into_linear_q8_matches_numpy_and_keeps_a_rows_bits(harness, threads, tmp_path):
    rng = np.random.default_rng(12)
    m, n, k = 70, 100, 48
    x = (rng.standard_normal((m, k)) * 3 + 1).astype(np.float32)
    g, beta = rng.standard_normal(k).astype(np.float32), rng.standard_normal(k).astype(np.float32)
    eps = np.array([1e-5], np.float32)
    q, s = kernels.quantize_int8(rng.standard_normal((n, k), np.float32))
    wq = kernels.pack_panels_int8(q)
    b = rng.standard_normal(n).astype(np.float32)

    def call(op, rows, *rest):
        return Call(op, (x[rows].copy(), g, beta, eps, wq, s, *rest, np.full((len(x[rows]), n), np.nan, np.float32)))

    every = slice(0, m)
    got = harness.run([call("LnLinearQ8", every, b), call("LnLinearQ8Gelu", every, b), call("LnLinearQ8", every),
                       call("LnLinearQ8Gelu", slice(3, 4), b), call("LnLinearQ8Gelu", slice(60, 70), b)],
                      threads, tmp_path)
    x64 = x.astype(np.float64)
    ln = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5) * g + beta
    ref = ln @ (q.astype(np.float64) * s[:, None]).T + b
    scale = 1 + np.abs(ref).max()
    # the rounding of each normed row to int16 (half a step of max|row| / 32,767 per element) is what is left
    assert np.abs(got[0][-1] - ref).max() / scale < 1e-4
    assert np.abs(got[1][-1] - _gelu(ref)).max() / scale < 1e-4
    assert np.abs(got[2][-1] - (ref - b)).max() / scale < 1e-4
    assert np.array_equal(got[3][-1], got[1][-1][3:4]) and np.array_equal(got[4][-1], got[1][-1][60:70])


# ---- CachedAttention --------------------------------------------------------------------------------------------


def _attention_call(qkv, kc, vc, write_base, read_base, pos, L: int, nh: int) -> Call:
    d = qkv.shape[-1] // 3
    meta, scale = np.array([L, nh], np.int32), np.array([0.125], np.float32)
    y = np.full((*pos.shape, d), np.nan, np.float32)
    return Call("CachedAttention", (qkv, kc, vc, write_base, read_base, pos, meta, scale, y))


def _attention_case(hs: int, flat: bool):
    """As tests/test_model_kernels.py: two sequences of 7 tokens, one continuing its slot at 30, one starting one;
    as rows of one sequence each, or one row of both (read_base per token)."""
    rng = np.random.default_rng(hs + flat)
    nh, L, slots, T = 2, 64, 3, 7
    d = nh * hs
    kc = rng.standard_normal((slots * nh * L, hs)).astype(np.float32)
    vc = rng.standard_normal((slots * nh * L, hs)).astype(np.float32)
    pos = np.array([np.arange(30, 30 + T), np.arange(T)], np.int32)
    base = np.array([2, 0]) * nh * L
    if flat:
        pos = pos.reshape(1, -1)
        read_base = np.repeat(base, T).astype(np.int32)
    else:
        read_base = base.astype(np.int32)
    token_base = np.repeat(base, T)
    qkv = rng.standard_normal((*pos.shape, 3 * d)).astype(np.float32)
    write_base = (token_base + pos.reshape(-1)).astype(np.int32)
    return _attention_call(qkv, kc, vc, write_base, read_base, pos, L, nh), token_base, nh, L


def _check_attention(call: Call, got: list[np.ndarray], token_base, nh: int, L: int):
    qkv, kc, vc, _, _, pos = call.tensors[:6]
    hs, d = kc.shape[1], qkv.shape[-1] // 3
    q_all, p_all = qkv.reshape(-1, 3 * d), pos.reshape(-1)
    want_k, want_v = kc.copy(), vc.copy()
    for t in range(len(p_all)):
        for h in range(nh):
            row = token_base[t] + h * L + p_all[t]
            want_k[row] = q_all[t, d + h * hs : d + (h + 1) * hs]
            want_v[row] = q_all[t, 2 * d + h * hs : 2 * d + (h + 1) * hs]
    assert np.array_equal(got[1], want_k) and np.array_equal(got[2], want_v)  # this step's keys and values written
    y_all = got[-1].reshape(-1, d)
    for t in range(len(p_all)):
        for h in range(nh):
            rows = token_base[t] + h * L + np.arange(p_all[t] + 1)  # the token sees itself and what precedes
            q = q_all[t, h * hs : (h + 1) * hs].astype(np.float64)
            s = want_k[rows].astype(np.float64) @ q * 0.125
            p = np.exp(s - s.max())
            ref = (p / p.sum()) @ want_v[rows].astype(np.float64)
            assert np.abs(y_all[t, h * hs : (h + 1) * hs] - ref).max() < 1e-5, (t, h)


ATTENTION_CASES = [(hs, flat) for hs in (16, 64) for flat in (False, True)]  # 64: GPT-2's head size


@pytest.mark.parametrize("threads", THREADS)
def test_cached_attention_matches_numpy(harness, threads, tmp_path):
    cases = [_attention_case(hs, flat) for hs, flat in ATTENTION_CASES]
    results = harness.run([c[0] for c in cases], threads, tmp_path)
    for (call, token_base, nh, L), got in zip(cases, results):
        _check_attention(call, got, token_base, nh, L)


def _chunked_prefill_calls(chunks: list[tuple[int, int]]) -> list[Call]:
    # One sequence of 23 tokens in slot 0, prefilled chunk by chunk: before each chunk the cache holds the keys and
    # values of the tokens before it (as the previous calls left it).
    rng = np.random.default_rng(5)
    nh, hs, L, T = 2, 64, 40, 23
    d = nh * hs
    qkv = rng.standard_normal((T, 3 * d)).astype(np.float32)
    calls = []
    for a, e in chunks:
        kc = np.zeros((nh * L, hs), np.float32)
        vc = np.zeros((nh * L, hs), np.float32)
        for h in range(nh):
            kc[h * L : h * L + a] = qkv[:a, d + h * hs : d + (h + 1) * hs]
            vc[h * L : h * L + a] = qkv[:a, 2 * d + h * hs : 2 * d + (h + 1) * hs]
        pos = np.arange(a, e, dtype=np.int32)[None]
        calls.append(_attention_call(qkv[None, a:e].copy(), kc, vc, pos[0].copy(), np.zeros(1, np.int32), pos, L, nh))
    return calls


def _decode_calls() -> list[Call]:
    # Three sequences' next tokens (slots 2, 0, 1 at positions 9, 30, 4): as three rows, as one row of packed
    # sequences (read_base per token), and each alone.
    rng = np.random.default_rng(6)
    nh, hs, L = 2, 64, 40
    d = nh * hs
    kc = rng.standard_normal((3 * nh * L, hs)).astype(np.float32)
    vc = rng.standard_normal((3 * nh * L, hs)).astype(np.float32)
    qkv = rng.standard_normal((3, 3 * d)).astype(np.float32)
    slot_base = np.array([2, 0, 1], np.int32) * nh * L
    pos = np.array([9, 30, 4], np.int32)
    write = (slot_base + pos).astype(np.int32)
    calls = [
        _attention_call(qkv[:, None].copy(), kc, vc, write, slot_base, pos[:, None].copy(), L, nh),
        _attention_call(qkv[None].copy(), kc, vc, write, slot_base, pos[None].copy(), L, nh),
    ]
    for i in range(3):
        calls.append(_attention_call(qkv[None, i : i + 1].copy(), kc, vc, write[i : i + 1].copy(),
                                     slot_base[i : i + 1].copy(), pos[None, i : i + 1].copy(), L, nh))
    return calls


@pytest.mark.parametrize("threads", THREADS)
def test_attention_gives_a_token_the_same_bits_in_any_chunking_or_batch(harness, threads, tmp_path):
    T = 23
    plans = [[(0, T)], [(a, min(a + 3, T)) for a in range(0, T, 3)], [(a, a + 1) for a in range(T)]]
    calls = [c for plan in plans for c in _chunked_prefill_calls(plan)]
    decode = _decode_calls()
    results = harness.run(calls + decode, threads, tmp_path)
    outs = [got[-1].reshape(-1, got[-1].shape[-1]) for got in results]
    whole, at = outs[0], 1
    for plan in plans[1:]:
        assert np.array_equal(whole, np.concatenate(outs[at : at + len(plan)])), plan[0]
        at += len(plan)
    rows, packed, *alone = outs[at:]
    assert np.array_equal(rows, packed) and np.array_equal(rows, np.concatenate(alone))


# ---- Block: a layer's five ops in one --------------------------------------------------------------------------

BD, BNH, BF, BL, BSLOTS = 128, 2, 256, 48, 3  # d, heads (of 64), MLP width, max_seq_len, slots (+ a scratch slot)
BSTRIDE = BNH * BL  # cache rows per slot
# Sequences as (slot, first position, tokens): one flat pass (B = 1, read_base per token) of 1, 3 or 37 tokens, or
# rows (B, T) with a read_base per row and padding.
BLOCK_STEPS = {
    "flat-1": ([(2, 20, 1)], True),
    "flat-3": ([(0, 5, 1), (2, 40, 1), (1, 0, 1)], True),
    "flat-37": ([(1, 10, 25), (2, 0, 10), (0, 30, 2)], True),
    "rows-2x3": ([(1, 12, 3), (2, 0, 2)], False),
}
BLOCK_FORMS = ("plain", "panels", "int8")  # each weight w, its panels alone, or int8 panels and scales


@dataclass
class BlockCase:
    """A layer's step: Block's inputs (see cpu_kernels.c), and the five ops' names for its weight form."""

    x: np.ndarray
    ln: tuple  # (ln_1, ln_2), each (g, b, eps)
    weights: tuple  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj: (weight tensors, bias)
    attention: tuple  # k_cache, v_cache, write_base, read_base, positions, meta, scale
    ops: tuple  # LnLinear, LinearAdd, LnLinearGelu or their Q8 forms

    def block(self) -> Call:
        (wa, ba), (wp, bp), (wf, bf), (wo, bo) = self.weights
        kc, vc, *rest = self.attention
        return Call("Block", (self.x, *self.ln[0], *wa, ba, kc.copy(), vc.copy(), *rest, *wp, bp, *self.ln[1], *wf,
                              bf, *wo, bo, np.full_like(self.x, np.nan)))

    def caches(self, got: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The caches among a Block call's tensors after the call: after x, ln_1 and c_attn's tensors."""
        at = 5 + len(self.weights[0][0])
        return got[at], got[at + 1]


def _block_case(name: str, form: str, nr: int) -> BlockCase:
    seqs, flat = BLOCK_STEPS[name]
    rng = np.random.default_rng(list(BLOCK_STEPS).index(name) * 10 + BLOCK_FORMS.index(form))
    if flat:
        pos = np.concatenate([np.arange(p, p + n) for _, p, n in seqs])[None]
        read = np.concatenate([np.full(n, s * BSTRIDE) for s, _, n in seqs])
        write = read + pos[0]
    else:
        pos = np.full((len(seqs), max(n for _, _, n in seqs)), -1)
        for i, (_, p, n) in enumerate(seqs):
            pos[i, :n] = np.arange(p, p + n)
        read = np.array([s * BSTRIDE for s, _, _ in seqs])
        write = read[:, None] + pos
        write[pos < 0] = BSLOTS * BSTRIDE + np.flatnonzero(pos.reshape(-1) < 0) % BL  # scratch rows for padding
        write = write.reshape(-1)
    hs = BD // BNH
    caches = [rng.standard_normal(((BSLOTS + 1) * BSTRIDE, hs)).astype(np.float32) for _ in range(2)]
    attention = (*caches, write.astype(np.int32), read.astype(np.int32), pos.astype(np.int32),
                 np.array([BL, BNH], np.int32), np.array([hs**-0.5], np.float32))

    def norm():
        return ((1 + 0.1 * rng.standard_normal(BD)).astype(np.float32),
                (0.1 * rng.standard_normal(BD)).astype(np.float32), np.array([1e-5], np.float32))

    weights = []
    for n, k in ((3 * BD, BD), (BD, BD), (BF, BD), (BD, BF)):
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        if form == "int8":
            q, sc = kernels.quantize_int8(w)
            tensors = (kernels.pack_panels_int8(q), sc)
        else:
            tensors = (w,) if form == "plain" else (_panels(w, nr),)
        weights.append((tensors, (0.1 * rng.standard_normal(n)).astype(np.float32)))
    x = rng.standard_normal((*pos.shape, BD)).astype(np.float32)
    ops = ("LnLinear", "LinearAdd", "LnLinearGelu")
    if form == "int8":
        ops = tuple(op.replace("Linear", "LinearQ8") for op in ops)
    return BlockCase(x, (norm(), norm()), tuple(weights), attention, ops)


def _five_ops(harness: Harness, cases: list[BlockCase], threads: int, tmp: Path) -> list[tuple[np.ndarray, ...]]:
    """Each case's step as the five ops (each run's outputs are the next one's inputs): (y, k_cache, v_cache)."""

    def out(x: np.ndarray, n: int) -> np.ndarray:
        return np.full((*x.shape[:-1], n), np.nan, np.float32)

    def stage(make) -> list:
        return [got[-1] for got in harness.run([make(c, i) for i, c in enumerate(cases)], threads, tmp)]

    # ln_1 and c_attn
    qkv = stage(lambda c, i: Call(c.ops[0], (c.x, *c.ln[0], *c.weights[0][0], c.weights[0][1], out(c.x, 3 * BD))))
    # attention, writing the caches: keep them too
    att = harness.run([Call("CachedAttention", (qkv[i], c.attention[0].copy(), c.attention[1].copy(),
                                                *c.attention[2:], out(c.x, BD))) for i, c in enumerate(cases)],
                      threads, tmp)
    # attn.c_proj + x; ln_2, c_fc and GELU; mlp.c_proj + x2
    x2 = stage(lambda c, i: Call(c.ops[1], (att[i][-1], *c.weights[1][0], c.weights[1][1], c.x, out(c.x, BD))))
    h = stage(lambda c, i: Call(c.ops[2], (x2[i], *c.ln[1], *c.weights[2][0], c.weights[2][1], out(c.x, BF))))
    y = stage(lambda c, i: Call(c.ops[1], (h[i], *c.weights[3][0], c.weights[3][1], x2[i], out(c.x, BD))))
    return [(y[i], att[i][1], att[i][2]) for i in range(len(cases))]


@pytest.mark.parametrize("threads", THREADS)
def test_block_computes_the_five_ops_bits(harness, threads, tmp_path):
    cases = [_block_case(name, form, harness.panel_width) for name in BLOCK_STEPS for form in BLOCK_FORMS]
    fused = harness.run([c.block() for c in cases], threads, tmp_path)
    five = _five_ops(harness, cases, threads, tmp_path)
    names = [(n, f) for n in BLOCK_STEPS for f in BLOCK_FORMS]
    for case, got, want, (name, form) in zip(cases, fused, five, names):
        y, (kc, vc) = got[-1], case.caches(got)
        assert np.isfinite(y).all(), (name, form)
        assert np.array_equal(y, want[0]), (name, form)
        assert np.array_equal(kc, want[1]) and np.array_equal(vc, want[2]), (name, form)


# ---- every thread computes in the caller's floating-point mode -----------------------------------------------


@pytest.mark.parametrize("threads", THREADS)
def test_worker_threads_take_the_callers_denormal_mode(harness, threads, tmp_path):
    # Products of ~1e-20 and their sums over k = 64 are denormal (below 1.2e-38): zero where the caller flushes
    # denormals (MindSpore's threads do), on whichever thread computes them; kept where it does not.
    rng = np.random.default_rng(7)
    w = (rng.uniform(0.5, 1, (512, 64)) * 1e-20).astype(np.float32)
    # int8 weights (1 .. 127, scales of 1) times denormal x: outputs below 64 * 127 * 1e-42, denormal too (x read as
    # zero where denormals are flushed).
    wq = kernels.pack_panels_int8(rng.integers(1, 128, (512, 64)).astype(np.int8))
    ones = np.ones(512, np.float32)
    calls = []
    for m in (1, 20):  # the few-rows path and the blocked one
        x = (rng.uniform(0.5, 1, (m, 64)) * 1e-20).astype(np.float32)
        xq = (rng.uniform(0.5, 1, (m, 64)) * 1e-42).astype(np.float32)
        for flush in (False, True):
            calls.append(Call("Linear", (x, w, np.full((m, 512), np.nan, np.float32)), flush=flush))
            calls.append(Call("LinearQ8", (xq, wq, ones, np.full((m, 512), np.nan, np.float32)), flush=flush))
    results = harness.run(calls, threads, tmp_path)
    for call, got in zip(calls, results):
        y = got[-1]
        assert (y == 0).all() if call.flush else (y > 0).all(), (call.op, call.tensors[0].shape, call.flush)


# ---- across builds ------------------------------------------------------------------------------------------------


def test_builds_agree_bitwise_where_their_arithmetic_is_the_same(build, tmp_path):
    # Linear is one FMA chain per output element in k order with the same epilogue on every path, and LinearQ8
    # exact integer sums then the same float32 steps, so every build gives the same bits; attention's dot products
    # (and Block's layer norms) end in a vector sum, whose lane order NEON shares with the portable path (x86's
    # wider vectors add 8 or 16 lanes).
    built = {name: build(name) for name in BUILDS}

    def linear_calls(nr: int) -> list[Call]:
        q8_exact, q8_gelu, _, q8_rows = _q8_case(100, 272)
        # q8_rows[:8]: the first 1 .. 8 rows, decode's paths
        return [c for c, _ in _linear_case(100, 272, nr)[0][:4] + q8_exact] + [q8_gelu[0]] + q8_rows[:8]

    linear = {name: linear_calls(h.panel_width) for name, h in built.items()}
    n_linear = len(linear["native"])
    attention = [_attention_case(hs, flat)[0] for hs, flat in ATTENTION_CASES]
    attention += _chunked_prefill_calls([(0, 23)]) + _decode_calls()
    block = {name: [_block_case("flat-37", form, h.panel_width).block() for form in BLOCK_FORMS]
             for name, h in built.items()}
    out = {name: h.run(linear[name] + attention + block[name], 1, tmp_path) for name, h in built.items()}
    for name in BUILDS:
        for i, (a, b) in enumerate(zip(out[name][:n_linear], out["native"][:n_linear])):
            assert np.array_equal(a[-1], b[-1]), (name, linear[name][i].op)
    for a, b in zip(out["aarch64"][n_linear:], out["portable"][n_linear:]):
        assert np.array_equal(a[-1], b[-1])


def test_the_emulated_amx_build_takes_the_tiles_exactly_where_it_should(build, tmp_path):
    # Its outputs are the vector path's bits, so only a count of the emulated tile products shows which path ran:
    # calls of 16 rows or more with K a multiple of 64, unless GPT2_AMX=0.
    h = build("avx512")
    rng = np.random.default_rng(3)

    def products(m: int, k: int, env: dict | None = None) -> int:
        q, s = kernels.quantize_int8(rng.standard_normal((40, k), np.float32))
        x = rng.standard_normal((m, k), np.float32)
        h.run([Call("LinearQ8", (x, kernels.pack_panels_int8(q), s, np.zeros((m, 40), np.float32)))], 1, tmp_path,
              env={"GPT2_EMULATED_AMX_COUNT": "1", **(env or {})})
        return int(re.search(r"emulated tile products: (\d+)", h.stderr).group(1))

    # 16 rows: one block of 16; K = 128: two 64-deep steps; 40 columns: two pairs of panels; 4 products each
    assert products(16, 128) == 1 * 2 * 2 * 4
    assert products(33, 64) == 3 * 1 * 2 * 4
    assert products(15, 128) == 0 and products(16, 48) == 0
    assert products(16, 128, {"GPT2_AMX": " off "}) == 0


@pytest.mark.parametrize("name", ["avx512", "avx512bw"])
def test_the_avx512_builds_take_the_avx512_branches(build, name):
    # Their panels are 32 floats wide (two 16-float vectors), as on a real AVX-512 machine; AVX2's are 16.
    assert build(name).panel_width == 32


def test_the_native_build_multiplies_int8_weights_with_avx512_where_the_cpu_has_it(build):
    # Only a machine with AVX-512 compiles the 512-bit branches into the real library; there, the Q8 ops' products
    # are vpdpwssd (VNNI) or vpmaddwd on zmm registers.
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    if "avx512bw" not in flags:
        pytest.skip("this CPU has no AVX-512 (BW)")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.fail("objdump (binutils) is needed")
    text = subprocess.run([objdump, "-d", str(build("native").obj)], capture_output=True, text=True, timeout=60,
                          check=True).stdout
    op = "vpdpwssd" if "avx512_vnni" in flags else "vpmaddwd"
    assert re.search(op + r"\s+.*%zmm", text), f"no {op} on zmm registers in the native build"
    if "amx_int8" in flags:  # and the tile path for 16 rows or more
        assert "tdpbssd" in text and "tdpbusd" in text


def test_the_arm_build_multiplies_with_neon_fmas(build):
    # The Linear micro-kernel's multiply-adds are NEON FMLAs by element (a row's x broadcast from a lane), the Q8
    # ops' int8 weights are widened to int16 eight at a time and multiplied into int32 sums by SMLAL (by element:
    # x's int16 broadcast from a lane), and nothing falls back to scalar FMAs.
    h = build("aarch64")
    objdump = shutil.which("aarch64-linux-gnu-objdump") or shutil.which("objdump")
    if objdump is None:
        pytest.fail(MISSING_CROSS_TOOLS)
    text = subprocess.run([objdump, "-d", str(h.obj)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert re.search(r"fmla\s+v\d+\.4s, v\d+\.4s, v\d+\.s\[\d\]", text)
    assert re.search(r"sxtl\s+v\d+\.8h, v\d+\.8b", text)
    assert re.search(r"smlal\s+v\d+\.4s, v\d+\.4h, v\d+\.h\[\d\]", text)
    scalar = re.findall(r"\bfmadd\s+s\d+", text)
    # NEON's vfma is written per lane (cpu_kernels.c says why); code that reads a vector's lanes one by one can
    # lead the compiler to do those FMAs one lane at a time.
    assert not scalar, f"{len(scalar)} scalar FMAs in the ARM build: a vector loop was not vectorised"
