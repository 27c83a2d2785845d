"""Turns a scheduled step into one flat model pass and sampled tokens: the one place that calls model/.

`ModelRunner` works with any object that has the session's `step_flat(token_ids, positions, slot_ids,
logits_index)` (tests use a numpy fake); `load_session` builds the real MindSpore session from a model directory.
Knows arrays and sequences; nothing of text, threads or HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from model import sampler
from .outputs import TokenInfo
from .scheduler import PrefillChunk
from .sequence import Sequence

log = logging.getLogger("serving.engine")


class StepSession(Protocol):
    def step_flat(
        self, token_ids: np.ndarray, positions: np.ndarray, slot_ids: np.ndarray, logits_index: np.ndarray | None
    ) -> np.ndarray: ...


@dataclass
class SampleFailure:
    """In place of a token: sampling this row raised, so its request fails alone (its neighbours got theirs)."""

    error: Exception


@dataclass
class ChunkResult:
    # Logprobs of the prompt tokens this chunk predicts (prompt[start+1 : end+1]), when requested.
    prompt: list[TokenInfo] | None = None
    # The first generated token, when this chunk completes a generating prompt.
    token: TokenInfo | SampleFailure | None = None


class ModelRunner:
    def __init__(
        self, session: StepSession, *, eos_token_id: int, special_ids: frozenset[int] = frozenset()
    ) -> None:
        self.session = session
        self.eos_token_id = eos_token_id
        self.special_ids = special_ids | {eos_token_id}

    @property
    def can_copy_prefix(self) -> bool:
        """Whether the session copies K/V rows between slots (prefix caching can then share a running
        sequence's prefix, not only take a free slot's)."""
        return bool(getattr(self.session, "can_copy_prefix", False))

    def copy_prefixes(self, copies: Seq[tuple[int, int, int]]) -> None:
        """(src slot, dst slot, tokens): copy each prefix's K/V rows, in order."""
        for src, dst, n in copies:
            self.session.copy_prefix(src, dst, n)

    def run(
        self, chunks: Seq[PrefillChunk], seqs: Seq[Sequence]
    ) -> tuple[list[ChunkResult], list[TokenInfo | SampleFailure]]:
        """One step as one flat pass: the prompt chunks' tokens one after the other, then the running sequences'
        next tokens (one each, at its own slot and position). Every position's logits only if a chunk wants prompt
        logprobs; otherwise each chunk's last position and each decode token."""
        lens = [c.end - c.start for c in chunks]
        ends = np.cumsum(lens, dtype=np.int64)
        n = int(ends[-1]) if chunks else 0
        ids = np.concatenate([np.asarray(c.seq.prompt_ids[c.start : c.end], np.int32) for c in chunks]
                             + [np.array([s.last_token for s in seqs], np.int32)])
        pos = np.concatenate([np.arange(c.start, c.end, dtype=np.int32) for c in chunks]
                             + [np.array([s.num_cached for s in seqs], np.int32)])
        slots = np.concatenate([np.repeat(np.array([c.seq.slot for c in chunks], np.int32), lens),
                                np.array([s.slot for s in seqs], np.int32)])
        decode_rows = n + np.arange(len(seqs))
        results = [ChunkResult() for _ in chunks]
        if any(c.seq.wants_prompt_logprobs for c in chunks):
            out = self.session.step_flat(ids, pos, slots, None)
            for r, c, e, m in zip(results, chunks, ends, lens):
                if c.seq.wants_prompt_logprobs:
                    r.prompt = self._prompt_logprobs(c, out[e - m : e])
            last, decoded = out[ends - 1], out[decode_rows]
        else:
            out = self.session.step_flat(ids, pos, slots, np.concatenate([ends - 1, decode_rows]))
            last, decoded = out[: len(chunks)], out[len(chunks) :]
        # One sampling call for the step: the first tokens of the prompts this pass completed, then the decodes.
        gen = [i for i, c in enumerate(chunks) if c.is_last and not c.seq.score_only]
        rows = [chunks[i].seq for i in gen] + list(seqs)
        tokens = self._sample(np.concatenate([last[gen], decoded]), rows) if rows else []
        for j, i in enumerate(gen):
            results[i].token = tokens[j]
        return results, tokens[len(gen) :]

    def _prompt_logprobs(self, chunk: PrefillChunk, logits: np.ndarray) -> list[TokenInfo]:
        seq = chunk.seq
        first_target = chunk.start + 1
        end_target = min(chunk.end, seq.num_prompt - 1)  # inclusive: the chunk's last position predicts it
        n = end_target - first_target + 1
        if n <= 0:
            return []
        lp = sampler.log_softmax(logits[:n])
        targets = np.asarray(seq.prompt_ids[first_target : end_target + 1])
        chosen = lp[np.arange(n), targets]
        k = seq.params.prompt_logprobs or 0
        top_ids, top_vals = sampler.top_n(lp, k) if k else (None, None)
        infos = []
        for j in range(n):
            top = None if top_ids is None else list(zip(top_ids[j].tolist(), top_vals[j].tolist()))
            tid = int(targets[j])
            infos.append(TokenInfo(tid, float(chosen[j]), tid in self.special_ids, top))
        return infos

    # ---- sampling ------------------------------------------------------------------------------------------

    def _sample(self, logits: np.ndarray, seqs: Seq[Sequence]) -> list[TokenInfo | SampleFailure]:
        """One token per row. If the batch raises, each row is sampled alone from its generator's state before
        the batch (so the other rows get exactly the tokens they would have got) and only the rows that raise
        again fail: one request's parameters can never fail its neighbours."""
        rows = [
            sampler.SamplingRow(s.params, s.prompt_ids, s.output_ids, s.rng, self._suppressed(s)) for s in seqs
        ]
        logits = np.ascontiguousarray(logits, np.float32)
        states = [None if r.rng is None else r.rng.bit_generator.state for r in rows]
        try:
            return self._token_infos(sampler.sample(logits, rows))
        except Exception:  # noqa: BLE001 - narrowed down row by row below
            log.exception("sampling %d rows failed; sampling each row alone", len(rows))
        out: list[TokenInfo | SampleFailure] = []
        for i, row in enumerate(rows):
            if states[i] is not None:
                row.rng.bit_generator.state = states[i]
            try:
                out += self._token_infos(sampler.sample(logits[i : i + 1], [row]))
            except Exception as e:  # noqa: BLE001 - this row's request fails with it
                out.append(SampleFailure(e))
        return out

    def _token_infos(self, res: sampler.SampleResult) -> list[TokenInfo]:
        special = self.special_ids
        out = []
        for tid, lp, top_ids, top_lps in zip(res.token_ids.tolist(), res.logprobs.tolist(), res.top_ids,
                                             res.top_logprobs):
            top = None if top_ids is None else list(zip(top_ids.tolist(), top_lps.tolist()))
            out.append(TokenInfo(tid, lp, tid in special, top))
        return out

    def _suppressed(self, seq: Sequence) -> tuple[int, ...]:
        p = seq.params
        if seq.num_output >= p.min_new_tokens:
            return ()
        return p.stop_token_ids + (() if p.ignore_eos else (self.eos_token_id,))


def load_session(
    model_dir: str,
    *,
    num_slots: int,
    max_seq_len: int,
    batch_buckets: tuple[int, ...],
    chunk_buckets: tuple[int, ...],
    device_target: str = "CPU",
    compute_dtype: str = "float32",
    compile_cache_dir: str | None = None,
    quantize: str | None = None,
    defer_packing: bool = False,
):
    """Build the MindSpore model and its compiled KV-cache session from a model directory; with
    `compile_cache_dir`, the step graph is cached there (in a subdirectory for this architecture and layout);
    quantize: None or "int8" (InferenceSession's); defer_packing: load_model_dir's (the caller then compiles
    while the weights are packed, and must `wait_packed(session.model)` before the session's steps mean
    anything)."""
    import os

    import mindspore as ms

    from model import GPT2Config, InferenceSession, kernels
    from model.checkpoint import CONFIG_NAME, load_model_dir
    from model.runtime import graph_cache_dir, set_device

    if compile_cache_dir:
        with open(os.path.join(model_dir, CONFIG_NAME), "rb") as f:
            config = f.read()
        compile_cache_dir = graph_cache_dir(
            compile_cache_dir, config, num_slots, max_seq_len, batch_buckets, chunk_buckets, device_target,
            compute_dtype, kernels.library_path() if kernels.enabled_by_env() else None, kernels.amx_available(),
            quantize, kernels.block_enabled(),
        )
    set_device(device_target, compile_cache_dir=compile_cache_dir)
    # The weights the session packs are packed (or quantized) as each is read: the float32 weights and their
    # packed copy are never both in memory.
    cfg = GPT2Config.from_json(os.path.join(model_dir, CONFIG_NAME))
    pack = "int8" if quantize == "int8" else kernels.packed_form(cfg, getattr(ms, compute_dtype))
    model = load_model_dir(model_dir, compute_dtype=compute_dtype, pack=pack, defer_packing=defer_packing)
    session = InferenceSession(
        model,
        num_slots=num_slots,
        max_seq_len=max_seq_len,
        batch_buckets=batch_buckets,
        chunk_buckets=chunk_buckets,
        # The server never changes its weights, so the packed copy cannot go stale, and it needs the model only
        # through this session: the unpacked projection weights are freed.
        packed_weights=True,
        quantize=quantize,
    )
    if session.packed_weights:
        session.release_model_weights()
    return session


def step_shapes(session) -> list[tuple[int, int | None]]:
    """Every padded (tokens, logits rows) shape `ModelRunner.run` can ask `session.step_flat` for: each token bucket
    with each logits-row bucket that at most that many rows (one per sequence, at most a token each) pad to, or
    with every position's logits (None: prompt logprobs). A session with a dynamic token axis has one graph for
    every size but a single token, which has a fixed-shape graph of its own: two shapes compile both."""
    if getattr(session, "dynamic", False):
        return [(1, 1), (2, 1)]
    rows = session.logits_row_buckets
    shapes = []
    for t in session.chunk_buckets:
        for r in rows:
            smaller = [b for b in rows if b < r]
            if not smaller or smaller[-1] < min(t, rows[-1]):  # some row count <= t pads to r
                shapes.append((t, r))
        shapes.append((t, None))
    return shapes


def warmup(session) -> int:
    """Compile every step shape before the server reports healthy, so that no request stalls on compilation."""
    shapes = step_shapes(session)
    session.warmup_flat(shapes)
    if getattr(session, "can_copy_prefix", False):
        session.warmup_copy()  # prefix caching's copy graph
    return len(shapes)
