"""Vectorised next-token selection in numpy: penalties, temperature, top-k/top-p/min-p/typical, draws, logprobs.

Small pure functions over a (B, V) logits batch, each row with its own parameters, plus `sample`, which chains
them for one batch. Every operation is row-wise, so a row's result does not depend on the other rows; random
draws come from each request's own `numpy.random.Generator`, so a seeded request gives the same tokens whatever
else is in the batch. Knows nothing of sequences, schedulers or models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .sampling_params import SamplingParams

# Candidates examined before falling back to a full sort for nucleus / min-p rows (exact either way).
_CANDIDATES = 1024


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax over the last axis, float32; -inf entries stay -inf."""
    m = np.max(logits, axis=-1, keepdims=True)
    x = logits - m
    lse = np.log(np.sum(np.exp(x), axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return x - lse


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """Row-wise logsumexp over the last axis (float64)."""
    m = np.max(logits, axis=-1, keepdims=True)
    return (np.log(np.sum(np.exp(logits - m), axis=-1, dtype=np.float64)) + m[..., 0]).astype(np.float64)


def apply_repetition_penalty(
    logits: np.ndarray, rows: np.ndarray, cols: np.ndarray, penalty: np.ndarray
) -> None:
    """In place: divide positive (multiply negative) logits of seen tokens by the row's penalty.

    rows, cols: one (row, token) pair per seen token; repeats are harmless (every write uses the original value).
    """
    if rows.size == 0:
        return
    vals = logits[rows, cols]
    p = penalty[rows].astype(logits.dtype)
    logits[rows, cols] = np.where(vals > 0, vals / p, vals * p)


def apply_presence_frequency(
    logits: np.ndarray, rows: np.ndarray, cols: np.ndarray, presence: np.ndarray, frequency: np.ndarray
) -> None:
    """In place: subtract frequency * count and presence * (count > 0); one (row, token) pair per occurrence."""
    if rows.size == 0:
        return
    np.add.at(logits, (rows, cols), -frequency[rows].astype(logits.dtype))
    keys = np.unique(rows.astype(np.int64) * logits.shape[1] + cols)
    urows, ucols = keys // logits.shape[1], keys % logits.shape[1]
    logits[urows, ucols] -= presence[urows].astype(logits.dtype)


def apply_logit_bias(logits: np.ndarray, rows: np.ndarray, cols: np.ndarray, bias: np.ndarray) -> None:
    """In place: add an additive bias per (row, token) pair."""
    if rows.size:
        np.add.at(logits, (rows, cols), bias.astype(logits.dtype))


def filter_top_k_top_p_min_p(
    logits: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray
) -> np.ndarray:
    """Return a copy with every token outside each row's top-k, nucleus and min-p set at -inf.

    top_k 0 disables; the nucleus is taken over the distribution left after top-k (the whole vocabulary when
    top_k is 0): the most likely tokens whose mass before them is < top_p; min-p keeps p >= min_p * p_max.
    """
    b, v = logits.shape
    kk = np.where(top_k > 0, np.minimum(top_k, v), v)
    # Look at the best k candidates first; only rows whose kept set may reach past them are redone in full.
    k = int(kk[top_k > 0].max()) if np.any(top_k > 0) else 0
    if np.any((top_k == 0) & ((top_p < 1.0) | (min_p > 0.0))):
        k = max(k, _CANDIDATES)
    k = min(max(k, 1), v)
    idx, vals, keep = _filter_candidates(logits, k, kk, top_p, min_p)
    out = np.full_like(logits, -np.inf)
    np.put_along_axis(out, idx, np.where(keep, vals, -np.inf).astype(logits.dtype), 1)
    redo = np.flatnonzero(keep[:, -1] & (kk > k))
    if redo.size:
        full_idx, full_vals, full_keep = _filter_candidates(logits[redo], v, kk[redo], top_p[redo], min_p[redo])
        sub = np.full((redo.size, v), -np.inf, logits.dtype)
        np.put_along_axis(sub, full_idx, np.where(full_keep, full_vals, -np.inf).astype(logits.dtype), 1)
        out[redo] = sub
    return out


def _filter_candidates(
    logits: np.ndarray, k: int, kk: np.ndarray, top_p: np.ndarray, min_p: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's k best tokens in descending order: (ids, logits, keep mask), all (B, k)."""
    b, v = logits.shape
    if k < v:
        part = np.argpartition(logits, v - k, axis=1)[:, v - k :]
        order = np.argsort(-np.take_along_axis(logits, part, 1), axis=1)
        idx = np.take_along_axis(part, order, 1)
    else:
        idx = np.argsort(-logits, axis=1)
    vals = np.take_along_axis(logits, idx, 1)
    keep = np.arange(k)[None, :] < kk[:, None]
    s = np.where(keep, vals, -np.inf).astype(np.float64)
    # Normalise over the top-k set, or over the whole vocabulary when top-k is off.
    lse = _lse64(s)
    full = kk >= v
    if full.any():
        lse[full] = logsumexp(logits[full])
    p = np.exp(s - lse[:, None])
    mass_before = np.cumsum(p, axis=1) - p
    keep &= mass_before < top_p[:, None]
    keep &= p >= min_p[:, None] * p[:, :1]
    keep[:, 0] = True
    return idx, vals, keep


def _lse64(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=1)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.log(np.sum(np.exp(x - m[:, None]), axis=1)) + m


def filter_typical(logits: np.ndarray, typical_p: np.ndarray) -> np.ndarray:
    """Locally typical sampling: keep the tokens closest to the row's entropy until their mass reaches typical_p."""
    x = logits.astype(np.float64)
    logp = x - _lse64(x)[:, None]
    p = np.exp(logp)
    ent = -np.sum(np.where(p > 0, p * logp, 0.0), axis=1)
    shifted = np.where(p > 0, np.abs(-logp - ent[:, None]), np.inf)
    idx = np.argsort(shifted, axis=1)
    ps = np.take_along_axis(p, idx, 1)
    mass_before = np.cumsum(ps, axis=1) - ps
    keep_sorted = (mass_before < typical_p[:, None]) & (ps > 0)
    keep_sorted[:, 0] = True
    mask = np.zeros(logits.shape, bool)
    np.put_along_axis(mask, idx, keep_sorted, 1)
    out = logits.copy()
    out[~mask] = -np.inf
    return out


def draw(logits: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw per row from softmax(logits) with one uniform in [0, 1) per row (-inf = excluded)."""
    p = np.exp(logits - np.max(logits, axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1, dtype=np.float64)
    out = np.empty(len(logits), np.int64)
    for r in range(len(logits)):
        # side="right": the first token whose cumulative mass exceeds the draw (never a zero-probability one).
        out[r] = min(int(np.searchsorted(cdf[r], uniforms[r] * cdf[r, -1], side="right")), logits.shape[1] - 1)
    return out


def top_n(logprobs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n best (ids, values) per row, best first (ties by lower id)."""
    b, v = logprobs.shape
    n = min(n, v)
    if n > 32:
        part = np.argpartition(-logprobs, n - 1, axis=1)[:, :n]
        vals = np.take_along_axis(logprobs, part, 1)
        order = np.lexsort((part, -vals), axis=1)
        ids = np.take_along_axis(part, order, 1)
        return ids, np.take_along_axis(vals, order, 1)
    # A few argmax passes beat a partition of the whole vocabulary for the small n clients ask for.
    x = logprobs.copy()
    rows = np.arange(b)
    ids = np.empty((b, n), np.int64)
    vals = np.empty((b, n), logprobs.dtype)
    for j in range(n):
        i = np.argmax(x, axis=1)
        ids[:, j] = i
        vals[:, j] = x[rows, i]
        x[rows, i] = -np.inf
    return ids, vals


@dataclass
class SampleResult:
    token_ids: np.ndarray  # (B,) int64
    logprobs: np.ndarray  # (B,) float32: the chosen token's log-probability under the model
    top_ids: list[np.ndarray | None]  # per row: (n,) ids of the n best tokens, or None
    top_logprobs: list[np.ndarray | None]


@dataclass
class SamplingRow:
    """One row's inputs: its parameters, the tokens it has seen, its generator, and tokens to suppress."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    rng: np.random.Generator | None
    suppress_ids: Sequence[int] = ()


def sample(logits: np.ndarray, rows: Sequence[SamplingRow]) -> SampleResult:
    """Choose one token per row of float32 logits (B, V) and report its model logprob (before any processing)."""
    b, v = logits.shape
    assert b == len(rows)
    params = [r.params for r in rows]
    lse = logsumexp(logits)
    x = logits.copy()
    _penalise(x, rows)
    greedy = np.array([p.greedy for p in params])
    tokens = np.empty(b, np.int64)
    if greedy.any():
        tokens[greedy] = np.argmax(x[greedy], axis=1)
    s = np.flatnonzero(~greedy)
    if s.size:
        xs = x[s] / np.array([params[i].temperature for i in s], np.float32)[:, None]
        filt = [i for i in range(s.size) if params[s[i]].needs_filtering]
        if filt:
            f = np.array(filt)
            sub = xs[f]
            pick = lambda name: np.array([getattr(params[s[i]], name) for i in f])  # noqa: E731
            if np.any((pick("top_k") > 0) | (pick("top_p") < 1.0) | (pick("min_p") > 0.0)):
                sub = filter_top_k_top_p_min_p(sub, pick("top_k"), pick("top_p"), pick("min_p"))
            if np.any(pick("typical_p") < 1.0):
                sub = filter_typical(sub, pick("typical_p"))
            xs[f] = sub
        u = np.array([rows[i].rng.random() for i in s])
        tokens[s] = draw(xs, u)
    chosen = (logits[np.arange(b), tokens].astype(np.float64) - lse).astype(np.float32)
    top_ids: list[np.ndarray | None] = [None] * b
    top_lps: list[np.ndarray | None] = [None] * b
    want = [i for i, p in enumerate(params) if p.logprobs]
    if want:
        w = np.array(want)
        ids, vals = top_n(logits[w], max(params[i].logprobs for i in want))
        vals = (vals.astype(np.float64) - lse[w][:, None]).astype(np.float32)
        for j, i in enumerate(want):
            n = params[i].logprobs
            top_ids[i], top_lps[i] = ids[j, :n], vals[j, :n]
    return SampleResult(tokens, chosen, top_ids, top_lps)


def _penalise(x: np.ndarray, rows: Sequence[SamplingRow]) -> None:
    """Repetition / presence / frequency penalties, logit bias and suppressed tokens, in place."""
    rep_r, rep_c, out_r, out_c, bias_r, bias_c, bias_v, sup_r, sup_c = ([] for _ in range(9))
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            ids = np.concatenate([np.asarray(r.prompt_ids, np.int64), np.asarray(r.output_ids, np.int64)])
            rep_r.append(np.full(ids.size, i))
            rep_c.append(ids)
        if (p.presence_penalty or p.frequency_penalty) and len(r.output_ids):
            ids = np.asarray(r.output_ids, np.int64)
            out_r.append(np.full(ids.size, i))
            out_c.append(ids)
        for tok, bias in p.logit_bias:
            bias_r.append(np.array([i]))
            bias_c.append(np.array([tok]))
            bias_v.append(np.array([bias]))
        if len(r.suppress_ids):
            ids = np.asarray(r.suppress_ids, np.int64)
            sup_r.append(np.full(ids.size, i))
            sup_c.append(ids)
    cat = lambda parts: np.concatenate(parts) if parts else np.empty(0, np.int64)  # noqa: E731
    if rep_r:
        apply_repetition_penalty(x, cat(rep_r), cat(rep_c), np.array([r.params.repetition_penalty for r in rows]))
    if out_r:
        presence = np.array([r.params.presence_penalty for r in rows])
        frequency = np.array([r.params.frequency_penalty for r in rows])
        apply_presence_frequency(x, cat(out_r), cat(out_c), presence, frequency)
    if bias_r:
        apply_logit_bias(x, cat(bias_r), cat(bias_c), cat(bias_v))
    if sup_r:
        x[cat(sup_r), cat(sup_c)] = -np.inf
