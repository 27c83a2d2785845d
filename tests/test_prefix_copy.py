"""InferenceSession.copy_prefix: a prompt continued from another slot's copied K/V gets the bits it would have got
computing every position itself (the exactness automatic prefix caching rests on)."""

import numpy as np
import pytest

from model.runtime import set_device
from model_helpers import SESSION_KW, hf_model, our_model_from_hf

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def session():
    from model import InferenceSession

    set_device("CPU")
    return InferenceSession(our_model_from_hf(hf_model(seed=5)), **SESSION_KW, cpu_kernels=True)


def _prefill(sess, ids, slot, start=0, chunk=32):
    out = []
    for a in range(start, len(ids), chunk):
        e = min(a + chunk, len(ids))
        out.append(sess.step_flat(np.asarray(ids[a:e], np.int32), np.arange(a, e, dtype=np.int32),
                                  np.full(e - a, slot, np.int32), None))
    return np.concatenate(out)


@pytest.mark.parametrize("n", [1, 16, 32, 47])
def test_copied_prefix_gives_the_same_logits_as_computing_it(session, n):
    rng = np.random.default_rng(n)
    shared = rng.integers(0, 1000, 60).tolist()
    other = shared[:n] + rng.integers(0, 1000, 20).tolist()  # same first n tokens, then its own
    full = _prefill(session, other, slot=2)  # every position computed in slot 2
    _prefill(session, shared, slot=0)  # the source: a different sequence sharing the first n tokens
    _prefill(session, rng.integers(0, 1000, 70).tolist(), slot=1)  # slot 1 holds something else first
    session.copy_prefix(0, 1, n)
    rest = _prefill(session, other, slot=1, start=n)
    np.testing.assert_array_equal(rest, full[n:])
    # and decode after it continues identically
    nxt = int(full[-1].argmax())
    a = session.step_flat(np.array([nxt], np.int32), np.array([len(other)], np.int32), np.array([1], np.int32), None)
    b = session.step_flat(np.array([nxt], np.int32), np.array([len(other)], np.int32), np.array([2], np.int32), None)
    np.testing.assert_array_equal(a, b)


def test_copy_prefix_refuses_bad_arguments(session):
    for args in [(-1, 0, 4), (0, 4, 4), (0, 1, -1), (0, 1, 129)]:
        with pytest.raises(ValueError):
            session.copy_prefix(*args)
