"""Unit tests of the numpy sampler's pure functions and of `sample` (no model, no engine)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import sampler
from model.sampler import SamplingRow
from serving.sampling_params import SamplingParams
from serving.errors import ValidationError


def _row(params=None, prompt=(1,), output=(), seed=0, suppress=()):
    return SamplingRow(params or SamplingParams(), list(prompt), list(output), np.random.default_rng(seed), suppress)


def test_log_softmax_and_logsumexp():
    x = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
    lp = sampler.log_softmax(x)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, rtol=1e-5)
    ref = np.log(np.exp(x.astype(np.float64)).sum(1))
    np.testing.assert_allclose(sampler.logsumexp(x), ref, rtol=1e-6)


def test_repetition_penalty_divides_positive_multiplies_negative_and_ignores_repeats():
    x = np.array([[2.0, -2.0, 1.0, 0.5]], np.float32)
    rows = np.array([0, 0, 0, 0])
    cols = np.array([0, 1, 0, 0])  # token 0 seen three times: penalised once
    sampler.apply_repetition_penalty(x, rows, cols, np.array([2.0]))
    np.testing.assert_allclose(x, [[1.0, -4.0, 1.0, 0.5]])


def test_presence_and_frequency_penalties():
    x = np.zeros((2, 4), np.float32)
    rows = np.array([0, 0, 0, 1])
    cols = np.array([1, 1, 2, 3])
    sampler.apply_presence_frequency(x, rows, cols, presence=np.array([0.5, 1.0]), frequency=np.array([0.25, 0.0]))
    np.testing.assert_allclose(x, [[0, -1.0, -0.75, 0], [0, 0, 0, -1.0]])


def test_top_k_top_p_min_p_keep_sets():
    logp = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]] * 4, np.float64)).astype(np.float32)
    out = sampler.filter_top_k_top_p_min_p(
        logp,
        top_k=np.array([2, 0, 0, 0]),
        top_p=np.array([1.0, 0.7, 0.71, 1.0]),
        min_p=np.array([0.0, 0.0, 0.0, 0.29]),
    )
    kept = np.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False, False]  # top-2
    assert kept[1].tolist() == [True, True, False, False, False]  # 0.5 + 0.2 reaches 0.7
    assert kept[2].tolist() == [True, True, True, False, False]  # needs 0.15 more
    assert kept[3].tolist() == [True, True, True, False, False]  # p >= 0.3 * 0.5
    assert np.array_equal(out[kept], logp[kept])


def test_top_p_after_top_k_renormalises():
    probs = np.array([[0.4, 0.3, 0.2, 0.1]])
    out = sampler.filter_top_k_top_p_min_p(np.log(probs).astype(np.float32), np.array([2]), np.array([0.6]),
                                           np.array([0.0]))
    # Within the top-2, 0.4/0.7 = 0.57 < 0.6, so both stay.
    assert np.isfinite(out).tolist() == [[True, True, False, False]]


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 3000), st.floats(0.05, 0.999), st.integers(0, 50), st.integers(0, 2**32 - 1))
def test_nucleus_candidates_path_equals_full_sort(v, top_p, top_k, seed):
    """The candidate shortcut (argpartition) must keep exactly what a full sort keeps, over the whole vocab."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(2, v)) * rng.uniform(0.01, 5)).astype(np.float32)
    k = np.array([top_k, 0])
    p = np.array([top_p, top_p])
    got = np.isfinite(sampler.filter_top_k_top_p_min_p(x, k, p, np.zeros(2)))
    for r in range(2):
        order = np.argsort(-x[r], kind="stable")
        kk = int(k[r]) if k[r] > 0 else v
        s = x[r, order[:kk]].astype(np.float64)
        probs = np.exp(s - s.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        n = max(1, int((before < top_p).sum()))
        want = np.zeros(v, bool)
        want[order[:n]] = True
        assert got[r].tolist() == want.tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.sampled_from([7, 300, 4099, 50257]), st.integers(1, 1100), st.integers(0, 2**32 - 1))
def test_top_candidates_equal_a_full_sort(b, v, k, seed):
    """The interleaved-group shortcut must find exactly each row's k largest entries, best first."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(b, v)) * rng.uniform(0.01, 5)).astype(np.float32)
    x[rng.random((b, v)) < 0.05] = -np.inf  # suppressed tokens
    ids, vals = sampler.top_candidates(x, k)
    k = min(k, v)
    assert ids.shape == vals.shape == (b, k)
    want = -np.sort(-x, axis=1)[:, :k]
    np.testing.assert_array_equal(vals, want)
    np.testing.assert_array_equal(np.take_along_axis(x, ids, 1), vals)
    assert all(len(set(r)) == k for r in ids.tolist())


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([10, 257, 1000, 5000]), st.integers(0, 2**32 - 1))
def test_draw_equals_a_full_cumulative_sum(v, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(5, v)) * rng.uniform(0.1, 8)).astype(np.float32)
    x[rng.random((5, v)) < 0.3] = -np.inf
    x[:, 0] = 0.0  # at least one token per row
    u = rng.random(5)
    p = np.exp(x - x.max(1, keepdims=True))
    cdf = np.cumsum(p, axis=1, dtype=np.float64)
    want = [int(np.searchsorted(cdf[r], u[r] * cdf[r, -1], side="right")) for r in range(5)]
    got = sampler.draw(x, u)
    assert got.tolist() == want and np.isfinite(x[np.arange(5), got]).all()


def test_sample_with_filters_equals_filter_then_draw_over_the_vocabulary():
    """The candidate-only draw gives the token of a draw over the whole filtered vocabulary."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(8, 50257)) * 4).astype(np.float32)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in
              [(0.7, 50, 0.9, 0.0), (1.0, 0, 0.8, 0.0), (1.3, 5, 1.0, 0.0), (0.5, 0, 1.0, 0.1),
               (1.0, 2000, 0.95, 0.0), (0.9, 0, 0.999, 0.0), (1.0, 1, 1.0, 0.0), (2.0, 40, 0.5, 0.05)]]
    got = sampler.sample(x, [_row(p, seed=i) for i, p in enumerate(params)]).token_ids
    for i, p in enumerate(params):
        xs = x[i : i + 1] / np.float32(p.temperature)
        f = sampler.filter_top_k_top_p_min_p(xs, np.array([p.top_k]), np.array([p.top_p]), np.array([p.min_p]))
        want = sampler.draw(f, np.array([np.random.default_rng(i).random()]))[0]
        assert got[i] == want, i


def test_typical_matches_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 40)).astype(np.float32)
    mass = np.array([0.2, 0.5, 0.9])
    got = np.isfinite(sampler.filter_typical(x, mass))
    for r in range(3):
        logp = x[r] - np.log(np.exp(x[r].astype(np.float64)).sum())
        p = np.exp(logp)
        ent = -(p * logp).sum()
        order = np.argsort(np.abs(-logp - ent), kind="stable")
        cum = np.cumsum(p[order])
        n = max(1, int((cum - p[order] < mass[r]).sum()))
        want = np.zeros(40, bool)
        want[order[:n]] = True
        assert got[r].tolist() == want.tolist()


def test_draw_inverse_cdf():
    x = np.log(np.array([[0.25, 0.0, 0.75], [0.25, 0.0, 0.75]]) + 1e-30).astype(np.float32)
    x[:, 1] = -np.inf
    assert sampler.draw(x, np.array([0.0, 0.999])).tolist() == [0, 2]
    assert sampler.draw(x, np.array([0.2, 0.3])).tolist() == [0, 2]


def test_draw_frequencies_follow_probabilities():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    x = np.tile(np.log(probs).astype(np.float32), (20000, 1))
    counts = np.bincount(sampler.draw(x, np.random.default_rng(0).random(20000)), minlength=4) / 20000
    np.testing.assert_allclose(counts, probs, atol=0.015)


def test_top_n_sorted_with_ties_by_id():
    lp = np.array([[-1.0, -0.5, -0.5, -3.0]], np.float32)
    ids, vals = sampler.top_n(lp, 3)
    assert ids.tolist() == [[1, 2, 0]]
    assert vals.tolist() == [[-0.5, -0.5, -1.0]]


def test_greedy_is_argmax_and_reports_raw_logprob():
    x = np.array([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]], np.float32)
    res = sampler.sample(x, [_row(SamplingParams(temperature=0.0)), _row(SamplingParams(temperature=0.0, logprobs=2))])
    assert res.token_ids.tolist() == [1, 0]
    np.testing.assert_allclose(res.logprobs, sampler.log_softmax(x)[[0, 1], [1, 0]], rtol=1e-6)
    assert res.top_ids[0] is None and res.top_ids[1].tolist() == [0, 1]


def test_greedy_applies_penalties_bias_and_suppression():
    x = np.array([[3.0, 2.0, 1.0]], np.float32)
    rep = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sampler.sample(x, [_row(rep, prompt=[0])]).token_ids.tolist() == [1]
    bias = SamplingParams(temperature=0.0, logit_bias=((2, 10.0),))
    assert sampler.sample(x, [_row(bias)]).token_ids.tolist() == [2]
    assert sampler.sample(x, [_row(SamplingParams(temperature=0.0), suppress=[0])]).token_ids.tolist() == [1]


def test_seeded_rows_do_not_depend_on_the_batch():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 500)).astype(np.float32)
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)
    alone = sampler.sample(x[:1], [_row(p, seed=7)]).token_ids[0]
    others = [_row(SamplingParams(temperature=1.3, top_k=3), seed=i) for i in range(5)]
    batched = sampler.sample(x, [_row(p, seed=7)] + others).token_ids[0]
    assert alone == batched


def test_top_k_samples_stay_in_top_k():
    x = np.random.default_rng(0).normal(size=(1, 100)).astype(np.float32)
    top = set(np.argsort(-x[0])[:3].tolist())
    p = SamplingParams(temperature=1.0, top_k=3)
    for seed in range(50):
        assert int(sampler.sample(x, [_row(p, seed=seed)]).token_ids[0]) in top


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens"),
    ],
)
def test_sampling_params_validation_names_the_parameter(kwargs, param):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)
