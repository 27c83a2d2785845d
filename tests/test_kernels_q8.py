"""model.kernels' int8-weight projections (the Q8 ops, `--quantize int8`): quantize_int8 and pack_panels_int8
against their numpy definitions, every op against float64 numpy and bit for bit against the numpy definition of
its integer arithmetic (model_helpers.q8_reference), a row's bits independent of the call (batch invariance), and
the ops inside MindSpore graphs."""

from __future__ import annotations

import ctypes
import platform
import tracemalloc

import numpy as np
import pytest

from model import kernels
from model.runtime import set_device
from model_helpers import aot_call, q8_reference

EPS = 1e-5
# (N, K): an edge panel and K past one KC block (256); N not a multiple of any panel width; one panel (or half
# of one), K = 16; GPT-2's K = 768 with N one past a multiple of 256.
SHAPES = [(100, 272), (530, 48), (16, 16), (257, 768)]


def _row_tile() -> int:
    # cpu_kernels.c's MR (rows per register tile) for this build, from its panel width (NR): AVX-512, AVX2, then
    # NEON or the portable path.
    nr = kernels.panel_width()
    return {32: 14, 16: 6}.get(nr, 8 if platform.machine() == "aarch64" else 4)


MR = _row_tile()
ROW_COUNTS = sorted({1, 2, 3, MR, MR + 1, 37, 300})


@pytest.fixture(scope="module")
def lib():
    return ctypes.CDLL(kernels.library_path())


def _call(lib, name: str, *arrays: np.ndarray) -> int:
    return aot_call(lib, name, *arrays)


def _quantize_reference(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # The definition, on the whole matrix at once.
    s = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    s = np.where(s == 0, np.float32(1), s)
    return np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8), s


def _gelu(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v / (1 + np.exp(-1.5957691216057308 * (v + 0.044715 * v**3)))


def _layer_norm(x: np.ndarray, g: np.ndarray, beta: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + EPS) * g + beta


class Case:
    """A weight quantized and packed, with float32 inputs for every op and their float64 references."""

    def __init__(self, m: int, n: int, k: int, seed: int = 0):
        rng = np.random.default_rng(seed + 1000 * m + n + k)
        self.m, self.n, self.k = m, n, k
        self.x = rng.standard_normal((m, k), np.float32) * 2
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        self.q, self.s = kernels.quantize_int8(w)
        self.wq = kernels.pack_panels_int8(self.q)
        self.b = rng.standard_normal(n).astype(np.float32)
        self.r = rng.standard_normal((m, n)).astype(np.float32)
        self.g = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
        self.beta = (0.1 * rng.standard_normal(k)).astype(np.float32)
        self.eps = np.array([EPS], np.float32)
        self.w64 = self.q.astype(np.float64) * self.s[:, None]

    def ops(self):
        """(op, inputs, float64 reference) for every op and form."""
        mm = self.x.astype(np.float64) @ self.w64.T
        ln = _layer_norm(self.x, self.g, self.beta) @ self.w64.T
        lnx = (self.g, self.beta, self.eps)
        return [
            ("LinearQ8", (self.x, self.wq, self.s), mm),
            ("LinearQ8", (self.x, self.wq, self.s, self.b), mm + self.b),
            ("LinearQ8Gelu", (self.x, self.wq, self.s, self.b), _gelu(mm + self.b)),
            ("LinearQ8Add", (self.x, self.wq, self.s, self.b, self.r), mm + self.b + self.r),
            ("LnLinearQ8", (self.x, *lnx, self.wq, self.s), ln),
            ("LnLinearQ8", (self.x, *lnx, self.wq, self.s, self.b), ln + self.b),
            ("LnLinearQ8Gelu", (self.x, *lnx, self.wq, self.s, self.b), _gelu(ln + self.b)),
        ]


def _run(lib, op: str, inputs, rows: int, n: int) -> np.ndarray:
    y = np.full((rows, n), np.nan, np.float32)
    assert _call(lib, op, *inputs, y) == 0, op
    return y


# ---- quantize_int8 and pack_panels_int8 ----------------------------------------------------------------------


def test_quantize_int8_matches_its_definition():
    rng = np.random.default_rng(0)
    # K = 4096: 256 rows per chunk, so 600 rows cross two chunk boundaries.
    w = rng.standard_normal((600, 4096)).astype(np.float32)
    w[3] = 0  # a row of zeros: scale 1, zeros
    w[4] = -w[4] * 1e3  # a row whose largest magnitude is negative (-127) ...
    w[4, 7] = -np.abs(w[4]).max() * 2
    w[5] *= 1e-30  # ... and tiny values, scaled like any others
    q, s = kernels.quantize_int8(w)
    want_q, want_s = _quantize_reference(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and q.shape == w.shape and s.shape == (600,)
    assert np.array_equal(q, want_q) and np.array_equal(s, want_s)
    assert s[3] == 1 and not q[3].any()
    assert q[4, 7] == -127 and (np.abs(q).max(axis=1)[np.arange(600) != 3] == 127).all()
    # Round to nearest: within half a step of the weight.
    err = np.abs(q.astype(np.float64) * s[:, None] - w) / s[:, None]
    assert err.max() <= 0.5 + 1e-3
    assert q.min() >= -127  # symmetric: -128 never used
    q64, s64 = kernels.quantize_int8(w.astype(np.float64))  # any float input: quantized in float32
    assert np.array_equal(q64, q) and np.array_equal(s64, s)


def test_quantize_int8_works_in_chunks_of_rows():
    # A 6400 x 1600 weight (GPT-2 XL's c_fc, 41 MB): the temporaries stay a few MB, not a copy of the matrix (in
    # float64, two).
    w = np.random.default_rng(1).standard_normal((6400, 1600)).astype(np.float32)
    tracemalloc.start()
    try:
        q, s = kernels.quantize_int8(w)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - q.nbytes - s.nbytes < 24e6, peak
    assert np.array_equal(q[-5:], _quantize_reference(w[-5:])[0])


def test_quantize_int8_refuses_what_it_cannot_quantize():
    with pytest.raises(ValueError, match="NaN or infinite"):
        kernels.quantize_int8(np.array([[1, 2], [np.inf, 0]], np.float32))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        kernels.quantize_int8(np.ones(8, np.float32))
    with pytest.raises(ValueError, match="int8"):
        kernels.pack_panels_int8(np.ones((4, 16), np.float32))


def test_int8_panels_hold_16_columns_with_ks_in_pairs():
    rng = np.random.default_rng(2)
    for n in (3, 16, 33, 530):
        q = rng.integers(-127, 128, (n, 48)).astype(np.int8)
        p = kernels.pack_panels_int8(q)
        assert p.dtype == np.int8 and p.shape == (-(-n // 16), 48, 16)
        pairs = p.reshape(-1, 24, 16, 2)  # [panel][k // 2][column][k % 2]
        for panel, kp, j, t in ((0, 0, 0, 0), (0, 0, 0, 1), (0, 5, 2, 1), (len(pairs) - 1, 23, (n - 1) % 16, 0)):
            assert pairs[panel, kp, j, t] == q[16 * panel + j, 2 * kp + t]
        columns = pairs.transpose(0, 2, 1, 3).reshape(-1, 48)  # W's rows, then zero rows up to a whole panel
        assert np.array_equal(columns[:n], q) and not columns[n:].any()
    with pytest.raises(ValueError, match="K even"):
        kernels.pack_panels_int8(np.ones((4, 15), np.int8))


# ---- the ops -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", ROW_COUNTS)  # decode (1), the few-rows tile (up to MR), the packed GEMM
@pytest.mark.parametrize("n,k", SHAPES)
def test_q8_ops_match_numpy(lib, m, n, k):
    # Against float64 on the dequantized weights: what is left is the rounding of x to int16, at most half a step
    # (max|x| / QMAX, QMAX 32,767 for these K) per element, far below the weights' own int8 rounding (1/254 of
    # each row's range).
    c = Case(m, n, k)
    for op, inputs, want in c.ops():
        y = _run(lib, op, inputs, m, n)
        assert np.abs(y - want).max() / (1 + np.abs(want).max()) < 1e-4, (op, len(inputs))


@pytest.mark.parametrize("n,k", SHAPES)
def test_a_rows_bits_do_not_depend_on_the_call(lib, n, k):
    # Rows of a 300-row call, computed again alone, among the first m rows, or after m rows that are not in the
    # big call (other neighbours, other positions, other paths): bitwise the same.
    big = Case(300, n, k, seed=1)
    other = np.random.default_rng(3).standard_normal((300, k), np.float32)
    for op, inputs, _ in big.ops():
        whole = _run(lib, op, inputs, 300, n)

        def rows(x: np.ndarray, r: np.ndarray) -> tuple:
            # the op's inputs for other rows x (with their residual r, for LinearQ8Add)
            args = (x, *inputs[1:])
            return args[:-1] + (r,) if op == "LinearQ8Add" else args

        for i in (0, 5, 150, 299):
            alone = _run(lib, op, rows(big.x[i : i + 1].copy(), big.r[i : i + 1].copy()), 1, n)
            assert np.array_equal(alone, whole[i : i + 1]), (op, i)
        for m in ROW_COUNTS[1:]:
            first = _run(lib, op, rows(big.x[:m].copy(), big.r[:m].copy()), m, n)
            assert np.array_equal(first, whole[:m]), (op, m)
            # m foreign rows, then rows 0 .. m-1 of the big call
            mixed = _run(lib, op, rows(np.concatenate([other[:m], big.x[:m]]), np.concatenate([big.r[:m]] * 2)),
                         2 * m, n)
            assert np.array_equal(mixed[m:], whole[:m]), (op, m)


@pytest.mark.parametrize("m", ROW_COUNTS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_q8_is_its_integer_definition_bit_for_bit(lib, m, n, k):
    # Exact integer sums, then ((float)sum * sx) * s, then the bias (and the residual) in float32: numpy's float32
    # gives the same bits on every path (decode, few rows, many), as it does on every machine.
    c = Case(m, n, k, seed=2)
    y0 = q8_reference(c.x, c.q, c.s)
    assert np.array_equal(_run(lib, "LinearQ8", (c.x, c.wq, c.s), m, n), y0)
    assert np.array_equal(_run(lib, "LinearQ8", (c.x, c.wq, c.s, c.b), m, n), y0 + c.b)
    assert np.array_equal(_run(lib, "LinearQ8Add", (c.x, c.wq, c.s, c.b, c.r), m, n), (y0 + c.b) + c.r)


def test_q8_rows_at_the_edges(lib):
    # The largest sums an int32 holds for GPT-2 1.5B's widest K (6,400: QMAX 2,621) with every weight at 127 and
    # every x at its row's maximum; a row of zeros; a row of tiny and of huge values; a row with a NaN or an
    # infinity (NaN outputs, as the float32 path gives, and no harm to the other rows).
    k, n = 6400, 16
    q = np.full((n, k), 127, np.int8)
    q[1::2] = -127
    s = np.full(n, 1 / 127, np.float32)
    x = np.ones((6, k), np.float32)
    x[1] = 0
    x[2] *= 1e-30
    x[3] *= 1e30
    x[4, 5] = np.nan
    x[5, 7] = -np.inf
    y = _run(lib, "LinearQ8", (x, kernels.pack_panels_int8(q), s), 6, n)
    assert np.array_equal(y[:4], q8_reference(x[:4], q, s))
    assert np.allclose(y[0], np.where(np.arange(n) % 2, -k, k), rtol=1e-6)  # no int32 overflow
    assert not y[1].any() and np.isfinite(y[3]).all()
    assert np.isnan(y[4:]).all()


def test_q8_ops_refuse_inputs_that_do_not_fit(lib):
    c = Case(3, 100, 48)
    y = np.zeros((3, 100), np.float32)
    nr = 16  # the int8 panels' width on every machine
    assert _call(lib, "LinearQ8", c.x, c.wq, c.s, c.b, y) == 0
    bad_panels = np.zeros((c.wq.shape[0] + 1, 48, nr), np.int8)  # one panel too many for N
    assert _call(lib, "LinearQ8", c.x, bad_panels, c.s, c.b, y) != 0
    assert _call(lib, "LinearQ8", c.x, np.zeros((c.wq.shape[0], 48, 2 * nr), np.int8), c.s, c.b, y) != 0
    assert _call(lib, "LinearQ8", c.x, np.zeros((c.wq.shape[0], 64, nr), np.int8), c.s, c.b, y) != 0  # K
    # float32 panels have the same shape: refused where the caller (MindSpore) names the dtype
    fp = kernels.pack_panels(c.q.astype(np.float32))
    assert _call(lib, "LinearQ8", c.x, fp, c.s, c.b, y) != 0
    assert _call(lib, "LinearQ8Add", c.x, c.wq, c.s, c.b, y) != 0  # no residual
    # no rows: nothing to do, on a thread's first call as on any other (no buffer needed)
    import threading

    rc = []
    empty = (np.zeros((0, 48), np.float32), c.wq, c.s, c.b, np.zeros((0, 100), np.float32))
    t = threading.Thread(target=lambda: rc.append(_call(lib, "LinearQ8", *empty)))
    t.start()
    t.join()
    assert rc == [0]
    assert _call(lib, "LnLinearQ8", c.x, c.g, c.beta, c.eps, fp, c.s, y) != 0


# ---- inside MindSpore graphs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph_ops():
    set_device("CPU")
    return kernels.step_kernels_q8()


def _cell(op):
    from mindspore import nn

    class Op(nn.Cell):
        def __init__(self):
            super().__init__()
            self.op = op

        def construct(self, *args):
            return self.op(*args)

    return Op()


def _graph_forms(c: Case):
    lnx = (c.g, c.beta, c.eps)
    return [
        ("linear", "LinearQ8", (c.x, c.wq, c.s, c.b)),
        ("linear_nobias", "LinearQ8", (c.x, c.wq, c.s)),
        ("linear_gelu", "LinearQ8Gelu", (c.x, c.wq, c.s, c.b)),
        ("linear_add", "LinearQ8Add", (c.x, c.wq, c.s, c.b, c.r)),
        ("ln_linear", "LnLinearQ8", (c.x, *lnx, c.wq, c.s, c.b)),
        ("ln_linear_nobias", "LnLinearQ8", (c.x, *lnx, c.wq, c.s)),
        ("ln_linear_gelu", "LnLinearQ8Gelu", (c.x, *lnx, c.wq, c.s, c.b)),
    ]


@pytest.mark.parametrize("m", [1, 37])
def test_the_ops_run_in_mindspore_graphs_with_the_same_bits(graph_ops, lib, m):
    # Graph mode: MindSpore passes the int8 panels as int8 (the kernels check its dtype name) and the kernels give
    # the bits of a direct call; x as (B, T, K), as in the step graph.
    import mindspore as ms
    from mindspore import Tensor

    c = Case(m, 257, 64, seed=4)
    assert set(graph_ops._fields) == {f for f, _, _ in _graph_forms(c)}
    for field, op, inputs in _graph_forms(c):
        want = _run(lib, op, inputs, m, c.n)
        args = [Tensor(a) for a in inputs]
        args[0] = Tensor(c.x.reshape(1, m, c.k))
        if field == "linear_add":
            args[-1] = Tensor(c.r.reshape(1, m, c.n))
        got = _cell(getattr(graph_ops, field))(*args)
        assert got.dtype == ms.float32 and got.shape == (1, m, c.n), field
        assert np.array_equal(got.asnumpy().reshape(m, c.n), want), field


def test_the_ops_run_in_mindspore_graphs_without_shape_functions(monkeypatch, lib):
    # Without a C++ compiler the ops are registered with Python shape functions (fixed shapes): same results.
    set_device("CPU")
    from mindspore import Tensor

    monkeypatch.setattr(kernels, "dynamic_shapes", lambda: False)
    kernels.step_kernels_q8.cache_clear()
    try:
        ops = kernels.step_kernels_q8()
        c = Case(5, 100, 48, seed=5)
        for field, op, inputs in _graph_forms(c):
            got = _cell(getattr(ops, field))(*[Tensor(a) for a in inputs])
            assert np.array_equal(got.asnumpy(), _run(lib, op, inputs, 5, c.n)), field
    finally:
        kernels.step_kernels_q8.cache_clear()
