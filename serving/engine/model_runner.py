"""Turns scheduled work into `InferenceSession.step` calls and sampled tokens: the one place that calls model/.

`ModelRunner` works with any object that has the session's `step(token_ids, positions, slot_ids, logits_index)`
(tests use a numpy fake); `load_session` builds the real MindSpore session from a model directory. Knows arrays
and sequences; nothing of text, threads or HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .. import sampler
from .outputs import TokenInfo
from .scheduler import PrefillChunk
from .sequence import Sequence

log = logging.getLogger("serving.engine")


class StepSession(Protocol):
    def step(
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
        self,
        session: StepSession,
        *,
        num_slots: int,
        eos_token_id: int,
        special_ids: frozenset[int] = frozenset(),
        decode_batch: int | None,
        flat_prefill: bool = False,
    ) -> None:
        """decode_batch: pad every decode step to this many rows (batch-invariant results); None = no padding.
        flat_prefill: run prefill passes through the session's `step_packed` (the chunks one after the other in
        one row, no padding between them) rather than one padded row per chunk."""
        self.session = session
        self.flat_prefill = flat_prefill
        self.num_slots = num_slots
        self.eos_token_id = eos_token_id
        self.special_ids = special_ids | {eos_token_id}
        self.decode_batch = decode_batch
        assert decode_batch is None or decode_batch <= num_slots

    # ---- prefill -------------------------------------------------------------------------------------------

    def prefill(self, chunks: Seq[PrefillChunk]) -> list[ChunkResult]:
        """One step over prompt chunks (one row each, or one flat row); all positions' logits only if a chunk
        wants prompt logprobs."""
        if self.flat_prefill:
            return self._flat_pass(chunks, [])[0]
        r = len(chunks)
        t = max(c.end - c.start for c in chunks)
        ids = np.zeros((r, t), np.int32)
        pos = np.full((r, t), -1, np.int32)
        for i, c in enumerate(chunks):
            n = c.end - c.start
            ids[i, :n] = c.seq.prompt_ids[c.start : c.end]
            pos[i, :n] = np.arange(c.start, c.end)
        slots = np.array([c.seq.slot for c in chunks], np.int32)
        last = np.array([c.end - c.start - 1 for c in chunks], np.int32)
        all_logits = any(c.seq.wants_prompt_logprobs for c in chunks)
        out = self.session.step(ids, pos, slots, None if all_logits else last)
        last_logits = out[np.arange(r), last] if all_logits else out
        return self._chunk_results(chunks, last_logits, out if all_logits else None)

    def prefill_and_decode(
        self, chunks: Seq[PrefillChunk], seqs: Seq[Sequence]
    ) -> tuple[list[ChunkResult], list[TokenInfo | SampleFailure]]:
        """A flat prefill pass and a decode step as one pass: the running sequences' next tokens ride along after
        the prompt chunks (one token each, at its own slot and position), so the weights are read once for both."""
        assert self.flat_prefill and chunks and seqs
        return self._flat_pass(chunks, seqs)

    def _flat_pass(
        self, chunks: Seq[PrefillChunk], seqs: Seq[Sequence]
    ) -> tuple[list[ChunkResult], list[TokenInfo | SampleFailure]]:
        # Through step_packed: the chunks' tokens one after the other, then one decode token per sequence in seqs.
        lens = [c.end - c.start for c in chunks]
        ends = np.cumsum(lens)
        n = int(ends[-1])
        ids = np.concatenate([np.asarray(c.seq.prompt_ids[c.start : c.end], np.int32) for c in chunks]
                             + [np.array([s.last_token for s in seqs], np.int32)])
        pos = np.concatenate([np.arange(c.start, c.end, dtype=np.int32) for c in chunks]
                             + [np.array([s.num_cached for s in seqs], np.int32)])
        slots = np.concatenate([np.repeat(np.array([c.seq.slot for c in chunks], np.int32), lens),
                                np.array([s.slot for s in seqs], np.int32)])
        decode_rows = n + np.arange(len(seqs))
        if any(c.seq.wants_prompt_logprobs for c in chunks):
            out = self.session.step_packed(ids, pos, slots, None)
            per_chunk = [out[e - m : e] for e, m in zip(ends, lens)]
            prefilled = self._chunk_results(chunks, out[ends - 1], per_chunk)
            decoded = out[decode_rows]
        else:
            out = self.session.step_packed(ids, pos, slots, np.concatenate([ends - 1, decode_rows]))
            prefilled = self._chunk_results(chunks, out[: len(chunks)], None)
            decoded = out[len(chunks) :]
        return prefilled, self._sample(decoded, seqs) if seqs else []

    def _chunk_results(self, chunks: Seq[PrefillChunk], last_logits: np.ndarray, all_logits) -> list[ChunkResult]:
        """Prompt logprobs (from each chunk's every-position logits, when given) and first tokens."""
        results = [ChunkResult() for _ in chunks]
        for i, c in enumerate(chunks):
            if c.seq.wants_prompt_logprobs:
                results[i].prompt = self._prompt_logprobs(c, all_logits[i])
        gen = [i for i, c in enumerate(chunks) if c.is_last and not c.seq.score_only]
        if gen:
            res = self._sample(last_logits[gen], [chunks[i].seq for i in gen])
            for j, i in enumerate(gen):
                results[i].token = res[j]
        return results

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

    # ---- decode --------------------------------------------------------------------------------------------

    def decode(self, seqs: Seq[Sequence]) -> list[TokenInfo | SampleFailure]:
        """One decode step: every sequence feeds its last token at its next position."""
        b = len(seqs)
        rows = b if self.decode_batch is None else self.decode_batch
        ids = np.zeros((rows, 1), np.int32)
        pos = np.full((rows, 1), -1, np.int32)
        slots = np.empty(rows, np.int32)
        ids[:b, 0] = [s.last_token for s in seqs]
        pos[:b, 0] = [s.num_cached for s in seqs]
        slots[:b] = [s.slot for s in seqs]
        if rows > b:
            # Padding rows borrow slots no decoding sequence uses; position -1 means they write nothing.
            used = set(slots[:b].tolist())
            slots[b:] = [x for x in range(self.num_slots) if x not in used][: rows - b]
        logits = self.session.step(ids, pos, slots, np.zeros(rows, np.int32))[:b]
        return self._sample(logits, seqs)

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
):
    """Build the MindSpore model and its compiled KV-cache session from a model directory."""
    from model import GPT2LMHeadModel, InferenceSession
    from model.runtime import set_device

    set_device(device_target, compile_cache_dir=compile_cache_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir, compute_dtype=compute_dtype)
    return InferenceSession(
        model,
        num_slots=num_slots,
        max_seq_len=max_seq_len,
        batch_buckets=batch_buckets,
        chunk_buckets=chunk_buckets,
        # The server never changes its weights, so the AMX copy cannot go stale (used only where the CPU has AMX).
        packed_weights=True,
    )


def warmup(
    session, *, decode_batches: tuple[int, ...], max_prefill_tokens: int | None = None, flat_prefill: bool = False
) -> int:
    """Compile the shapes most requests hit, so that requests do not stall on compilation: decode at every decode
    batch size (one with fixed decode batching) and context bucket, and a first prefill chunk of each chunk
    bucket (at each context a first chunk of that bucket can need), alone and, with packed prefill, at every row
    bucket whose padded pass fits max_prefill_tokens. Other shapes (later chunks of long prompts, prompt
    logprobs) compile on first use."""
    contexts = session.context_buckets

    def context(n: int) -> int:
        return next(c for c in contexts if c >= n)

    shapes = [(b, 1, cb) for b in sorted(decode_batches, reverse=True) for cb in contexts]
    if flat_prefill:
        # Packed passes: (tokens, logits rows) per chunk bucket; the context is not a compiled dimension here.
        flat = [(tb, r) for tb in session.chunk_buckets if tb > 1 for r in session.packed_row_buckets if r <= tb]
        session.warmup(shapes)
        session.warmup_packed(flat)
        return len(shapes) + len(flat)
    shorter = 0  # first chunks of shorter+1 .. tb tokens pad to chunk bucket tb
    for tb in session.chunk_buckets:
        rows = [1]
        if max_prefill_tokens is not None:
            rows += [b for b in session.batch_buckets if 1 < b and b * tb <= max_prefill_tokens]
        for cb in (c for c in contexts if context(shorter + 1) <= c <= context(tb)):
            shapes += [(b, tb, cb) for b in rows if (b, tb, cb) not in shapes]
        shorter = tb
    session.warmup(shapes)
    return len(shapes)
