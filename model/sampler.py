"""Vectorised next-token selection in numpy: penalties, temperature, top-k/top-p/min-p/typical, draws, logprobs.

Small pure functions over a (B, V) logits batch, each row with its own parameters, plus `sample`, which chains
them for one batch. Every operation is row-wise, so a row's result does not depend on the other rows; random
draws come from each request's own `numpy.random.Generator`, so a seeded request gives the same tokens whatever
else is in the batch. Numpy only: knows nothing of sequences, schedulers, MindSpore or the request parameters'
validation (a row's parameters are anything shaped like `RowParams`, such as serving's `SamplingParams`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Candidates examined before falling back to a full sort for nucleus / min-p rows (exact either way).
_CANDIDATES = 1024
# Tokens per block of the two-level cumulative sum in `draw`.
_DRAW_BLOCK = 256


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
    out = np.full_like(logits, -np.inf)
    for rows, idx, vals, keep in _kept_candidates(logits, top_k, top_p, min_p):
        sub = np.full((rows.size, logits.shape[1]), -np.inf, logits.dtype)
        np.put_along_axis(sub, idx, np.where(keep, vals, -np.inf).astype(logits.dtype), 1)
        out[rows] = sub
    return out


def top_candidates(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest entries, best first: (ids, values), both (B, k).

    An argpartition of the whole vocabulary costs as much as the rest of sampling (~12 ms for 16 rows), so the
    columns are first dealt into G interleaved groups (column j in group j % G): each of a row's k largest
    entries lies in one of the k groups with the largest maxima, and only those groups are searched.
    """
    b, v = x.shape
    k = min(k, v)
    size = next((n for n in (64, 32, 16, 8, 4) if 8 * k * n <= v), 0)  # 0: k is too large a part of v
    if size:
        groups = v // size
        gmax = np.max(x[:, : groups * size].reshape(b, size, groups), axis=1)  # (B, G): fast, contiguous maxima
        best = np.argpartition(gmax, groups - k, axis=1)[:, groups - k :]
        cand = (best[:, None, :] + (np.arange(size) * groups)[None, :, None]).reshape(b, size * k)
        if groups * size < v:  # the columns after the last whole group are always candidates
            tail = np.broadcast_to(np.arange(groups * size, v), (b, v - groups * size))
            cand = np.concatenate([cand, tail], axis=1)
        sel = np.argpartition(np.take_along_axis(x, cand, 1), cand.shape[1] - k, axis=1)[:, cand.shape[1] - k :]
        idx = np.take_along_axis(cand, sel, 1)
    elif k < v:
        idx = np.argpartition(x, v - k, axis=1)[:, v - k :]
    else:
        idx = np.broadcast_to(np.arange(v), (b, v))
    vals = np.take_along_axis(x, idx, 1)
    order = np.argsort(-vals, axis=1)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)


def _kept_candidates(
    x: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    min_p: np.ndarray,
    temperature: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Top-k / nucleus / min-p over rows of x / temperature, without touching the whole vocabulary more than once.

    Returns groups (rows, ids, values, keep): row indices into x, each row's candidate ids best first, their
    (temperature-scaled) logits and which ones the filters keep. Rows whose kept set may reach past the first
    candidates are redone over the whole vocabulary (a second group).
    """
    b, v = x.shape
    kk = np.where(top_k > 0, np.minimum(top_k, v), v)
    # Look at the best k candidates first; only rows whose kept set may reach past them are redone in full.
    k = int(kk[top_k > 0].max()) if np.any(top_k > 0) else 0
    if np.any((top_k == 0) & ((top_p < 1.0) | (min_p > 0.0))):
        k = max(k, _CANDIDATES)
    k = min(max(k, 1), v)
    idx, vals = top_candidates(x, k)
    # The order of a row does not change with a positive temperature: scale only the candidates, and the whole
    # row only where the nucleus is normalised over the whole vocabulary.
    t = None if temperature is None else np.asarray(temperature, x.dtype)[:, None]
    if t is not None:
        vals = vals / t
    full = kk >= v
    full_lse = np.zeros(b)
    if full.any():
        full_lse[full] = logsumexp(x[full] if t is None else x[full] / t[full])
    keep = _keep(vals, kk, top_p, min_p, full, full_lse)
    redo = keep[:, -1] & (kk > k)
    if not redo.any():
        return [(np.arange(b), idx, vals, keep)]
    ok, r = np.flatnonzero(~redo), np.flatnonzero(redo)
    ridx, rvals = top_candidates(x[r] if t is None else x[r] / t[r], v)
    rkeep = _keep(rvals, kk[r], top_p[r], min_p[r], full[r], full_lse[r])
    return [(ok, idx[ok], vals[ok], keep[ok]), (r, ridx, rvals, rkeep)]


def _keep(
    vals: np.ndarray, kk: np.ndarray, top_p: np.ndarray, min_p: np.ndarray, full: np.ndarray, full_lse: np.ndarray
) -> np.ndarray:
    """Which of each row's candidates (best first) top-k, the nucleus and min-p keep; the best always stays.
    full: rows normalised over the whole vocabulary (top-k off), whose logsumexp is full_lse."""
    k = vals.shape[1]
    keep = np.arange(k)[None, :] < kk[:, None]
    s = np.where(keep, vals, -np.inf).astype(np.float64)
    # Normalise over the top-k set, or over the whole vocabulary when top-k is off.
    lse = np.where(full, full_lse, _lse64(s))
    p = np.exp(s - lse[:, None])
    mass_before = np.cumsum(p, axis=1) - p
    keep &= mass_before < top_p[:, None]
    keep &= p >= min_p[:, None] * p[:, :1]
    keep[:, 0] = True
    return keep


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
    """Inverse-CDF draw per row from softmax(logits) with one uniform in [0, 1) per row (-inf = excluded).

    The cumulative mass runs in token-id order; a draw takes the first token whose cumulative mass exceeds
    u * total (never a zero-probability one). Two levels (block sums, then one block) instead of a float64
    cumulative sum over the whole vocabulary, which costs ~10 ms for 16 rows.
    """
    b, v = logits.shape
    p = np.exp(logits - np.max(logits, axis=1, keepdims=True))
    blocks = -(-v // _DRAW_BLOCK)
    if blocks * _DRAW_BLOCK != v:
        p = np.concatenate([p, np.zeros((b, blocks * _DRAW_BLOCK - v), p.dtype)], axis=1)
    p = p.reshape(b, blocks, _DRAW_BLOCK)
    sums = np.sum(p, axis=2, dtype=np.float64)
    block_cdf = np.cumsum(sums, axis=1)
    target = np.asarray(uniforms, np.float64) * block_cdf[:, -1]
    rows = np.arange(b)
    j = _first_above(block_cdf, target, sums > 0)
    within = p[rows, j]  # (B, block): the chosen block of each row
    cdf = np.where(j > 0, block_cdf[rows, j - 1], 0.0)[:, None] + np.cumsum(within, axis=1, dtype=np.float64)
    return j * _DRAW_BLOCK + _first_above(cdf, target, within > 0)


def _first_above(cdf: np.ndarray, target: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Per row, the first column whose cumulative value exceeds target (searchsorted side="right"), clamped to
    the last allowed (positive-mass) column for a target that rounding put at the very end."""
    i = np.sum(cdf <= target[:, None], axis=1)
    last = cdf.shape[1] - 1 - np.argmax(allowed[:, ::-1], axis=1)
    return np.minimum(i, last)


def _draw_kept(ids: np.ndarray, vals: np.ndarray, keep: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The token `draw` would give over the whole vocabulary with every token but the kept candidates at -inf,
    computed over the candidates only (the cumulative mass still runs in token-id order)."""
    order = np.argsort(ids, axis=1)
    ids = np.take_along_axis(ids, order, 1)
    x = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(vals, order, 1), -np.inf)
    p = np.exp(x - np.max(x, axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1, dtype=np.float64)
    i = _first_above(cdf, np.asarray(uniforms, np.float64) * cdf[:, -1], p > 0)
    return ids[np.arange(len(ids)), i]


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


class RowParams(Protocol):
    """The parameters `sample` reads of a row (validated by whoever builds them)."""

    @property
    def temperature(self) -> float: ...  # 0: greedy
    @property
    def top_k(self) -> int: ...  # 0 disables
    @property
    def top_p(self) -> float: ...
    @property
    def min_p(self) -> float: ...
    @property
    def typical_p(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def logit_bias(self) -> Sequence[tuple[int, float]]: ...
    @property
    def logprobs(self) -> int | None: ...  # alternatives to report; None: none
    @property
    def greedy(self) -> bool: ...
    @property
    def needs_penalties(self) -> bool: ...


@dataclass
class SamplingRow:
    """One row's inputs: its parameters, the tokens it has seen, its generator, and tokens to suppress."""

    params: RowParams
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
    x = logits
    if any(p.needs_penalties or p.logit_bias or len(r.suppress_ids) for p, r in zip(params, rows)):
        x = logits.copy()
        _penalise(x, rows)
    greedy = np.fromiter((p.greedy for p in params), bool, b)
    if greedy.all():
        tokens = np.argmax(x, axis=1)
    else:
        tokens = np.empty(b, np.int64)
        g = np.flatnonzero(greedy)
        if g.size:
            tokens[g] = np.argmax(x[g], axis=1)
        s = np.flatnonzero(~greedy)
        u = np.array([rows[i].rng.random() for i in s])
        tokens[s] = _draw_rows(x if s.size == b else x[s], [params[i] for i in s], u)
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


def _draw_rows(x: np.ndarray, params: Sequence[RowParams], u: np.ndarray) -> np.ndarray:
    """One draw per row of penalised logits x (n, V) from softmax(x / temperature) after the row's filters.

    Rows with top-k / top-p / min-p only (the common case) never build a filtered copy of the vocabulary: the
    draw runs over their kept candidates, which gives the token a full-vocabulary draw would."""
    n, v = x.shape
    pick = lambda name, dtype: np.fromiter((getattr(p, name) for p in params), dtype, n)  # noqa: E731
    temp = pick("temperature", np.float32)
    top_k = pick("top_k", np.int64)
    top_p, min_p, typical = (pick(name, np.float64) for name in ("top_p", "min_p", "typical_p"))
    nucleus = (top_k > 0) | (top_p < 1.0) | (min_p > 0.0)
    out = np.empty(n, np.int64)
    cand = np.flatnonzero(nucleus & (typical >= 1.0))
    if cand.size:
        sub = x if cand.size == n else x[cand]
        for rows, idx, vals, keep in _kept_candidates(sub, top_k[cand], top_p[cand], min_p[cand], temp[cand]):
            out[cand[rows]] = _draw_kept(idx, vals, keep, u[cand[rows]])
    rest = np.flatnonzero(~nucleus | (typical < 1.0))
    if rest.size:
        xs = x[rest] / temp[rest][:, None]
        f = np.flatnonzero(nucleus[rest])
        if f.size:
            r = rest[f]
            xs[f] = filter_top_k_top_p_min_p(xs[f], top_k[r], top_p[r], min_p[r])
        t = np.flatnonzero(typical[rest] < 1.0)
        if t.size:
            xs[t] = filter_typical(xs[t], typical[rest[t]])
        out[rest] = draw(xs, u[rest])
    return out


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
