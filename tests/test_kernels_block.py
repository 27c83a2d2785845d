"""model.kernels' Block op, a whole layer's step in one call: bitwise what the five ops it replaces compute (their
outputs and the K/V they write), in MindSpore graphs, for every weight form a session uses; and an
InferenceSession's logits are the same with it as without it (GPT2_BLOCK_OP=0)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from model import kernels
from model.runtime import set_device
from model_helpers import SESSION_KW, aot_call, hf_model, our_config, our_model_from_hf, prompts, session_kernels_on

# GPT-2's head size (the attention kernel's register path), two heads, an MLP 4x wide.
D, NH, L, SLOTS = 128, 2, 64, 4
HS = D // NH
STRIDE = NH * L  # cache rows per slot; slot SLOTS is the scratch slot padding writes to
FORMS = ("plain", "panels", "int8", "amx")


def _seq(slot: int, start: int, n: int) -> tuple[int, np.ndarray]:
    return slot, np.arange(start, start + n)


# Flat passes (B = 1, read_base per token, as the dynamic step graph runs): a decode token; three sequences' decode
# tokens; a prompt chunk continuing its slot, a new prompt and two decode tokens (37 tokens).
FLAT = {
    1: [_seq(2, 20, 1)],
    3: [_seq(0, 5, 1), _seq(3, 40, 1), _seq(1, 0, 1)],
    37: [_seq(1, 10, 25), _seq(3, 0, 10), _seq(0, 50, 1), _seq(2, 7, 1)],
}
# Rows (B, T) with a read_base per row and padding (-1) after shorter rows, as fixed-shape graphs run.
ROWS = {
    1: [_seq(2, 9, 1), _seq(0, 30, 1), _seq(1, 4, 1)],
    3: [_seq(1, 12, 3), _seq(3, 0, 2)],
    37: [_seq(0, 0, 37), _seq(2, 20, 21)],
}


def _step_arrays(seqs, flat: bool):
    """positions (B, T), write_base (B*T,), read_base ((B*T,) flat, (B,) rows) as InferenceSession makes them."""
    if flat:
        pos = np.concatenate([p for _, p in seqs])[None]
        base = np.concatenate([np.full(len(p), s * STRIDE) for s, p in seqs])
        return pos.astype(np.int32), (base + pos[0]).astype(np.int32), base.astype(np.int32)
    t = max(len(p) for _, p in seqs)
    pos = np.full((len(seqs), t), -1)
    for i, (_, p) in enumerate(seqs):
        pos[i, : len(p)] = p
    base = np.array([s * STRIDE for s, _ in seqs])
    write = base[:, None] + pos
    pad = pos < 0
    write[pad] = SLOTS * STRIDE + np.arange(pos.size).reshape(pos.shape)[pad] % L  # scratch rows
    return pos.astype(np.int32), write.reshape(-1).astype(np.int32), base.astype(np.int32)


def _five_ops(form: str) -> tuple:
    """A session's kern tuple without the Block op (index 8 None): GPT2Block.cached then calls the five ops."""
    k = kernels.step_kernels()
    if form != "int8":
        return tuple(k) + (None,)
    q8 = kernels.step_kernels_q8()
    return (q8.linear, q8.linear_gelu, q8.linear_add, k.attention, q8.linear_nobias, q8.ln_linear,
            q8.ln_linear_gelu, q8.ln_linear_nobias, None)


def _block_only(form: str) -> tuple:
    # Only the Block op: a graph that still called one of the five ops would not compile.
    blocks = kernels.block_kernels()
    return (None,) * 8 + (blocks.block_q8 if form == "int8" else blocks.block,)


def _packings(block, form: str) -> list[np.ndarray]:
    # The block's projections as InferenceSession packs them (`per` arrays each), or none: the weights themselves.
    if form == "plain":
        return []
    out = []
    for proj in block.projections():
        w = proj.weight.asnumpy()
        if form == "int8":
            q, s = kernels.quantize_int8(w)
            out += [kernels.pack_panels_int8(q), s]
        else:
            out.append(kernels.pack_weight_amx(w) if form == "amx" else kernels.pack_panels(w))
    return out


@pytest.fixture(scope="module")
def block():
    """A GPT-2 block (d 128, 2 heads of 64) with random weights, biases and norms."""
    import mindspore as ms
    from mindspore import Tensor

    from model.gpt2 import GPT2Block

    set_device("CPU")
    cfg = our_config(n_layer=1, n_embd=D, n_head=NH, n_positions=L)
    blk = GPT2Block(cfg, 0, ms.float32)
    rng = np.random.default_rng(0)
    for name, p in blk.parameters_and_names():
        shape = p.shape
        if name.endswith("bias"):
            p.set_data(Tensor((0.1 * rng.standard_normal(shape)).astype(np.float32)))
        elif ".ln_" in f".{name}":
            p.set_data(Tensor((1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)))
        else:
            p.set_data(Tensor((rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)))
    return blk


def _layer_step(block, kern, packed: list[np.ndarray], per: int, kc: np.ndarray, vc: np.ndarray):
    """A graph running block.cached over caches it holds as Parameters (written in place, as the session's)."""
    from mindspore import Parameter, ParameterTuple, Tensor, nn

    from model.gpt2 import step_inputs

    class LayerStep(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)  # the block's parameter names stay its own
            self.block, self.kern, self.per = block, kern, per
            self.k_cache = Parameter(Tensor(kc.copy()), name="k_cache", requires_grad=False)
            self.v_cache = Parameter(Tensor(vc.copy()), name="v_cache", requires_grad=False)
            self.packed = None
            if packed:
                self.packed = ParameterTuple(Parameter(Tensor(a), name=f"packed.{i}", requires_grad=False)
                                             for i, a in enumerate(packed))

        def construct(self, x, positions, write_base, read_base, meta, scale):
            wps = (None, None, None, None)
            p = self.packed
            if p is not None and self.per == 1:
                wps = ((p[0],), (p[1],), (p[2],), (p[3],))
            elif p is not None:
                wps = ((p[0], p[1]), (p[2], p[3]), (p[4], p[5]), (p[6], p[7]))
            # write_rows, read_rows and context_pos are MindSpore's ops' (unused here): any int32 tensor
            step = step_inputs(positions, write_base, write_base, write_base, read_base, meta, scale, write_base)
            return self.block.cached(x, self.k_cache, self.v_cache, step, None, scale, self.kern, wps)

    return LayerStep()


def _run_both(block, form: str, seqs, flat: bool, seed: int = 0):
    """(fused, five ops): each (y, k_cache, v_cache) after one step from the same inputs and cache state."""
    from mindspore import Tensor

    if form == "amx" and not kernels.amx_available():
        pytest.skip("this CPU (or kernel) does not offer AMX")
    rng = np.random.default_rng(seed)
    rows = (SLOTS + 1) * STRIDE
    # Earlier positions' keys and values: the caches as earlier steps left them.
    kc = rng.standard_normal((rows, HS)).astype(np.float32)
    vc = rng.standard_normal((rows, HS)).astype(np.float32)
    pos, write, read = _step_arrays(seqs, flat)
    x = rng.standard_normal((*pos.shape, D)).astype(np.float32)
    args = [Tensor(a) for a in (x, pos, write, read, np.array([L, NH], np.int32), np.array([HS**-0.5], np.float32))]
    packed, per = _packings(block, form), 2 if form == "int8" else 1
    out = []
    for kern in (_block_only(form), _five_ops(form)):
        cell = _layer_step(block, kern, packed, per, kc, vc)
        y = cell(*args)
        assert y.shape == x.shape
        out.append((y.asnumpy(), cell.k_cache.asnumpy(), cell.v_cache.asnumpy()))
    return out, kc


@pytest.mark.parametrize("tokens", sorted(FLAT))
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "rows"])
@pytest.mark.parametrize("form", FORMS)
def test_block_computes_the_five_ops_bits(block, form, flat, tokens):
    seqs = (FLAT if flat else ROWS)[tokens]
    (fused, five), before = _run_both(block, form, seqs, flat, seed=tokens)
    y, k, v = fused
    assert np.isfinite(y).all() and np.abs(y).max() > 0
    assert np.array_equal(y, five[0])
    assert np.array_equal(k, five[1]) and np.array_equal(v, five[2])
    assert not np.array_equal(k, before)  # the step's keys were written


def _padded(pos, write, read, n: int, flat: bool):
    """The step arrays with n padding tokens after the real ones, as a session pads a pass to its bucket: flat, n
    more tokens in the one row; rows (T = 1), n more rows. Padding has position -1 and writes scratch rows."""
    scratch = SLOTS * STRIDE + np.arange(n) % L
    pos = np.concatenate([pos.reshape(-1), np.full(n, -1)]).reshape((1, -1) if flat else (-1, 1))
    read = np.concatenate([read, np.full(n, SLOTS * STRIDE)])
    return pos.astype(np.int32), np.concatenate([write, scratch]).astype(np.int32), read.astype(np.int32)


@pytest.mark.parametrize("form", ["panels", "int8"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "rows"])
def test_trailing_padding_is_not_computed(block, form, flat):
    # The Block op skips a pass's trailing padding: the real tokens get the unpadded pass's bits (outputs and the
    # K/V they write), the padding zeros, and no cache row changes for it (not even the scratch slot's).
    from mindspore import Tensor

    seqs, n = (FLAT[37], 11) if flat else (ROWS[1], 5)
    rng = np.random.default_rng(7)
    kc = rng.standard_normal(((SLOTS + 1) * STRIDE, HS)).astype(np.float32)
    vc = rng.standard_normal(kc.shape).astype(np.float32)
    pos, write, read = _step_arrays(seqs, True)
    if not flat:
        pos = pos.reshape(-1, 1)
    x = rng.standard_normal((*pos.shape, D)).astype(np.float32)
    ppos, pwrite, pread = _padded(pos, write, read, n, flat)
    px = np.concatenate([x, rng.standard_normal((*((1, n) if flat else (n, 1)), D)).astype(np.float32)],
                        axis=1 if flat else 0)
    consts = (np.array([L, NH], np.int32), np.array([HS**-0.5], np.float32))
    packed, per = _packings(block, form), 2 if form == "int8" else 1
    out = []
    for arrays in ((x, pos, write, read), (px, ppos, pwrite, pread)):
        cell = _layer_step(block, _block_only(form), packed, per, kc, vc)
        y = cell(*[Tensor(a) for a in (*arrays, *consts)]).asnumpy()
        out.append((y.reshape(-1, D), cell.k_cache.asnumpy(), cell.v_cache.asnumpy()))
    (y, k, v), (py, pk, pv) = out
    m = y.shape[0]
    assert np.abs(y).max() > 0 and np.array_equal(py[:m], y)
    assert not py[m:].any()
    assert np.array_equal(pk, k) and np.array_equal(pv, v)


def test_block_runs_with_python_shape_functions(monkeypatch, block):
    # Without a C++ compiler the ops are registered with Python shape functions (fixed shapes): the same bits.
    caches = (kernels.step_kernels, kernels.step_kernels_q8, kernels.block_kernels)
    monkeypatch.setattr(kernels, "dynamic_shapes", lambda: False)
    for c in caches:
        c.cache_clear()
    try:
        for form in ("panels", "int8"):
            (fused, five), _ = _run_both(block, form, FLAT[3], True, seed=5)
            assert all(np.array_equal(a, b) for a, b in zip(fused, five)), form
    finally:
        for c in caches:
            c.cache_clear()


def _call(lib, *arrays: np.ndarray) -> int:
    return aot_call(lib, "Block", *arrays)


def test_block_refuses_inputs_that_do_not_fit():
    lib = ctypes.CDLL(kernels.library_path())
    rng = np.random.default_rng(1)
    pos, write, read = _step_arrays(FLAT[3], True)
    x = rng.standard_normal((1, 3, D)).astype(np.float32)
    kc = np.zeros(((SLOTS + 1) * STRIDE, HS), np.float32)
    attention = [kc, kc.copy(), write, read, pos, np.array([L, NH], np.int32), np.array([0.125], np.float32)]

    def inputs(weights):  # weights: each projection's weight tensors and bias
        (wa, ba), (wp, bp), (wf, bf), (wo, bo) = weights
        ln = [np.ones(D, np.float32), np.zeros(D, np.float32), np.array([1e-5], np.float32)]
        return [x, *ln, *wa, ba, *attention, *wp, bp, *ln, *wf, bf, *wo, bo, np.empty_like(x)]

    shapes = ((3 * D, D), (D, D), (4 * D, D), (D, 4 * D))
    ws = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    bs = [np.zeros(s[0], np.float32) for s in shapes]
    q8 = [kernels.quantize_int8(w) for w in ws]
    forms = {
        "plain": [((w,), b) for w, b in zip(ws, bs)],
        "panels": [((kernels.pack_panels(w),), b) for w, b in zip(ws, bs)],
        "int8": [((kernels.pack_panels_int8(q), s), b) for (q, s), b in zip(q8, bs)],
    }
    for form, weights in forms.items():
        assert _call(lib, *inputs(weights)) == 0, form
    bad = list(forms["panels"])
    bad[1] = ((bad[1][0][0],), np.zeros(D + 1, np.float32))  # c_proj's bias one too long
    assert _call(lib, *inputs(bad)) != 0
    bad = list(forms["plain"])
    bad[2] = ((ws[2][:, :-16].copy(),), bs[2])  # c_fc's K is not d
    assert _call(lib, *inputs(bad)) != 0
    # int8 panels in a one-tensor form (float32 panels have their shape), and float32 panels in the int8 form
    mixed = list(forms["panels"])
    mixed[0] = ((forms["int8"][0][0][0],), bs[0])
    assert _call(lib, *inputs(mixed)) != 0
    mixed = list(forms["int8"])
    mixed[3] = ((kernels.pack_panels(ws[3]), q8[3][1]), bs[3])
    assert _call(lib, *inputs(mixed)) != 0
    assert _call(lib, *inputs(forms["plain"])[:-2], np.empty_like(x)) != 0  # a missing input


# ---- a whole session: logits unchanged by the Block op ---------------------------------------------------------


def _session(model, monkeypatch, fused: bool, **kw):
    from model import InferenceSession

    if not session_kernels_on():
        pytest.skip("the CPU kernels are switched off (GPT2_CPU_KERNELS=0) or do not build here")

    monkeypatch.setenv(kernels.ENV_BLOCK, "1" if fused else "0")
    sess = InferenceSession(model, **{**SESSION_KW, "chunk_buckets": (1, 8, 64)}, cpu_kernels=True, **kw)
    assert (sess._cell.kern[8] is not None) == fused
    return sess


def _steps(sess) -> list[np.ndarray]:
    # Two prompts prefilled together (then one chunked), then decode: one token (the fixed-shape graph), two
    # sequences' tokens in one flat pass, and a (B, T) step with padding.
    a, b = prompts(seed=3, lengths=(30, 45))
    z = np.zeros
    out = [sess.step_flat(np.array(a + b[:20]), np.r_[np.arange(30), np.arange(20)], np.r_[z(30, int), z(20, int) + 2],
                          None)]
    out.append(sess.step_flat(np.array(b[20:]), np.arange(20, 45), z(25, int) + 2, np.array([24])))
    for p in range(3):
        out.append(sess.step_flat(np.array([7 + p]), np.array([30 + p]), np.array([0]), np.array([0])))
        out.append(sess.step_flat(np.array([9, 11 + p]), np.array([33 + p, 45 + p]), np.array([0, 2]), None))
    out.append(sess.step(np.array([[5, 6, 7], [8, 0, 0]]), np.array([[36, 37, 38], [48, -1, -1]]), np.array([0, 2]),
                         None))
    return out


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("torch")
    set_device("CPU")
    return our_model_from_hf(hf_model(seed=12))


@pytest.mark.parametrize("kw", [{}, {"packed_weights": True}, {"quantize": "int8"}], ids=["plain", "packed", "int8"])
def test_a_sessions_logits_are_unchanged_by_the_block_op(monkeypatch, model, kw):
    fused = _steps(_session(model, monkeypatch, True, **kw))
    five = _steps(_session(model, monkeypatch, False, **kw))
    for i, (a, b) in enumerate(zip(fused, five)):
        assert np.array_equal(a, b), i


def test_fixed_shape_graphs_give_the_same_logits(monkeypatch, model):
    # Without the shape functions a session compiles one graph per padded shape: the Block op there too.
    monkeypatch.setattr(kernels, "dynamic_shapes", lambda: False)
    caches = (kernels.step_kernels, kernels.step_kernels_q8, kernels.block_kernels)
    for c in caches:
        c.cache_clear()
    try:
        fused = _steps(_session(model, monkeypatch, True, packed_weights=True))
        five = _steps(_session(model, monkeypatch, False, packed_weights=True))
        for i, (a, b) in enumerate(zip(fused, five)):
            assert np.array_equal(a, b), i
    finally:
        for c in caches:
            c.cache_clear()


def test_the_exact_gelu_keeps_the_five_op_path(monkeypatch):
    # The Block op fuses GPT-2's tanh GELU only: a model with the exact (erf) "gelu" runs MindSpore's GELU between
    # the kernels, and matches MindSpore's ops.
    from model import GPT2LMHeadModel, InferenceSession

    if not session_kernels_on():
        pytest.skip("the CPU kernels are switched off (GPT2_CPU_KERNELS=0) or do not build here")
    set_device("CPU")
    erf = GPT2LMHeadModel(our_config(activation_function="gelu"))
    assert erf.transformer.h[0].mlp.approximate == "none"
    ids = np.array(prompts(seed=4, lengths=(12,)))
    monkeypatch.setenv(kernels.ENV_BLOCK, "1")
    kern = InferenceSession(erf, **SESSION_KW, cpu_kernels=True).step(ids, np.arange(12)[None], np.array([1]), None)
    plain = InferenceSession(erf, **SESSION_KW, cpu_kernels=False).step(ids, np.arange(12)[None], np.array([1]), None)
    assert np.abs(kern - plain).max() < 1e-4
