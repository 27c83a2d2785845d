"""model.kernels: the CPU kernels build here, agree with MindSpore's ops, keep rows independent, and fall back."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from model.runtime import set_device
from model.checkpoint import save_model_dir
from model.inference import generate
from model_helpers import SESSION_KW, TINY, hf_logits, hf_model, our_model_from_hf, prompts

pytest.importorskip("torch")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sessions():
    from model import InferenceSession

    set_device("CPU")
    ours = our_model_from_hf(hf_model(seed=3))
    # Each session compiles its graphs on first use with the kernel setting it was made with: use each at once.
    kern = InferenceSession(ours, **SESSION_KW, cpu_kernels=True)
    kern.step(np.array([[1]]), np.array([[0]]), np.array([0]), np.array([0]))
    plain = InferenceSession(ours, **SESSION_KW, cpu_kernels=False)
    plain.step(np.array([[1]]), np.array([[0]]), np.array([0]), np.array([0]))
    return kern, plain


def test_library_builds_on_this_machine():
    from model import kernels

    assert kernels.library_path() is not None  # the project's machines have a C compiler


def test_without_a_compiler_the_model_falls_back(monkeypatch, tmp_path):
    from model import kernels

    kernels.library_path.cache_clear()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path / "cache"))
    try:
        assert kernels.library_path() is None
        assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written
    finally:
        kernels.library_path.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    import mindspore as ms

    from model import GPT2Config, kernels

    set_device("CPU")
    cfg = GPT2Config(**TINY)
    assert kernels.available(cfg, ms.float32)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.available(cfg, ms.float32)
    assert not kernels.available(GPT2Config(**{**TINY, "n_embd": 72, "n_head": 4}), ms.float32)  # unaligned


@pytest.mark.parametrize("lengths", [(20, 7, 13), (32, 30, 17)])  # 4x32 = 128 rows: the packed GEMM
def test_kernel_and_mindspore_steps_agree_with_padding_and_chunks(sessions, lengths):
    kern, plain = sessions
    ps = prompts(seed=7, lengths=lengths)
    T = max(lengths)
    ids = np.zeros((3, T), np.int64)
    pos = np.full((3, T), -1)
    for i, p in enumerate(ps):
        ids[i, : len(p)] = p
        pos[i, : len(p)] = np.arange(len(p))
    slots = np.array([3, 0, 2])
    a = kern.step(ids, pos, slots, None)
    b = plain.step(ids, pos, slots, None)
    for i, p in enumerate(ps):
        assert np.abs(a[i, : len(p)] - b[i, : len(p)]).max() < 1e-4
    nxt = np.array([[5], [6], [7]])
    at = np.array([[n] for n in lengths])
    last = np.zeros(3, int)
    assert np.abs(kern.step(nxt, at, slots, last) - plain.step(nxt, at, slots, last)).max() < 1e-4


def _call(lib, name, *arrays):
    # MindSpore's AOT calling convention: (nparam, params, ndims, shapes, dtypes, stream, extra) -> status.
    import ctypes

    n = len(arrays)
    params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
    dims = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims])
    return getattr(lib, name)(n, params, ndims, shapes, None, None, None)


@pytest.mark.parametrize("hs", [16, 64])  # 64: GPT-2's head size, the kernel's register paths
@pytest.mark.parametrize("flat", [False, True])  # rows of one sequence each, or one row of packed sequences
def test_cached_attention_matches_numpy(hs, flat):
    import ctypes

    from model import kernels

    lib = ctypes.CDLL(kernels.library_path())
    rng = np.random.default_rng(hs + flat)
    nh, L, slots, T = 2, 64, 3, 7
    d = nh * hs
    kc = rng.standard_normal((slots * nh * L, hs)).astype(np.float32)
    vc = rng.standard_normal((slots * nh * L, hs)).astype(np.float32)
    # Sequence 0 continues slot 2 at positions 30..36 (31-37 keys: every remainder of 4 and 2; tokens 32..35 are a
    # group of four for head size 64), sequence 1 starts slot 0 (a group at 0..3, then 4..6 alone).
    pos = np.array([np.arange(30, 30 + T), np.arange(T)], np.int32)
    base = np.array([2, 0]) * nh * L
    if flat:
        pos = pos.reshape(1, -1)
        read_base = np.repeat(base, T).astype(np.int32)  # one per token
    else:
        read_base = base.astype(np.int32)  # one per row
    token_base = np.repeat(base, T)
    qkv = rng.standard_normal((*pos.shape, 3 * d)).astype(np.float32)
    write_base = (token_base + pos.reshape(-1)).astype(np.int32)
    scale = np.array([0.125], np.float32)
    meta = np.array([L, nh], np.int32)
    want_k, want_v = kc.copy(), vc.copy()
    y = np.full((*pos.shape, d), np.nan, np.float32)
    assert _call(lib, "CachedAttention", qkv, kc, vc, write_base, read_base, pos, meta, scale, y) == 0
    q_all, y_all, p_all = qkv.reshape(-1, 3 * d), y.reshape(-1, d), pos.reshape(-1)
    for t in range(2 * T):
        for h in range(nh):
            row = token_base[t] + h * L + p_all[t]
            want_k[row] = q_all[t, d + h * hs : d + (h + 1) * hs]
            want_v[row] = q_all[t, 2 * d + h * hs : 2 * d + (h + 1) * hs]
    assert np.array_equal(kc, want_k) and np.array_equal(vc, want_v)  # this step's keys and values written
    for t in range(2 * T):
        for h in range(nh):
            rows = token_base[t] + h * L + np.arange(p_all[t] + 1)  # the token sees itself and what precedes
            q = q_all[t, h * hs : (h + 1) * hs].astype(np.float64)
            s = want_k[rows].astype(np.float64) @ q * scale[0]
            p = np.exp(s - s.max())
            ref = (p / p.sum()) @ want_v[rows].astype(np.float64)
            assert np.abs(y_all[t, h * hs : (h + 1) * hs] - ref).max() < 1e-5, (t, h)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 13, 96, 97, 130])  # a tile's rows and more; K blocks from 7 rows up
@pytest.mark.parametrize("n,k", [(16, 16), (100, 272), (530, 48), (40, 600)])  # widths not multiples of the tiles
@pytest.mark.parametrize("packed", [False, True])  # panels packed per call, or by the session (pack_panels)
def test_linear_kernels_match_numpy(m, n, k, packed):
    import ctypes

    from model import kernels

    lib = ctypes.CDLL(kernels.library_path())
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k), np.float32) * 2
    w = rng.standard_normal((n, k), np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    r = rng.standard_normal((m, n)).astype(np.float32)
    wp = (kernels.pack_panels(w),) if packed else ()
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    # GPT-2's GELU (tanh form); inputs down to about -100 here, where a fast-math reciprocal once gave NaN.
    with np.errstate(over="ignore"):
        gelu = ref / (1 + np.exp(-1.5957691216057308 * (ref + 0.044715 * ref**3)))
    for name, args, want in (
        ("Linear", (x, w, *wp), ref - b),
        ("Linear", (x, w, *wp, b), ref),
        ("LinearGelu", (x, w, *wp, b), gelu),
        ("LinearAdd", (x, w, *wp, b, r), ref + r),
    ):
        y = np.full((m, n), np.nan, np.float32)
        assert _call(lib, name, *args, y) == 0
        scale = 1 + np.abs(want).max()
        assert np.abs(y - want).max() / scale < 1e-5, name
    # Batch invariance: a row's result is bitwise the same alone, among any number of other rows, at any position,
    # with the weights packed per call or by the session.
    y = np.empty((m, n), np.float32)
    _call(lib, "LinearGelu", x, w, *wp, b, y)
    for extra in (1, 7, 100):
        x2 = np.concatenate([rng.standard_normal((extra, k), np.float32), x])
        y2 = np.empty((m + extra, n), np.float32)
        _call(lib, "LinearGelu", x2, w, *wp, b, y2)
        assert np.array_equal(y, y2[extra:]), extra
    for i in {0, m // 2, m - 1}:
        alone = np.empty((1, n), np.float32)
        _call(lib, "LinearGelu", x[i : i + 1].copy(), w, b, alone)  # packed per call
        assert np.array_equal(alone[0], y[i]), i


def test_panels_hold_the_transposed_weight_in_column_blocks():
    from model import kernels

    nr = kernels.panel_width()
    assert nr in (8, 16, 32)  # two vectors: portable, AVX2, AVX-512
    w = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)  # fewer rows than one panel
    p = kernels.pack_panels(w)
    assert p.shape == (1, 5, nr) and np.array_equal(p[0, :, :3], w.T) and not p[0, :, 3:].any()
    w = np.random.default_rng(0).standard_normal((2 * nr + 1, 16)).astype(np.float32)
    p = kernels.pack_panels(w)
    assert p.shape == (3, 16, nr)
    assert np.array_equal(p.transpose(0, 2, 1).reshape(-1, 16)[: 2 * nr + 1], w)
    import ctypes

    lib = ctypes.CDLL(kernels.library_path())
    bad = np.zeros((2, 16, nr), np.float32)  # a packing of another shape is refused
    assert _call(lib, "Linear", np.zeros((1, 16), np.float32), w, bad, np.zeros((1, 2 * nr + 1), np.float32)) != 0


def test_attention_gives_a_token_the_same_bits_in_any_chunking():
    # Prefill in one chunk (tokens attend in groups of four where the CPU has AVX2 or AVX-512), chunk by chunk of 3, and
    # token by token must give bitwise the same outputs: chunking never changes a token's arithmetic.
    import ctypes

    from model import kernels

    lib = ctypes.CDLL(kernels.library_path())
    rng = np.random.default_rng(5)
    nh, hs, L, T = 2, 64, 40, 23
    d = nh * hs
    qkv = rng.standard_normal((T, 3 * d)).astype(np.float32)
    meta, scale = np.array([L, nh], np.int32), np.array([0.125], np.float32)

    def run(chunks):
        kc = np.zeros((nh * L, hs), np.float32)
        vc = np.zeros((nh * L, hs), np.float32)
        out = []
        for a, e in chunks:
            pos = np.arange(a, e, dtype=np.int32)[None]
            y = np.empty((1, e - a, d), np.float32)
            assert _call(lib, "CachedAttention", qkv[None, a:e].copy(), kc, vc, pos[0].copy(), np.zeros(1, np.int32),
                         pos, meta, scale, y) == 0
            out.append(y[0])
        return np.concatenate(out)

    whole = run([(0, T)])
    assert np.array_equal(whole, run([(a, min(a + 3, T)) for a in range(0, T, 3)]))
    assert np.array_equal(whole, run([(a, a + 1) for a in range(T)]))


def test_a_rows_logits_do_not_depend_on_the_batch(sessions):
    # The kernels compute every output element the same way whatever the number of rows (bitwise), here the
    # one-row graph against the four-row graph.
    kern, _ = sessions
    p = prompts(seed=8, lengths=(9,))[0]
    kern.step(np.array([p]), np.arange(9)[None], np.array([1]), np.array([8]))
    kern.step(np.array([p]), np.arange(9)[None], np.array([2]), np.array([8]))
    alone = kern.step(np.array([[11]]), np.array([[9]]), np.array([1]), np.array([0]))
    together = kern.step(np.array([[11], [12]]), np.array([[9], [9]]), np.array([2, 3]), np.zeros(2, int))
    assert np.array_equal(alone[0], together[0])


def test_a_second_model_works_after_the_first_is_freed():
    # Regression: MindSpore unloads a Custom op's library with the last graph using it; the kernels' worker
    # threads must survive that (it crashed the process).
    script = textwrap.dedent(
        """
        import gc, numpy as np
        from model.runtime import set_device
        from model import GPT2Config, GPT2LMHeadModel, InferenceSession
        set_device("CPU")
        for k in range(2):
            m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=100, n_positions=64))
            s = InferenceSession(m, num_slots=2, max_seq_len=64, cpu_kernels=True)
            for i in range(3):
                out = s.step(np.array([[5]]), np.array([[i]]), np.array([0]), np.zeros(1, np.int32))
            assert np.isfinite(out).all()
            del m, s
            gc.collect()
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


# ---- AMX with pre-packed weights (Intel Sapphire Rapids and later; these machines have it) -------------------


def _amx_or_skip():
    from model import kernels

    if not kernels.amx_available():
        pytest.skip("this CPU (or kernel) does not offer AMX")
    return kernels


def test_amx_packing_splits_each_weight_into_two_bf16_parts():
    from model import kernels

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    p = kernels.pack_weight_amx(w)
    assert p.shape == (2, 4, 48, 16) and p.dtype == np.int32
    # Undo the layout: part[n // 16][k // 2][n % 16] holds w[n][k] (low half: even k) as bf16 bits.
    u = p.view(np.uint32)
    halves = np.stack([(u & 0xFFFF), (u >> 16)], axis=-1).astype(np.uint32) << 16  # (2, 4, 48, 16, 2)
    parts = halves.view(np.float32).transpose(0, 1, 3, 2, 4).reshape(2, 64, 96)
    assert np.abs(parts[0] - w).max() <= np.abs(w).max() * 2.0**-8  # bf16: 8 significant bits
    assert np.abs(parts[0] + parts[1] - w).max() <= np.abs(w).max() * 2.0**-16
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.pack_weight_amx(np.zeros((64, 48), np.float32))
    # Rows are padded with zeros up to a multiple of 32 (the LM head has 50,257).
    q = kernels.pack_weight_amx(w[:40]).view(np.uint32)
    assert q.shape == (2, 4, 48, 16) and np.array_equal(q[:, :2], u[:, :2]) and not q[:, 2:, :, 8:].any()


# Every row count goes through AMX when the weights are packed for it: 32 rows at a time and a last 16 (zero-padded).
@pytest.mark.parametrize("m", [1, 7, 8, 16, 31, 33, 48, 130])
# A long K (50 tile steps); N not a multiple of 32 (as the LM head's): a narrow last column block.
@pytest.mark.parametrize("n,k", [(64, 32), (96, 1600), (70, 96)])
def test_amx_linear_matches_numpy_and_rows_stay_independent(m, n, k):
    import ctypes

    kernels = _amx_or_skip()
    lib = ctypes.CDLL(kernels.library_path())
    rng = np.random.default_rng(m + n)
    x = rng.standard_normal((m, k), np.float32)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    r = rng.standard_normal((m, n)).astype(np.float32)
    wp = kernels.pack_weight_amx(w)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    gelu = ref / (1 + np.exp(-1.5957691216057308 * (ref + 0.044715 * ref**3)))
    for name, args, want in (
        ("Linear", (x, w, wp, b), ref),
        ("LinearGelu", (x, w, wp, b), gelu),
        ("LinearAdd", (x, w, wp, b, r), ref + r),
    ):
        y = np.full((m, n), np.nan, np.float32)
        assert _call(lib, name, *args, y) == 0
        # bf16x3 keeps ~float32 accuracy (a plain bf16 product would be off by ~1e-2 of the scale).
        assert np.abs(y - want).max() / np.abs(want).max() < 2e-5, name
    y = np.empty((m, n), np.float32)
    _call(lib, "Linear", x, w, wp, b, y)
    for extra in (5, 40):  # a row's result does not depend on the other rows, its position or its block (32 or 16)
        x2 = np.concatenate([rng.standard_normal((extra, k), np.float32), x])
        y2 = np.empty((m + extra, n), np.float32)
        _call(lib, "Linear", x2, w, wp, b, y2)
        assert np.array_equal(y, y2[extra:])
    alone = np.empty((1, n), np.float32)
    _call(lib, "Linear", x[-1:].copy(), w, wp, b, alone)
    assert np.array_equal(alone[0], y[-1])
    bad = np.zeros((2, wp.shape[1], k // 2 + 1, 16), np.int32)  # a packing of another shape is refused
    assert _call(lib, "Linear", x, w, bad, b, y) != 0


def test_a_session_with_amx_weights_matches_transformers(monkeypatch):
    from model import InferenceSession

    _amx_or_skip()
    set_device("CPU")
    hf = hf_model(seed=4)
    ours = our_model_from_hf(hf)
    sess = InferenceSession(ours, **SESSION_KW, cpu_kernels=True, packed_weights=True)
    assert sess.packed_weights
    ids = np.array(prompts(seed=9, lengths=(64,)))  # two chunks of 32 rows: the projections go through AMX
    got = sess.step(ids[:, :32], np.arange(32)[None], np.array([1]), None)
    got = np.concatenate([got, sess.step(ids[:, 32:], np.arange(32, 64)[None], np.array([1]), None)], axis=1)
    want = hf_logits(hf, ids)
    assert np.abs(got - want).max() < 1e-4
    assert sess.packed_form == "amx"
    assert not InferenceSession(ours, **SESSION_KW, cpu_kernels=True).packed_weights  # only when asked for
    monkeypatch.setenv("GPT2_AMX", "0")
    from model import kernels

    kernels.amx_available.cache_clear()
    try:
        sess = InferenceSession(ours, **SESSION_KW, cpu_kernels=True, packed_weights=True)
        assert sess.packed_form == "panels"
    finally:
        monkeypatch.delenv("GPT2_AMX")
        kernels.amx_available.cache_clear()


def test_the_servers_session_packs_its_weights_for_amx(tmp_path):
    from serving.engine.model_runner import load_session

    kernels = _amx_or_skip()
    set_device("CPU")
    save_model_dir(our_model_from_hf(hf_model(seed=5)), tmp_path / "m")
    sess = load_session(str(tmp_path / "m"), num_slots=2, max_seq_len=64, batch_buckets=(1, 2), chunk_buckets=(1, 32))
    assert sess.packed_form == "amx" and kernels.amx_available()
    ids = np.array(prompts(seed=10, lengths=(32,)))
    plain = our_model_from_hf(hf_model(seed=5))
    want = generate(plain, ids[0].tolist(), 4)  # the model's own session: no AMX copy
    assert sess.generate(ids[0].tolist(), 4) == want


def test_a_session_gives_the_same_logits_after_freeing_the_models_packed_weights():
    from model import InferenceSession

    set_device("CPU")
    ours = our_model_from_hf(hf_model(seed=6))
    sess = InferenceSession(ours, **SESSION_KW, cpu_kernels=True, packed_weights=True)
    assert sess.packed_form in ("panels", "amx")
    ids = np.array(prompts(seed=11, lengths=(20,)))
    before = sess.step(ids, np.arange(20)[None], np.array([0]), None)
    sess.release_model_weights()
    assert ours.transformer.h[0].mlp.c_fc.weight.shape == (0,)  # freed: the step reads only the packed copy
    after = sess.step(ids, np.arange(20)[None], np.array([1]), None)
    assert np.array_equal(before, after)
    with pytest.raises(ValueError, match="no packed copy"):
        InferenceSession(our_model_from_hf(hf_model(seed=6)), **SESSION_KW, cpu_kernels=True).release_model_weights()
