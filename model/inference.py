"""Compiled inference over a preallocated KV cache: one `step` entry point for prefill, chunked prefill and decode.

Knows tensors and MindSpore; knows nothing of requests, sampling or scheduling (that is serving/).

KV cache layout, and why: per layer one K and one V Parameter of shape [(num_slots + 1) * n_head * max_seq_len,
head_dim]. Row `(slot * n_head + head) * max_seq_len + pos` holds the key (value) of position `pos` of `slot` for
`head`. Each step writes its tokens' rows with `scatter_update` and gathers back, for each query row, the first C
positions of its slot for every head: the gather yields (B, n_head, C, head_dim), the layout the batched matmuls
want, with no transpose of the context. C is the smallest context bucket covering the step's furthest position,
so decode cost follows the live sequence lengths, not max_seq_len. On CPU, scatter_update and gather touch only
the rows involved; slicing, index assignment or scatter_nd_update of a 4-D cache copy the whole cache every step
(measured: seconds per token). The extra slot `num_slots` is scratch: padding tokens write there and padding
rows read from there.

Graphs: with the CPU kernels and their C++ shape functions (model.kernels.dynamic_shapes) the step is ONE graph
whose token axis is left unknown (`Cell.set_inputs`): every step size, prefill or decode, with any number of
logits rows, runs it unpadded, and nothing compiles after the first step (measured: one compile of ~2 s instead
of 40 graphs and 80-90 s for a server's buckets, GPT-2 124M; a decode step no slower). Without them, graphs are
compiled per padded shape (batch bucket, chunk bucket, context bucket) and per logits mode (one row per sequence,
or every position); MindSpore caches each compiled graph, so a shape compiles once per session. Padding never
changes a real token's result, so both give the same bits.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Zero, initializer

from . import kernels
from .gpt2 import GPT2LMHeadModel, step_inputs


def _context_sizes(hi: int) -> tuple[int, ...]:
    """64, 128, 192, 256, 384, 512, 768, 1024, ... (capped by and ending at hi): at most 1.5x the needed context.

    Attention cost grows linearly with the gathered context, so halving the waste of plain powers of two is
    worth the few extra compiled shapes (measured: batch 32, 136 vs 256 positions: 28 vs 47 ms per 4 layers).
    """
    sizes = {64, 128, 192}
    n = 256
    while n < hi:
        sizes.update((n, n * 3 // 2))
        n *= 2
    return tuple(sorted(x for x in sizes if x < hi)) + (hi,)


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    return tuple(out) + (hi,)


def _packed(weight: Parameter, form: str, int8: dict | None = None, pre: dict | None = None) -> tuple[Parameter, ...]:
    # `weight` packed for the kernels' Linear, as Parameters named after it (e.g.
    # transformer.h.0.mlp.c_fc.weight.panels): ("panels" or "amx") one packed copy, taken from `pre` (name ->
    # packed Parameter, load_model_dir(pack=)'s; taken out, so that the model does not keep it) or packed now;
    # ("int8") the int8 panels and the per-row scales, from `int8` (name -> (q, scale), a quantized model
    # directory's or load_model_dir(pack="int8")'s) or quantized now.
    if form != "int8":
        packed = (pre or {}).pop(weight.name, None)
        if packed is None:
            packed = kernels.packed_parameter(weight.asnumpy(), form, f"{weight.name}.{form}")
        return (packed,)
    q, scale = (int8 or {}).get(weight.name) or kernels.quantize_int8(weight.asnumpy())
    return (Parameter(Tensor(kernels.pack_panels_int8(q)), name=f"{weight.name}.int8", requires_grad=False),
            Parameter(Tensor(scale), name=f"{weight.name}.scale", requires_grad=False))


class _Graph(nn.Cell):
    """A cell run as a compiled graph at every step. MindSpore sets `compile_phase` on the called cell at each call,
    and its setter walks every sub-cell through Cell.__setattr__: 0.6 ms per call for GPT-2 124M's 153 cells, 6% of
    an int8 decode step. Only distributed (auto-parallel) layouts read the sub-cells' phase, so here it stays on the
    top cell."""

    @property
    def compile_phase(self):
        return self._compile_phase

    @compile_phase.setter
    def compile_phase(self, value):
        object.__setattr__(self, "_compile_phase", value)


class _StepCell(_Graph):
    """The compiled step: the model's blocks plus the KV cache Parameters (and, if asked, the AMX packings)."""

    def __init__(
        self,
        model: GPT2LMHeadModel,
        num_slots: int,
        max_seq_len: int,
        dtype: ms.Type,
        kern: tuple | None,
        packed_form: str | None = None,
    ) -> None:
        # auto_prefix=False keeps the model's parameter names (HF keys) when it becomes a child cell here.
        super().__init__(auto_prefix=False)
        self.model = model
        cfg = model.config
        rows = (num_slots + 1) * cfg.n_head * max_seq_len  # + 1: the scratch slot
        shape = (rows, cfg.head_dim)
        self.k_cache = ms.ParameterTuple(
            Parameter(initializer(Zero(), shape, dtype), name=f"kv_cache.k.{i}", requires_grad=False)
            for i in range(cfg.n_layer)
        )
        self.v_cache = ms.ParameterTuple(
            Parameter(initializer(Zero(), shape, dtype), name=f"kv_cache.v.{i}", requires_grad=False)
            for i in range(cfg.n_layer)
        )
        # Row of (slot, head, pos) = slot_base + head * max_seq_len + pos, slot_base = slot * n_head * max_seq_len.
        self.head_offset = Tensor(np.arange(cfg.n_head, dtype=np.int32) * max_seq_len)
        self.kern = kern  # the CPU kernels' ops, or None: MindSpore's ops
        # Every block's projections and the LM head (the tied embedding) packed for the kernels' Linear: a copy, not
        # updated if the weights change. int8 also reads the token embedding quantized (wte_q; the LM head's scales).
        self.packed = self.packed_head = self.wte_q = None
        self.per = 2 if packed_form == "int8" else 1
        if packed_form is not None:
            int8 = getattr(model, "int8_weights", None) or {}
            pre = getattr(model, "packed_weights", None) or {}
            wte = model.transformer.wte.weight
            self.packed = ms.ParameterTuple(
                p for block in model.transformer.h for proj in block.projections()
                for p in _packed(proj.weight, packed_form, int8, pre)
            )
            if packed_form == "int8":
                q, scale = int8.get(wte.name) or kernels.quantize_int8(wte.asnumpy())
                int8 = {wte.name: (q, scale)}
                self.wte_q = ms.ParameterTuple((
                    Parameter(Tensor(q), name=f"{wte.name}.int8_rows", requires_grad=False),
                    Parameter(Tensor(scale.copy()), name=f"{wte.name}.int8_rows_scale", requires_grad=False)))
            self.packed_head = ms.ParameterTuple(_packed(wte, packed_form, int8))

    @ms.jit
    def construct(self, input_ids, positions, write_base, read_base, meta, scales, context_pos, logits_rows):
        # input_ids, positions (B, T); write_base (B*T,) slot_base + pos of each token (scratch for padding);
        # read_base (B,) slot_base of each row, or (B*T,) of each token (step_flat); meta, scales: see step_inputs;
        # context_pos (C,) = arange(C); logits_rows (B,) flat indices into B*T, or None for every position.
        nh = self.head_offset.shape[0]
        write_rows = (write_base.reshape(-1, 1) + self.head_offset.reshape(1, nh)).reshape(-1)  # (B*T*nh,)
        read_rows = (
            read_base.reshape(-1, 1, 1) + self.head_offset.reshape(1, nh, 1) + context_pos.reshape(1, 1, -1)
        ).reshape(-1)  # (B*nh*C,)
        step = step_inputs(positions, write_base, write_rows, read_rows, read_base, meta, scales, context_pos)
        hidden = self.model.transformer.cached(input_ids, step, self.k_cache, self.v_cache, self.kern, self.packed,
                                               self.per, self.wte_q)
        if logits_rows is None:
            return self.model.step_logits(hidden, self.kern, self.packed_head)  # (B, T, V)
        last = ops.gather(hidden.reshape(-1, hidden.shape[-1]), logits_rows, 0)  # (B, d)
        return self.model.step_logits(last, self.kern, self.packed_head)  # (B, V)


class _FixedShapeStep(_Graph):
    """The step cell's graph compiled for fixed shapes: the same cell (Parameters, KV cache) inlined into a graph
    without its dynamic token axis. A dynamic graph pays ~3 ms per step on CPU for resolving shapes as it runs
    (GPT-2 124M, 2 cores: 24.3 vs 21.5 ms for one token), which batch-1 decode, the latency case, is spared."""

    def __init__(self, step: _StepCell) -> None:
        super().__init__(auto_prefix=False)
        self.step = step

    @ms.jit
    def construct(self, input_ids, positions, write_base, read_base, meta, scales, context_pos, logits_rows):
        return self.step(input_ids, positions, write_base, read_base, meta, scales, context_pos, logits_rows)


class _CopyCell(_Graph):
    """Copies a slot's first positions into another slot, in every layer's K and V cache (prefix caching): one
    fixed-shape graph over the step cell's own cache Parameters, the rows copied in place by the kernels'
    CopySlotRows."""

    def __init__(self, step: _StepCell, copy_op) -> None:
        super().__init__(auto_prefix=False)
        self.caches = ms.ParameterTuple(tuple(step.k_cache) + tuple(step.v_cache))
        self.copy = copy_op

    @ms.jit
    def construct(self, meta):
        done = ()
        for c in self.caches:
            done = done + (self.copy(c, meta),)
        return ops.concat(done)


class InferenceSession:
    """Owns the compiled step graphs and the KV cache of `num_slots` sequences of up to `max_seq_len` tokens.

    `dynamic` sessions (see the module docstring) run every step unpadded through one graph; the buckets then only
    bound a step's size. Otherwise `step` pads (B, T) up to the smallest batch and chunk buckets that fit and the
    context up to the smallest context bucket covering the furthest position; every padded shape is a separate
    compiled graph. Either way a row's logits do not depend on the other rows.
    """

    def __init__(
        self,
        model: GPT2LMHeadModel,
        *,
        num_slots: int,
        max_seq_len: int | None = None,
        batch_buckets: Sequence[int] | None = None,
        chunk_buckets: Sequence[int] | None = None,
        context_buckets: Sequence[int] | None = None,
        cpu_kernels: bool | None = None,
        packed_weights: bool = False,
        quantize: str | None = None,
    ) -> None:
        """cpu_kernels: use model.kernels' CPU kernels for the step (None: whenever they are available).
        packed_weights: with the CPU kernels, keep a copy of the projections' and the LM head's weights packed for
        `Linear` (model.kernels: panels, or for AMX where the CPU has it; as much memory again as the weights;
        decode several times faster than packing per call). The copy is made here: a session must not outlive a
        change of the model's weights.
        quantize: "int8" keeps the projections, the LM head and the token embedding as int8 with a float32 scale
        per output row (a quantized model directory's own, `model.int8_weights`, or quantized here) and runs the
        kernels' Q8 ops (each input row quantized on the fly to int16, integer sums); needs the CPU kernels; implies
        packed weights."""
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        cfg = model.config
        max_seq_len = cfg.n_positions if max_seq_len is None else max_seq_len
        if not 1 <= max_seq_len <= cfg.n_positions:
            raise ValueError(f"max_seq_len must be in [1, n_positions={cfg.n_positions}], got {max_seq_len}")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.model = model
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.vocab_size = cfg.vocab_size
        self.batch_buckets = _buckets("batch_buckets", batch_buckets, _powers_of_two(1, num_slots), num_slots)
        self.chunk_buckets = _buckets(
            "chunk_buckets", chunk_buckets, _powers_of_two(1, min(512, max_seq_len)), max_seq_len
        )
        # Gathering only a context bucket keeps decode cost proportional to the longest live sequence rather
        # than max_seq_len (at batch 32 and 1024 positions the full gather would move 2.4 GB per token).
        self.context_buckets = _buckets("context_buckets", context_buckets, _context_sizes(max_seq_len), max_seq_len)
        if self.context_buckets[-1] != max_seq_len:
            self.context_buckets = self.context_buckets + (max_seq_len,)
        if cpu_kernels is None:
            cpu_kernels = kernels.available(cfg, model.compute_dtype)
        elif cpu_kernels and not kernels.available(cfg, model.compute_dtype):
            raise ValueError(
                f"cpu_kernels=True needs the CPU device target, float32, n_embd and head_dim multiples of "
                f"{kernels.ALIGN}, a C compiler and {kernels.ENV_SWITCH} not set to 0"
            )
        self.cpu_kernels = cpu_kernels
        if cpu_kernels:
            # The attention kernel reads each sequence's own length from the cache: the context is not a
            # compiled dimension, so one graph serves every context length.
            self.context_buckets = (max_seq_len,)
        # The step path has no dropout, so the model's train/eval flag is left as the caller set it.
        # kernels.packed_form: "amx" or "panels" where the kernels run and the widths allow packing (cpu_kernels
        # is then true: asked-for kernels that are not available were refused above).
        self.packed_form = kernels.packed_form(cfg, model.compute_dtype) if packed_weights and cpu_kernels else None
        kern = tuple(kernels.step_kernels()) if cpu_kernels else None
        if quantize == "int8":
            if not cpu_kernels:
                raise ValueError("quantize='int8' needs the CPU kernels (CPU target, float32, a C compiler, "
                                 f"{kernels.ENV_SWITCH} not 0)")
            q8 = kernels.step_kernels_q8()
            # StepKernels' order, so that the model's forms index both alike
            kern = (q8.linear, q8.linear_gelu, q8.linear_add, kern[3], q8.linear_nobias, q8.ln_linear,
                    q8.ln_linear_gelu, q8.ln_linear_nobias)
            self.packed_form = "int8"
        loaded = getattr(model, "packed_form", None)
        if loaded is not None and loaded != self.packed_form:
            raise ValueError(f"the model's weights were loaded packed as {loaded!r} (load_model_dir(pack=)), which "
                             f"only a session packing them alike can run; this one packs {self.packed_form!r}")
        if kern is not None:
            # kern[8]: each layer's step as one op (model.kernels.block_kernels), or None: as five
            blocks = kernels.block_kernels() if kernels.block_enabled() else None
            kern = kern + (None if blocks is None else blocks.block_q8 if quantize == "int8" else blocks.block,)
        self.quantize = quantize
        self._cell = _StepCell(model, num_slots, max_seq_len, model.compute_dtype, kern, self.packed_form)
        # With the kernels' shape functions one graph takes any token count: no padding, no per-size compiles;
        # a single token (batch-1 decode) runs a fixed-shape graph of the same cell (same bits, less overhead).
        self.dynamic = cpu_kernels and kernels.dynamic_shapes()
        self._single = _FixedShapeStep(self._cell) if self.dynamic else None
        if self.dynamic:
            i32 = ms.int32
            tokens = Tensor(shape=[None], dtype=i32)
            self._cell.set_inputs(
                Tensor(shape=[1, None], dtype=i32), Tensor(shape=[1, None], dtype=i32), tokens, tokens,
                Tensor(shape=[2], dtype=i32), Tensor(shape=[cfg.n_layer], dtype=ms.float32),
                Tensor(shape=[1], dtype=i32), tokens,
            )
        self._slot_stride = cfg.n_head * max_seq_len  # cache rows per slot
        self._copy = _CopyCell(self._cell, kernels.copy_slot_rows()) if cpu_kernels else None
        # The attention kernel's [max_seq_len, n_head] and per-layer scales: made once, passed as step inputs.
        self._meta = Tensor(np.array([max_seq_len, cfg.n_head], np.int32))
        self._scales = Tensor(np.array(model.attention_scales(), np.float32))

    @property
    def packed_weights(self) -> bool:
        """Whether the step uses a packed copy of the weights (self.packed_form: "panels", "amx" or "int8")."""
        return self.packed_form is not None

    def release_model_weights(self) -> None:
        """Free the model's projection weights (int8: and the token embedding), which the step never reads once
        they are packed: the model is then usable only through this session (the server's case; the packed copy
        no longer doubles their memory)."""
        if not self.packed_weights:
            raise ValueError("the session has no packed copy of the weights")
        weights = [proj.weight for block in self.model.transformer.h for proj in block.projections()]
        if self.packed_form == "int8":
            weights.append(self.model.transformer.wte.weight)
            self.model.int8_weights = None
        for w in weights:
            w.set_data(Tensor(np.zeros((0,), np.float32)), slice_shape=True)

    @property
    def can_copy_prefix(self) -> bool:
        """Whether `copy_prefix` is available (it needs the CPU kernels)."""
        return self._copy is not None

    def copy_prefix(self, src_slot: int, dst_slot: int, n: int) -> None:
        """Copy positions [0, n) of `src_slot`'s keys and values, in every layer, to `dst_slot`: a prompt that
        starts with the n tokens whose K/V `src_slot` holds then computes from position n, with the same bits as
        if it had computed them (a position's K/V depend only on the tokens up to it)."""
        if self._copy is None:
            raise ValueError("copy_prefix needs the CPU kernels")
        for name, v in (("src_slot", src_slot), ("dst_slot", dst_slot)):
            if not 0 <= v < self.num_slots:
                raise ValueError(f"{name} must be in [0, {self.num_slots}), got {v}")
        if not 0 <= n <= self.max_seq_len:
            raise ValueError(f"n must be in [0, max_seq_len={self.max_seq_len}], got {n}")
        if n and src_slot != dst_slot:
            self._run_copy(src_slot, dst_slot, n)

    def _run_copy(self, src_slot: int, dst_slot: int, n: int) -> None:
        s = self._slot_stride
        meta = np.array([src_slot * s, dst_slot * s, n, s // self.max_seq_len, self.max_seq_len], np.int32)
        self._copy(Tensor(meta)).asnumpy()

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    @property
    def max_chunk(self) -> int:
        return self.chunk_buckets[-1]

    def padded_shape(self, batch: int, chunk: int, max_position: int) -> tuple[int, int, int]:
        """The (batch, chunk, context) buckets a step of this size runs at."""
        return (
            _bucket(self.batch_buckets, batch, "batch size"),
            _bucket(self.chunk_buckets, chunk, "chunk length"),
            _bucket(self.context_buckets, max_position + 1, "context length"),
        )

    def step(
        self,
        token_ids: np.ndarray,
        positions: np.ndarray,
        slot_ids: np.ndarray,
        logits_index: np.ndarray | None,
    ) -> np.ndarray:
        """Run one step; returns float32 logits (B, V), or (B, T, V) when logits_index is None.

        token_ids, positions int (B, T), position -1 marks padding (nothing written, logits meaningless);
        slot_ids int (B,) distinct, in [0, num_slots); logits_index int (B,) in [0, T) or None.
        Each token's K/V is written at (slot, position) and each query attends to its slot's positions <= its own.
        """
        ids, pos, slots, lidx = self._validate(token_ids, positions, slot_ids, logits_index)
        b, t = ids.shape
        bb, tb, cb = self.padded_shape(b, t, int(pos.max()))  # checks the sizes against the session's limits
        if self.dynamic:
            return self._rows_as_flat(ids, pos, slots, lidx)
        L = self.max_seq_len

        ids_p = np.zeros((bb, tb), np.int32)
        ids_p[:b, :t] = ids
        pos_p = np.full((bb, tb), -1, np.int32)
        pos_p[:b, :t] = pos
        slot_p = np.full((bb,), self.num_slots, np.int64)  # padding rows use the scratch slot
        slot_p[:b] = slots
        base = slot_p * self._slot_stride
        write = base[:, None] + pos_p
        # Padding tokens write into the scratch slot, spread over its rows (their values are never used).
        pad = pos_p < 0
        write[pad] = self.num_slots * self._slot_stride + np.arange(bb * tb).reshape(bb, tb)[pad] % L
        if lidx is None:
            rows = None
        else:
            rows_np = np.arange(bb, dtype=np.int32) * tb
            rows_np[:b] += lidx
            rows = Tensor(rows_np)
        logits = self._run(ids_p, pos_p, write.reshape(-1), base, 1 if self.cpu_kernels else cb, rows)
        return logits[:b] if lidx is not None else logits[:b, :t]

    @property
    def logits_row_buckets(self) -> tuple[int, ...]:
        """The logits-row counts `step_flat` pads to (coarser than the batch buckets: fewer compiled graphs)."""
        return tuple(sorted({b for b in (1, 4, 16) if b < self.max_batch} | {self.max_batch}))

    def step_flat(
        self,
        token_ids: np.ndarray,
        positions: np.ndarray,
        slot_ids: np.ndarray,
        logits_index: np.ndarray | None,
    ) -> np.ndarray:
        """Run one step over several sequences' tokens packed into one flat row: no padding between sequences.

        token_ids, positions, slot_ids int (N,): each token with its own position and its sequence's slot, a
        sequence's tokens adjacent and in position order; logits_index int (R,) indices into [0, N) of the tokens
        whose logits are wanted, or None for every token. Returns float32 logits (R, V), or (N, V).
        With the CPU kernels the N tokens run as one (1, N) pass padded to a chunk bucket (the attention kernel
        takes each token's slot); otherwise the tokens are regrouped into (B, T) rows for `step`.
        """
        ids, pos, slots = (np.asarray(a) for a in (token_ids, positions, slot_ids))
        if ids.ndim != 1 or ids.size == 0 or pos.shape != ids.shape or slots.shape != ids.shape:
            raise ValueError(
                f"token_ids, positions and slot_ids must be non-empty (N,) arrays of one length, got shapes "
                f"{ids.shape}, {pos.shape}, {slots.shape}"
            )
        n = ids.size
        lidx = None if logits_index is None else np.asarray(logits_index)
        if lidx is not None and (
            lidx.ndim != 1 or lidx.size == 0 or not np.issubdtype(lidx.dtype, np.integer) or lidx.min() < 0
            or lidx.max() >= n
        ):
            raise ValueError(f"logits_index must be a non-empty int array of indices in [0, {n}), got {lidx}")
        self._check_values(ids, pos, slots)
        if pos.min() < 0:
            raise ValueError(f"positions must be >= 0 in a flat step, got min {pos.min()}")
        if not self.cpu_kernels:
            return self._flat_as_rows(ids, pos, slots, lidx)
        if self.dynamic:
            _bucket(self.chunk_buckets, n, "flat token count")  # the session's limit on a step's tokens
            return self._run_flat(ids, pos, slots, lidx)
        nb = _bucket(self.chunk_buckets, n, "flat token count")
        L = self.max_seq_len
        ids_p = np.zeros((1, nb), np.int32)
        ids_p[0, :n] = ids
        pos_p = np.full((1, nb), -1, np.int32)
        pos_p[0, :n] = pos
        base = np.full(nb, self.num_slots * self._slot_stride, np.int64)  # padding: the scratch slot
        base[:n] = slots.astype(np.int64) * self._slot_stride
        write = base.copy()  # padding tokens write scratch rows, spread over the scratch slot
        write[:n] += pos
        write[n:] += np.arange(n, nb) % L
        if lidx is None:
            rows = None
        else:
            r = lidx.size
            rows_np = np.zeros(_bucket(self.logits_row_buckets, r, "logits rows"), np.int32)
            rows_np[:r] = lidx
            rows = Tensor(rows_np)
        out = self._run(ids_p, pos_p, write, base, 1, rows)
        return out[: lidx.size] if lidx is not None else out[0, :n]

    def _run(self, ids, pos, write, base, context: int, rows: Tensor | None) -> np.ndarray:
        # The compiled step on padded arrays: write (B*T,) and base (B,) or (B*T,) cache rows; see _StepCell.
        cell = self._single if self._single is not None and ids.size == 1 else self._cell
        out = cell(
            Tensor(ids),
            Tensor(pos),
            Tensor(write.astype(np.int32)),
            Tensor(base.astype(np.int32)),
            self._meta,
            self._scales,
            Tensor(np.arange(context, dtype=np.int32)),
            rows,
        )
        return out.asnumpy()

    def _run_flat(self, ids, pos, slots, lidx) -> np.ndarray:
        # The one dynamic graph: exactly these tokens, and the rows asked for (every token's: all of them).
        n = ids.size
        base = slots.astype(np.int64) * self._slot_stride
        rows = np.arange(n, dtype=np.int32) if lidx is None else lidx.astype(np.int32)
        return self._run(ids.astype(np.int32).reshape(1, n), pos.astype(np.int32).reshape(1, n), base + pos, base,
                         1, Tensor(rows))

    def _rows_as_flat(self, ids, pos, slots, lidx) -> np.ndarray:
        # A (B, T) step through the one dynamic graph: its real tokens in one flat pass, padding dropped. Logits
        # at padding positions are meaningless (see step): zeros here.
        b, t = ids.shape
        real = (pos >= 0).reshape(-1)
        flat_index = np.cumsum(real) - 1  # index of each real token in the flat pass
        wanted = np.arange(b * t) if lidx is None else np.arange(b) * t + lidx  # flat (B*T) positions asked for
        keep = real[wanted]
        out = self._run_flat(ids.reshape(-1)[real], pos.reshape(-1)[real], np.repeat(slots, t)[real],
                             flat_index[wanted[keep]])
        if keep.all():  # no padding asked for (decode): the logits as they are, not copied (0.2 MB a row)
            full = out
        else:
            full = np.zeros((wanted.size, out.shape[-1]), np.float32)
            full[keep] = out
        return full if lidx is not None else full.reshape(b, t, -1)

    def _flat_as_rows(self, ids, pos, slots, lidx) -> np.ndarray:
        # MindSpore's ops gather one context per row: one row per run of tokens of the same slot.
        starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]])
        ends = np.r_[starts[1:], ids.size]
        t = int((ends - starts).max())
        b = starts.size
        ids2 = np.zeros((b, t), np.int64)
        pos2 = np.full((b, t), -1, np.int64)
        row_of = np.empty(ids.size, np.int64)
        col_of = np.empty(ids.size, np.int64)
        for i, (a, e) in enumerate(zip(starts, ends)):
            ids2[i, : e - a] = ids[a:e]
            pos2[i, : e - a] = pos[a:e]
            row_of[a:e], col_of[a:e] = i, np.arange(e - a)
        out = self.step(ids2, pos2, slots[starts], None)  # (b, t, V): every position
        flat = out[row_of, col_of]
        return flat if lidx is None else flat[lidx]

    def _check_values(self, ids, pos, slots):
        for name, a in (("token_ids", ids), ("positions", pos), ("slot_ids", slots)):
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token_ids must be in [0, {self.vocab_size}), got range [{ids.min()}, {ids.max()}]")
        if pos.min() < -1 or pos.max() >= self.max_seq_len:
            raise ValueError(
                f"positions must be -1 (padding) or in [0, max_seq_len={self.max_seq_len}), "
                f"got range [{pos.min()}, {pos.max()}]"
            )
        if pos.max() < 0:
            raise ValueError("positions are all padding (-1): nothing to run")
        if slots.min() < 0 or slots.max() >= self.num_slots:
            raise ValueError(f"slot_ids must be in [0, {self.num_slots}), got range [{slots.min()}, {slots.max()}]")

    def _validate(self, token_ids, positions, slot_ids, logits_index):
        ids = np.asarray(token_ids)
        pos = np.asarray(positions)
        slots = np.asarray(slot_ids)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"token_ids must be a non-empty (B, T) array, got shape {ids.shape}")
        if pos.shape != ids.shape:
            raise ValueError(f"positions shape {pos.shape} must equal token_ids shape {ids.shape}")
        b, t = ids.shape
        if slots.shape != (b,):
            raise ValueError(f"slot_ids must have shape ({b},), got {slots.shape}")
        self._check_values(ids, pos, slots)
        if len(np.unique(slots)) != b:
            raise ValueError(f"slot_ids must be distinct within a step, got {slots.tolist()}")
        lidx = None
        if logits_index is not None:
            lidx = np.asarray(logits_index)
            if lidx.shape != (b,) or not np.issubdtype(lidx.dtype, np.integer):
                raise ValueError(f"logits_index must be an int array of shape ({b},), got {lidx.shape} {lidx.dtype}")
            if lidx.min() < 0 or lidx.max() >= t:
                raise ValueError(f"logits_index must be in [0, T={t}), got {lidx.tolist()}")
            lidx = lidx.astype(np.int32)
        return ids.astype(np.int32), pos.astype(np.int32), slots.astype(np.int64), lidx

    # ---- convenience ---------------------------------------------------------------------------------------

    def warmup(self, shapes: Sequence[tuple[int, int, int]] = (), all_logits: bool = False) -> None:
        """Compile the given padded (batch, chunk, context) shapes now rather than on first use."""
        for bb, tb, cb in shapes:
            ids = np.zeros((bb, tb), np.int32)
            pos = np.full((bb, tb), -1, np.int32)
            pos[0, 0] = cb - 1
            self.step(ids, pos, np.arange(bb), None if all_logits else np.zeros(bb, np.int32))

    def warmup_copy(self) -> None:
        """Compile `copy_prefix`'s graph now (it copies nothing)."""
        if self._copy is not None:
            self._run_copy(0, 0, 0)

    def warmup_flat(self, shapes: Sequence[tuple[int, int | None]]) -> None:
        """Compile `step_flat` for the given padded (tokens, logits rows) shapes (rows None: every position's
        logits); writes scratch into slot 0."""
        for nb, rb in shapes:
            self.step_flat(
                np.zeros(nb, np.int32), np.arange(nb, dtype=np.int32) % self.max_seq_len,
                np.zeros(nb, np.int32), None if rb is None else np.arange(rb, dtype=np.int32) % nb,
            )

    def generate(
        self,
        prompt_ids: Sequence[int] | Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        eos_token_id: int | None = None,
    ) -> list[int] | list[list[int]]:
        """Greedy (argmax) continuation of one prompt (list[int]) or several (list[list[int]]).

        Returns only the new tokens; a sequence stops after emitting eos_token_id (included). Prompts are
        prefilled in chunks of at most the largest chunk bucket, all rows together, then decoded together.
        """
        single = len(prompt_ids) > 0 and isinstance(prompt_ids[0], (int, np.integer))
        prompts = [list(map(int, prompt_ids))] if single else [list(map(int, p)) for p in prompt_ids]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if len(prompts) > min(self.num_slots, self.max_batch):
            raise ValueError(f"{len(prompts)} prompts exceed the session's {self.num_slots} slots")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {longest} exceeds max_seq_len {self.max_seq_len}")
        n = len(prompts)
        slots = np.arange(n)
        out: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens == 0:
            return out[0] if single else out
        # Prefill: chunk c of every prompt in one step; rows whose prompt is done send padding.
        last_logits = np.zeros((n, self.vocab_size), np.float32)
        chunk = self.max_chunk
        for start in range(0, max(len(p) for p in prompts), chunk):
            rows = [i for i, p in enumerate(prompts) if start < len(p)]
            t = min(chunk, max(len(prompts[i]) - start for i in rows))
            ids = np.zeros((len(rows), t), np.int32)
            pos = np.full((len(rows), t), -1, np.int32)
            lidx = np.zeros(len(rows), np.int32)
            for r, i in enumerate(rows):
                piece = prompts[i][start : start + t]
                ids[r, : len(piece)] = piece
                pos[r, : len(piece)] = np.arange(start, start + len(piece))
                lidx[r] = len(piece) - 1
            logits = self.step(ids, pos, slots[rows], lidx)
            for r, i in enumerate(rows):
                if start + t >= len(prompts[i]):
                    last_logits[i] = logits[r]
        done = np.zeros(n, bool)
        lengths = np.array([len(p) for p in prompts])
        next_tok = last_logits.argmax(-1)
        for _ in range(max_new_tokens):
            for i in range(n):
                if not done[i]:
                    out[i].append(int(next_tok[i]))
                    done[i] = eos_token_id is not None and next_tok[i] == eos_token_id
            if done.all() or all(len(o) >= max_new_tokens for o in out):
                break
            live = np.flatnonzero(~done)
            logits = self.step(
                next_tok[live].reshape(-1, 1),
                lengths[live].reshape(-1, 1),
                slots[live],
                np.zeros(len(live), np.int32),
            )
            lengths[live] += 1
            next_tok[live] = logits.argmax(-1)
        return out[0] if single else out


def _buckets(name: str, given: Sequence[int] | None, default: tuple[int, ...], limit: int) -> tuple[int, ...]:
    b = tuple(sorted(set(int(x) for x in (default if given is None else given))))
    if not b or b[0] < 1 or b[-1] > limit:
        raise ValueError(f"{name} must be non-empty positive sizes <= {limit}, got {given}")
    return b


def _bucket(buckets: tuple[int, ...], n: int, what: str) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def generate(model: GPT2LMHeadModel, prompt_ids, max_new_tokens: int, *, eos_token_id: int | None = None):
    """Greedy generation through a session cached on the model (see InferenceSession.generate); the session packs
    nothing, so it stays right if the model's weights change (training between calls)."""
    return _default_session(model, prompt_ids).generate(prompt_ids, max_new_tokens, eos_token_id=eos_token_id)


def _default_session(model: GPT2LMHeadModel, prompt_ids) -> InferenceSession:
    """The session `generate` caches on the model, rebuilt only when more slots are needed."""
    single = len(prompt_ids) > 0 and isinstance(prompt_ids[0], (int, np.integer))
    n = 1 if single else len(prompt_ids)
    sess = model.__dict__.get("_generate_session")
    if sess is None or sess.num_slots < n:
        # quantize: what textgen's from_pretrained(quantize=...) asked for (the int8 copy is made here, once)
        sess = InferenceSession(model, num_slots=max(n, 1), quantize=model.__dict__.get("quantize"))
        model.__dict__["_generate_session"] = sess
    return sess
