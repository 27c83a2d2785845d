"""GPT-2 as MindSpore Cells, with the Hugging Face parameter names.

Parameter names equal the Hugging Face `GPT2LMHeadModel` state_dict keys (`transformer.h.0.attn.c_attn.weight`).
The Conv1D weights are stored transposed, [out, in] (Hugging Face: [in, out]), because MindSpore's CPU MatMul
is up to 2x faster that way; `model.checkpoint` transposes them on load and save (TRANSPOSED_WEIGHTS), so state
dicts and weight files keep the Hugging Face layout. The LM head is tied to `transformer.wte.weight` (no
parameter of its own).

Two ways through the same blocks:
- `GPT2LMHeadModel.construct`: the full causal forward for training (mean next-token loss) and evaluation
  (logits for every position);
- `GPT2Model.cached`: the step used by `model.inference.InferenceSession`, which writes this step's keys and
  values into a 2-D KV cache and attends over the rows it gathers back (see inference.py for why 2-D).
Neither knows about devices: the compute dtype is a constructor argument (see `model.runtime`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache
from contextvars import ContextVar

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, One, Zero, initializer

from .config import GPT2Config
from .runtime import resolve_dtype

# Additive bias for masked scores. Finite, so a fully masked row (a padding query) softmaxes to a uniform row
# instead of NaN; exp(-1e9 - max) is exactly 0 in float32, so masked keys contribute nothing.
MASK_VALUE = -1e9


# False while building a model whose weights are about to be loaded: drawing 124M-1.5B normal samples only to
# overwrite them took ~40% of a server's load time.
_random_init: ContextVar[bool] = ContextVar("gpt2_random_init", default=True)


@contextmanager
def weights_loaded_later():
    """Build models here with zero weights instead of random ones (their weights are loaded next)."""
    token = _random_init.set(False)
    try:
        yield
    finally:
        _random_init.reset(token)


def _normal(std: float):
    return Normal(std) if _random_init.get() else Zero()


# The Conv1D weights (HF layout [in, out]) that this model stores transposed, [out, in]; model.checkpoint
# transposes them on load and save so that files and state dicts keep the Hugging Face layout.
TRANSPOSED_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

# Rows (flattened tokens) up to which Conv1D computes (W @ x^T)^T instead of x @ W^T. MindSpore's CPU MatMul is
# shape-sensitive: measured (12 MLPs, 2 threads): 16 rows 64 ms as x @ W, 77 ms as x @ W^T, 30-40 ms as W @ x^T;
# 1 row and >= 128 rows favour x @ W^T (128 rows: 163 ms vs 318 ms as x @ W).
SMALL_ROWS = 64


def step_inputs(positions, write_base, write_rows, read_rows, read_base, meta, scales, context_pos):
    """What every layer of an inference step reads besides its hidden states, as one value (a plain tuple: graph
    mode compiles tuples of tensors; NamedTuples and jit classes fall back to slow untyped execution). Unpack it
    with `positions, write_base, write_rows, read_rows, read_base, meta, scales, context_pos = step`.

    positions (B, T) int32, -1 = padding; write_base (B*T,) cache row of each token's (slot, head 0, position);
    write_rows (B*T*nh,) and read_rows (B*nh*C,) every head's rows (MindSpore's ops only); read_base (B,) each
    row's first cache row, or (B*T,) each token's (a flat pass); meta (2,) int32 [max_seq_len, n_head] and scales
    (n_layer,) float32 each layer's score scale (the CPU kernels); context_pos (C,) = arange(C), the positions of
    the gathered context (MindSpore's ops).
    """
    return (positions, write_base, write_rows, read_rows, read_base, meta, scales, context_pos)


def ln_linear(kern, form, x, ln, w, wp, *rest):
    """`linear` of ln(x) (a LayerNorm cell) as one kernel call: form 5 plain, 6 with GELU, 7 without a bias."""
    if wp is None:
        return kern[form](x, ln.weight, ln.bias, ln.eps, w, *rest)
    if len(wp) == 2:
        return kern[form](x, ln.weight, ln.bias, ln.eps, wp[0], wp[1], *rest)
    return kern[form](x, ln.weight, ln.bias, ln.eps, wp[0], *rest)


def linear(kern, form, x, w, wp, *rest):
    """The CPU kernels' Linear `form` (0 plain, 1 with GELU, 2 with a residual) on x with weight w, or with its
    session's packing wp alone when there is one (w is then never read: the session may free it); rest: the bias,
    then the residual. wp is a tuple: (packed,) for the float kernels, or (int8 panels, scales) for the Q8 kernels
    (then kern is model.kernels.step_kernels_q8's ops in StepKernels' order)."""
    if wp is None:
        return kern[form](x, w, *rest)
    if len(wp) == 2:
        return kern[form](x, wp[0], wp[1], *rest)
    return kern[form](x, wp[0], *rest)


def is_transposed_weight(name: str) -> bool:
    """Whether the parameter `name` is stored [out, in] here and [in, out] in Hugging Face files."""
    return name.endswith(TRANSPOSED_WEIGHTS)


class Conv1D(nn.Cell):
    """Hugging Face's Conv1D, y = x @ W + b, with W stored transposed: `weight` is [out, in] (HF: [in, out]).

    The transposed layout lets the CPU MatMul read the weight without repacking it (see SMALL_ROWS).
    """

    def __init__(self, n_in: int, n_out: int, std: float, compute_dtype: ms.Type) -> None:
        super().__init__()
        self.weight = Parameter(initializer(_normal(std), (n_out, n_in), ms.float32), name="weight")
        self.bias = Parameter(initializer(Zero(), (n_out,), ms.float32), name="bias")
        self.compute_dtype = compute_dtype
        self.cast_weights = compute_dtype != ms.float32
        self.matmul = ops.MatMul()
        self.matmul_nt = ops.MatMul(transpose_b=True)
    # The inference step's forms. `kern` is the session's model.kernels.StepKernels as a plain tuple (graph mode
    # indexes tuples but has no named fields: 0 linear, 1 linear_gelu, 2 linear_add, 3 attention, 4 linear_nobias,
    # 5-7 the same three with a layer norm first: ln_linear, ln_linear_gelu, ln_linear_nobias; 8 a whole layer,
    # model.kernels.block_kernels' op for the session's form, or None: GPT2Block.cached calls the others) or None
    # (decided when the graph compiles): the CPU kernels when given, whatever the row count, MindSpore's ops
    # otherwise. The kernels measured as fast or faster than MindSpore's MatMul at 1 to 512 rows, and they keep no
    # per-graph copy of the weights: MindSpore's CPU MatMul packs each constant weight once per compiled graph and
    # keeps the copy (+360 MB RSS per 256-token prefill graph of GPT-2 124M).
    # `wp` is the session's packing of this weight (see `linear`) or None.
    def infer(self, x, kern, wp=None):
        if kern is not None:
            return linear(kern, 0, x, self.weight, wp, self.bias)
        return self.construct(x)

    def infer_gelu(self, x, kern, wp=None):
        # gelu(x @ W + b), GPT-2's tanh form (the kernel's only form; GPT2MLP checks the activation).
        if kern is not None:
            return linear(kern, 1, x, self.weight, wp, self.bias)
        return gelu_tanh(self.construct(x))

    def infer_ln(self, x, ln, kern, wp=None):
        # ln(x) @ W + b: with the kernels, the layer norm is done inside the projection's call
        if kern is not None:
            return ln_linear(kern, 5, x, ln, self.weight, wp, self.bias)
        return self.construct(ln(x))

    def infer_ln_gelu(self, x, ln, kern, wp=None):
        # gelu(ln(x) @ W + b)
        if kern is not None:
            return ln_linear(kern, 6, x, ln, self.weight, wp, self.bias)
        return gelu_tanh(self.construct(ln(x)))

    def infer_add(self, x, residual, kern, wp=None):
        # x @ W + b + residual
        if kern is not None:
            return linear(kern, 2, x, self.weight, wp, self.bias, residual)
        return self.construct(x) + residual

    def construct(self, x):
        # x (..., n_in) -> (..., n_out); MatMul wants 2-D operands. The branch is decided at compile time.
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        w, b = self.weight, self.bias
        if self.cast_weights:
            w, b = ops.cast(w, self.compute_dtype), ops.cast(b, self.compute_dtype)
        if 1 < x2.shape[0] <= SMALL_ROWS:
            y = ops.transpose(self.matmul(w, ops.transpose(x2, (1, 0))), (1, 0)) + b
        else:
            y = self.matmul_nt(x2, w) + b
        return y.reshape(shape[:-1] + (w.shape[0],))


@lru_cache(maxsize=None)
def _eps_tensor(eps: float) -> ms.Tensor:
    # One constant per value, shared by every layer norm and model: a step graph's constants are part of what
    # MindSpore matches a compiled graph by (per-cell tensors made a second session recompile).
    return ms.Tensor([eps], ms.float32)


class LayerNorm(nn.Cell):
    """Layer norm over the last axis with HF names (`weight`, `bias`), computed in float32."""

    def __init__(self, n: int, eps: float, compute_dtype: ms.Type) -> None:
        super().__init__()
        self.weight = Parameter(initializer(One(), (n,), ms.float32), name="weight")
        self.bias = Parameter(initializer(Zero(), (n,), ms.float32), name="bias")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.eps = _eps_tensor(eps)  # for the CPU kernels' fused layer norm
        self.compute_dtype = compute_dtype

    def construct(self, x):
        y, _, _ = self.norm(_cast(x, ms.float32), self.weight, self.bias)
        return _cast(y, self.compute_dtype)


class Embedding(nn.Cell):
    """A lookup table named `weight` (HF `wte.weight`, `wpe.weight`)."""

    def __init__(self, n: int, d: int, std: float) -> None:
        super().__init__()
        self.weight = Parameter(initializer(_normal(std), (n, d), ms.float32), name="weight")

    def construct(self, ids):
        # ids (...) int32 -> (..., d)
        return ops.gather(self.weight, ids, 0)


def _cast(x, dtype):
    # Cast only when the dtype differs (decided at compile time): float32 graphs get no no-op Cast kernels.
    if x.dtype == dtype:
        return x
    return ops.cast(x, dtype)


def _dropout(p: float) -> nn.Cell:
    # nn.Dropout is the identity outside training; p == 0 skips it altogether.
    return nn.Dropout(p=p) if p > 0 else nn.Identity()


class GPT2Attention(nn.Cell):
    def __init__(self, cfg: GPT2Config, layer_idx: int, compute_dtype: ms.Type) -> None:
        super().__init__()
        d = cfg.n_embd
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        scale = 1.0
        if cfg.scale_attn_weights:
            scale /= math.sqrt(self.head_dim)
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale
        self.c_attn = Conv1D(d, 3 * d, cfg.initializer_range, compute_dtype)
        # GPT-2 scales the residual projections' init by 1/sqrt(2 * n_layer).
        self.c_proj = Conv1D(d, d, cfg.initializer_range / math.sqrt(2 * cfg.n_layer), compute_dtype)
        self.attn_dropout = _dropout(cfg.attn_pdrop)
        self.resid_dropout = _dropout(cfg.resid_pdrop)
        self.compute_dtype = compute_dtype
        # q @ k^T without materialising k^T.
        self.matmul_qk = ops.BatchMatMul(transpose_b=True)

    def _heads(self, x):
        # (B, T, d) -> (B, nh, T, hs)
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_head, self.head_dim).transpose(0, 2, 1, 3)

    def _attend(self, q, k, v, bias, dropout=True):
        # q (B, nh, Tq, hs); k, v (B, nh, Tk, hs); bias (B or 1, 1, Tq, Tk) additive -> (B, Tq, d)
        att = self.matmul_qk(q, k)  # (B, nh, Tq, Tk)
        att = _cast(att, ms.float32) * self.scale + bias
        att = _cast(ops.softmax(att, axis=-1), self.compute_dtype)
        if dropout:
            att = self.attn_dropout(att)
        y = ops.matmul(att, v)  # (B, nh, Tq, hs)
        b, _, t, _ = y.shape
        return y.transpose(0, 2, 1, 3).reshape(b, t, self.n_head * self.head_dim)

    def construct(self, x, bias):
        # x (B, T, d), bias (B or 1, 1, T, T) -> (B, T, d)
        q, k, v = ops.split(self.c_attn(x), x.shape[-1], axis=2)
        y = self._attend(self._heads(q), self._heads(k), self._heads(v), bias)
        return self.resid_dropout(self.c_proj(y))

    def cached(self, x, ln, k_cache, v_cache, step, bias, scale, kern, wp=None):
        """Attention of ln(x) over the KV cache, before the output projection: write this step's K/V, attend over
        the cache (ln: the block's ln_1, fused into c_attn's kernel call).

        The caches are 2-D (rows, hs) Parameters with one row per (slot, head, position). x (B, T, d); step the
        step_inputs tuple; bias the additive mask (MindSpore's ops only); scale (1,) this layer's score scale; kern the
        session's model.kernels.StepKernels or None -> (B, T, d). With the CPU kernels, one op writes the step's
        rows and lets each token attend over its slot's rows in place; otherwise the rows are written with
        scatter_update and the context gathered to (B, nh, C, hs) for batched matmuls.
        """
        positions, write_base, write_rows, read_rows, read_base, meta, _, _ = step
        b, t, d = x.shape
        nh, hs = self.n_head, self.head_dim
        qkv = self.c_attn.infer_ln(x, ln, kern, wp)
        if kern is not None:
            return kern[3](qkv, k_cache, v_cache, write_base, read_base, positions, meta, scale)
        q, k, v = ops.split(qkv, d, axis=2)
        # Write first, so a token sees itself and the earlier tokens of its own chunk.
        k_cache = ops.scatter_update(k_cache, write_rows, k.reshape(b * t * nh, hs))
        v_cache = ops.scatter_update(v_cache, write_rows, v.reshape(b * t * nh, hs))
        c = read_rows.shape[0] // (b * nh)
        kc = ops.gather(k_cache, read_rows, 0).reshape(b, nh, c, hs)
        vc = ops.gather(v_cache, read_rows, 0).reshape(b, nh, c, hs)
        # Inference never drops out, whatever the model's train flag.
        return self._attend(self._heads(q), kc, vc, bias, dropout=False)


class GPT2MLP(nn.Cell):
    def __init__(self, cfg: GPT2Config, compute_dtype: ms.Type) -> None:
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, cfg.inner_dim, cfg.initializer_range, compute_dtype)
        self.c_proj = Conv1D(
            cfg.inner_dim, cfg.n_embd, cfg.initializer_range / math.sqrt(2 * cfg.n_layer), compute_dtype
        )
        # gelu_new / gelu_pytorch_tanh are the tanh approximation; "gelu" is exact erf.
        self.approximate = "none" if cfg.activation_function == "gelu" else "tanh"
        self.dropout = _dropout(cfg.resid_pdrop)

    def construct(self, x):
        return self.dropout(self.c_proj(self._gelu(self.c_fc(x))))

    def inference_add(self, x, ln, kern, wps=(None, None)):
        # x + the MLP of ln(x) without dropout, for the KV-cache step (ln, the block's ln_2, fused into c_fc's
        # kernel call); wps: c_fc's and c_proj's packings.
        if self.approximate == "none":
            h = ops.gelu(self.c_fc.infer_ln(x, ln, kern, wps[0]), approximate="none")
            return self.c_proj.infer_add(h, x, kern, wps[1])
        return self.c_proj.infer_add(self.c_fc.infer_ln_gelu(x, ln, kern, wps[0]), x, kern, wps[1])

    def _gelu(self, x):
        if self.approximate == "none":
            return ops.gelu(x, approximate="none")
        return gelu_tanh(x)


def gelu_tanh(x):
    # The tanh approximation written as x * sigmoid(2z) (= 0.5 x (1 + tanh z)): MindSpore's CPU GeLU kernel is
    # slow (16 x 3072: 2.1 ms vs 0.57 ms for these element-wise ops), and ops.tanh is off by up to 2e-4.
    return x * ops.sigmoid(1.5957691216057308 * (x + 0.044715 * (x * x * x)))


def _block_weight(proj, wp):
    # A projection's inputs to the Block op: its weight, or the session's packing of it alone (see `linear`), then
    # its bias.
    return ((proj.weight,) if wp is None else wp) + (proj.bias,)


class GPT2Block(nn.Cell):
    def __init__(self, cfg: GPT2Config, layer_idx: int, compute_dtype: ms.Type) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, compute_dtype)
        self.attn = GPT2Attention(cfg, layer_idx, compute_dtype)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, compute_dtype)
        self.mlp = GPT2MLP(cfg, compute_dtype)

    def construct(self, x, bias):
        x = x + self.attn(self.ln_1(x), bias)
        return x + self.mlp(self.ln_2(x))

    def projections(self):
        # The four projections, in the order `cached` takes their AMX packings (wps; None without them).
        return (self.attn.c_attn, self.attn.c_proj, self.mlp.c_fc, self.mlp.c_proj)

    def cached(self, x, k_cache, v_cache, step, bias, scale, kern, wps=(None, None, None, None)):
        # With the kernels, the layer is one Block op (the five calls below in one: the same bits, one op's
        # dispatch), unless the session has none or the GELU is the exact (erf) form, which the kernels lack.
        if kern is not None and kern[8] is not None and self.mlp.approximate == "tanh":
            positions, write_base, _, _, read_base, meta, _, _ = step
            attn, mlp = self.attn, self.mlp
            args = ((x, self.ln_1.weight, self.ln_1.bias, self.ln_1.eps) + _block_weight(attn.c_attn, wps[0])
                    + (k_cache, v_cache, write_base, read_base, positions, meta, scale)
                    + _block_weight(attn.c_proj, wps[1]) + (self.ln_2.weight, self.ln_2.bias, self.ln_2.eps)
                    + _block_weight(mlp.c_fc, wps[2]) + _block_weight(mlp.c_proj, wps[3]))
            return kern[8](*args)
        a = self.attn.cached(x, self.ln_1, k_cache, v_cache, step, bias, scale, kern, wps[0])
        x = self.attn.c_proj.infer_add(a, x, kern, wps[1])
        return self.mlp.inference_add(x, self.ln_2, kern, (wps[2], wps[3]))


class GPT2Model(nn.Cell):
    """Embeddings, blocks and the final layer norm: token ids -> final hidden states."""

    def __init__(self, cfg: GPT2Config, compute_dtype: ms.Type) -> None:
        super().__init__()
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd, cfg.initializer_range)
        self.wpe = Embedding(cfg.n_positions, cfg.n_embd, 0.01)
        self.drop = _dropout(cfg.embd_pdrop)
        self.h = nn.CellList([GPT2Block(cfg, i, compute_dtype) for i in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, compute_dtype)
        self.compute_dtype = compute_dtype

    def embed(self, input_ids, position_ids):
        # (B, T) int32 each -> (B, T, d)
        x = self.wte(input_ids) + self.wpe(position_ids)
        return _cast(x, self.compute_dtype)

    def construct(self, input_ids, attention_mask=None):
        # input_ids (B, T) -> hidden (B, T, d) after ln_f
        b, t = input_ids.shape
        pos = ops.arange(t, dtype=ms.int32)
        x = self.drop(self.embed(input_ids, ops.broadcast_to(pos.reshape(1, t), (b, t))))
        # Causal: query i sees keys j <= i; an attention_mask (B, T) also hides padded keys.
        allowed = pos.reshape(1, 1, t, 1) >= pos.reshape(1, 1, 1, t)  # (1, 1, T, T)
        if attention_mask is not None:
            allowed = ops.logical_and(allowed, (attention_mask > 0).reshape(b, 1, 1, t))
        bias = ops.select(allowed, ops.zeros((), ms.float32), ops.full((), MASK_VALUE, dtype=ms.float32))
        for block in self.h:
            x = block(x, bias)
        return self.ln_f(x)

    def cached(self, input_ids, step, k_caches, v_caches, kern, packed=None, per=1, wte_q=None):
        """The step over the KV cache (see GPT2Attention.cached for the row layout).

        input_ids (B, T) int32; step the step_inputs tuple; kern the session's model.kernels.StepKernels, or None for
        MindSpore's ops; packed: the session's packings of every block's projections (4 per block, in
        GPT2Block.projections order, `per` Parameters each: 1 packed float copy, or 2 for int8 panels and scales)
        or None; wte_q: (int8 rows (V, d), scales (V,)) when the token embedding is read quantized (the int8
        session frees the float table) -> hidden (B, T, d) before ln_f (step_logits applies it).
        """
        positions, _, _, _, _, _, scales, context_pos = step
        b, t = input_ids.shape
        pos = ops.maximum(positions, 0)
        if wte_q is None:
            x = self.embed(input_ids, pos)
        else:
            rows = ops.cast(ops.gather(wte_q[0], input_ids, 0), ms.float32)
            x = rows * ops.gather(wte_q[1], input_ids, 0).reshape(b, t, 1) + self.wpe(pos)
        bias = None
        if kern is None:
            # Context row j of a slot holds position j: a query at position p sees j <= p (its own slot's past and
            # this step's earlier tokens); stale rows of a reused slot lie beyond p and stay hidden.
            c = context_pos.shape[0]
            allowed = context_pos.reshape(1, 1, 1, c) <= positions.reshape(b, 1, t, 1)  # (B, 1, T, C)
            bias = ops.select(allowed, ops.zeros((), ms.float32), ops.full((), MASK_VALUE, dtype=ms.float32))
        for i, block in enumerate(self.h):
            wps = (None, None, None, None)
            if packed is not None and per == 1:
                wps = ((packed[4 * i],), (packed[4 * i + 1],), (packed[4 * i + 2],), (packed[4 * i + 3],))
            elif packed is not None:
                j = 8 * i
                wps = ((packed[j], packed[j + 1]), (packed[j + 2], packed[j + 3]), (packed[j + 4], packed[j + 5]),
                       (packed[j + 6], packed[j + 7]))
            x = block.cached(x, k_caches[i], v_caches[i], step, bias, scales[i : i + 1], kern, wps)
        return x


class GPT2LMHeadModel(nn.Cell):
    """GPT-2 with the LM head tied to `transformer.wte.weight`.

    Training mode: input_ids (B, seq_length + 1) -> mean next-token cross-entropy (MindFormers' convention:
    positions [0, seq_length) predict positions [1, seq_length]); an optional attention_mask of the same shape
    (1 = token, 0 = padding) hides padded keys and drops padded labels from the mean. Padding goes on the right.
    Evaluation mode: input_ids (B, T) -> float32 logits (B, T, vocab).
    """

    def __init__(self, config: GPT2Config, *, compute_dtype: str | ms.Type = "float32") -> None:
        super().__init__()
        self.config = config
        self.compute_dtype = resolve_dtype(compute_dtype)
        self.transformer = GPT2Model(config, self.compute_dtype)
        self.cast_weights = self.compute_dtype != ms.float32
        # x @ wte^T without materialising the transpose of the (V, d) table each call.
        self.matmul_nt = ops.MatMul(transpose_b=True)
        self.matmul = ops.MatMul()

    def attention_scales(self) -> list[float]:
        """Each layer's attention score scale (1/sqrt(head_dim), and 1/(layer+1) if the config asks)."""
        return [block.attn.scale for block in self.transformer.h]

    def step_logits(self, hidden, kern, wp=None):
        # lm_logits of ln_f(hidden) for the inference step: with kern, one CPU kernel call (ln_f fused, no bias);
        # wp: the session's packing of the tied embedding (a tuple, see `linear`), or None.
        ln = self.transformer.ln_f
        if kern is not None:
            w = self.transformer.wte.weight
            if wp is None:
                return kern[7](hidden, ln.weight, ln.bias, ln.eps, w)
            if len(wp) == 2:  # int8 panels and scales: the scales give N
                return kern[7](hidden, ln.weight, ln.bias, ln.eps, wp[0], wp[1])
            # The float packing comes with the table itself: N (the vocabulary) need not be a multiple of the
            # panel width.
            return kern[5](hidden, ln.weight, ln.bias, ln.eps, w, wp[0])
        return self.lm_logits(ln(hidden))

    def lm_logits(self, hidden):
        # hidden (..., d) -> float32 logits (..., V) through the tied embedding.
        shape = hidden.shape
        w = self.transformer.wte.weight
        if self.cast_weights:
            w = ops.cast(w, self.compute_dtype)
        h2 = hidden.reshape(-1, shape[-1])
        if h2.shape[0] <= SMALL_ROWS:
            # (wte @ h^T)^T: for a few rows MindSpore's CPU MatMul streams the (V, d) table about twice as fast
            # this way (measured, 1 row: 10 vs 19 ms for 50257 x 768).
            logits = ops.transpose(self.matmul(w, ops.transpose(h2, (1, 0))), (1, 0))
        else:
            logits = self.matmul_nt(h2, w)
        return _cast(logits, ms.float32).reshape(shape[:-1] + (w.shape[0],))

    def construct(self, input_ids, attention_mask=None):
        if self.training:
            tokens, labels = input_ids[:, :-1], input_ids[:, 1:]
            mask = None if attention_mask is None else attention_mask[:, :-1]
            logits = self.lm_logits(self.transformer(tokens, mask))  # (B, T, V)
            logp = ops.log_softmax(logits, axis=-1)
            nll = -ops.gather_elements(logp, 2, labels.reshape(labels.shape + (1,))).squeeze(-1)  # (B, T)
            if attention_mask is None:
                return nll.mean()
            weights = ops.cast(attention_mask[:, 1:] > 0, ms.float32)
            return (nll * weights).sum() / ops.maximum(weights.sum(), 1.0)
        return self.lm_logits(self.transformer(input_ids, attention_mask))
