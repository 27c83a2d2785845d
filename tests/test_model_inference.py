"""InferenceSession: prefill/decode through the KV cache against full forwards of the reference model."""

import numpy as np
import pytest

from model.runtime import set_device
from model.inference import generate
from model_helpers import SESSION_KW, TINY, hf_greedy, hf_logits, hf_model, our_model_from_hf, prompts, session_kernels_on

pytest.importorskip("torch")
TOL = 1e-4


@pytest.fixture(scope="module", params=[True, False], ids=["cpu-kernels", "mindspore-ops"])
def model_env(request):
    # Every test runs on both step paths: model.kernels' CPU kernels and MindSpore's own ops.
    from model import InferenceSession

    if request.param and not session_kernels_on():
        pytest.skip("the CPU kernels are switched off (GPT2_CPU_KERNELS=0) or do not build here")
    set_device("CPU")
    hf = hf_model()
    ours = our_model_from_hf(hf)
    return hf, ours, InferenceSession(ours, **SESSION_KW, cpu_kernels=request.param)


def test_greedy_generation_matches_transformers(model_env):
    hf, _, sess = model_env
    ps = prompts(lengths=(5, 40, 9))
    # Rows of different lengths; the 40-token prompt needs two prefill chunks (largest chunk bucket: 32).
    got = sess.generate(ps, 32)
    for p, g in zip(ps, got):
        assert g == hf_greedy(hf, p, 32)
    assert sess.generate(ps[0], 32) == got[0]  # a single prompt, alone in the batch


def test_model_generate_helper(model_env):
    hf, ours, _ = model_env
    p = prompts(seed=5, lengths=(12,))[0]
    assert generate(ours, p, 8) == hf_greedy(hf, p, 8)


def test_decode_logits_equal_full_forward_at_every_step(model_env):
    hf, _, sess = model_env
    seq = prompts(seed=1, lengths=(40,))[0]
    ref = hf_logits(hf, [seq])[0]  # (40, V)
    # Prefill 6 tokens in one chunk, then decode one at a time.
    out = sess.step(np.array([seq[:6]]), np.arange(6)[None], np.array([2]), np.array([5]))
    assert np.abs(out[0] - ref[5]).max() < TOL
    for p in range(6, 40):
        out = sess.step(np.array([[seq[p]]]), np.array([[p]]), np.array([2]), np.array([0]))
        assert np.abs(out[0] - ref[p]).max() < TOL, p


def test_chunked_prefill_attends_to_the_cached_prefix(model_env):
    hf, _, sess = model_env
    seq = prompts(seed=2, lengths=(45,))[0]
    ref = hf_logits(hf, [seq])[0]
    for start in range(0, 45, 8):
        chunk = seq[start:start + 8]
        out = sess.step(np.array([chunk]), np.arange(start, start + len(chunk))[None], np.array([1]), None)
        assert out.shape == (1, len(chunk), TINY["vocab_size"])
        assert np.abs(out[0] - ref[start:start + len(chunk)]).max() < TOL, start


def test_rows_of_different_lengths_and_phases_share_a_step(model_env):
    hf, _, sess = model_env
    a, b, c = prompts(seed=3, lengths=(30, 12, 20))
    ref = {n: hf_logits(hf, [s])[0] for n, s in (("a", a), ("b", b), ("c", c))}
    # Slot 0 prefills a first, then a's decode shares steps with b's and c's chunked prefills.
    sess.step(np.array([a[:29]]), np.arange(29)[None], np.array([0]), np.array([28]))
    ids = np.zeros((3, 8), np.int64)
    pos = np.full((3, 8), -1)
    ids[0, 0], pos[0, 0] = a[29], 29  # decode row, padded to the chunk
    ids[1], pos[1] = b[:8], np.arange(8)  # first chunk of b
    ids[2, :5], pos[2, :5] = c[:5], np.arange(5)  # first chunk of c, shorter
    out = sess.step(ids, pos, np.array([0, 3, 1]), np.array([0, 7, 4]))
    assert np.abs(out[0] - ref["a"][29]).max() < TOL
    assert np.abs(out[1] - ref["b"][7]).max() < TOL
    assert np.abs(out[2] - ref["c"][4]).max() < TOL
    # Every position of every row at once (scoring).
    ids2 = np.zeros((2, 4), np.int64)
    pos2 = np.full((2, 4), -1)
    ids2[0], pos2[0] = b[8:12], np.arange(8, 12)
    ids2[1, :3], pos2[1, :3] = c[5:8], np.arange(5, 8)
    out = sess.step(ids2, pos2, np.array([3, 1]), None)
    assert np.abs(out[0] - ref["b"][8:12]).max() < TOL
    assert np.abs(out[1, :3] - ref["c"][5:8]).max() < TOL


def test_flat_step_runs_several_sequences_in_one_pass(model_env):
    hf, _, sess = model_env
    a, b, c = prompts(seed=9, lengths=(12, 7, 13))
    ref = {n: hf_logits(hf, [s])[0] for n, s in (("a", a), ("b", b), ("c", c))}
    sess.step(np.array([a[:5]]), np.arange(5)[None], np.array([2]), np.array([4]))  # a's first chunk, earlier
    # a's second chunk, all of b, c's first 9 tokens: 24 tokens one after the other (CPU kernels: one (1, 32) row).
    ids = np.concatenate([a[5:], b, c[:9]])
    pos = np.concatenate([np.arange(5, 12), np.arange(7), np.arange(9)])
    slots = np.repeat([2, 0, 3], [7, 7, 9])
    out = sess.step_flat(ids, pos, slots, np.array([6, 13, 22]))
    assert out.shape == (3, TINY["vocab_size"])
    for got, want in zip(out, (ref["a"][11], ref["b"][6], ref["c"][8])):
        assert np.abs(got - want).max() < TOL
    # Every token's logits, and the caches left for decode.
    every = sess.step_flat(c[9:], np.arange(9, 13), np.full(4, 3), None)
    assert np.abs(every - ref["c"][9:13]).max() < TOL
    nxt = sess.step(np.array([[b[-1]]]), np.array([[7]]), np.array([0]), np.array([0]))
    assert np.abs(nxt[0] - hf_logits(hf, [list(b) + [b[-1]]])[0][7]).max() < TOL
    with pytest.raises(ValueError, match="logits_index"):
        sess.step_flat(ids, pos, slots, np.array([24]))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        sess.step_flat(ids, np.where(pos == 0, -1, pos), slots, None)


def test_a_reused_slot_does_not_see_its_previous_sequence(model_env):
    hf, _, sess = model_env
    long, short = prompts(seed=4, lengths=(50, 10))
    sess.step(np.array([long[:32]]), np.arange(32)[None], np.array([3]), np.array([31]))
    out = sess.step(np.array([short]), np.arange(10)[None], np.array([3]), None)
    assert np.abs(out[0] - hf_logits(hf, [short])[0]).max() < TOL


def test_a_rows_logits_do_not_depend_on_the_other_rows(model_env):
    _, _, sess = model_env
    x, y, z = prompts(seed=6, lengths=(20, 20, 20))
    slots = np.array([0, 1, 2])
    for s, p in zip(slots, (x, y, z)):
        sess.step(np.array([p[:19]]), np.arange(19)[None], np.array([s]), np.array([18]))
    # Both steps run at batch bucket 4: x with padding rows, then x next to y and z.
    alone = _step_padded_to(sess, 4, np.array([[x[19]]]), np.array([[19]]), np.array([0]))
    together = sess.step(np.array([[x[19]], [y[19]], [z[19]]]), np.array([[19], [19], [19]]), slots,
                         np.zeros(3, np.int32))
    np.testing.assert_array_equal(alone[0], together[0])


def _step_padded_to(sess, batch, ids, pos, slots):
    """Run `ids` plus all-padding rows (position -1, on unused slots) so the step runs at that batch bucket."""
    n = len(ids)
    free = [s for s in range(sess.num_slots) if s not in set(slots.tolist())][: batch - n]
    ids = np.concatenate([ids, np.zeros((batch - n, ids.shape[1]), ids.dtype)])
    pos = np.concatenate([pos, np.full((batch - n, pos.shape[1]), -1)])
    return sess.step(ids, pos, np.concatenate([slots, free]), np.zeros(batch, np.int32))


def test_context_bucket_does_not_change_a_rows_logits(model_env):
    _, _, sess = model_env
    x, y = prompts(seed=7, lengths=(30, 100))
    sess.step(np.array([x[:29]]), np.arange(29)[None], np.array([0]), np.array([28]))
    sess.step(np.array([y[:32]]), np.arange(32)[None], np.array([1]), np.array([31]))
    sess.step(np.array([y[32:64]]), np.arange(32, 64)[None], np.array([1]), np.array([31]))
    sess.step(np.array([y[64:96]]), np.arange(64, 96)[None], np.array([1]), np.array([31]))
    # x alone: context bucket 64; next to y at position 96: bucket 128. Same batch bucket (4) for both.
    a = _step_padded_to(sess, 4, np.array([[x[29]]]), np.array([[29]]), np.array([0]))
    b = _step_padded_to(sess, 4, np.array([[x[29]], [y[96]]]), np.array([[29], [96]]), np.array([0, 1]))
    if sess.cpu_kernels:
        # The attention kernel reads each row's own length: context is not a compiled dimension at all.
        assert sess.padded_shape(4, 1, 29) == sess.padded_shape(4, 1, 96)
    else:
        assert sess.padded_shape(4, 1, 29)[2] != sess.padded_shape(4, 1, 96)[2]
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(token_ids=np.zeros((2,), np.int32)), "token_ids"),
    (dict(positions=np.zeros((1, 3), np.int32)), "positions shape"),
    (dict(slot_ids=np.array([4])), "slot_ids must be in"),
    (dict(positions=np.array([[128, -1]])), "positions must be"),
    (dict(token_ids=np.array([[1000, 0]])), "token_ids must be in"),
    (dict(logits_index=np.array([2])), "logits_index"),
    (dict(token_ids=np.zeros((1, 33), np.int32), positions=np.arange(33)[None]), "chunk length 33"),
])
def test_bad_step_arguments_are_value_errors(model_env, kwargs, match):
    _, _, sess = model_env
    args = dict(token_ids=np.array([[1, 2]]), positions=np.array([[0, 1]]), slot_ids=np.array([0]),
                logits_index=np.array([1]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sess.step(**args)


def test_duplicate_slots_in_a_step_are_rejected(model_env):
    _, _, sess = model_env
    with pytest.raises(ValueError, match="distinct"):
        sess.step(np.array([[1], [2]]), np.array([[0], [0]]), np.array([1, 1]), np.array([0, 0]))


def test_the_step_never_drops_out_even_in_train_mode(model_env):
    from model import GPT2LMHeadModel, InferenceSession
    from model.checkpoint import load_state_dict, state_dict
    from model_helpers import our_config

    hf, ours, _ = model_env
    m = GPT2LMHeadModel(our_config(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5))
    load_state_dict(m, state_dict(ours))
    m.set_train(True)  # e.g. a generation check in the middle of training
    seq = prompts(seed=8, lengths=(12,))[0]
    out = InferenceSession(m, **SESSION_KW).step(np.array([seq]), np.arange(12)[None], np.array([0]), None)
    assert np.abs(out[0] - hf_logits(hf, [seq])[0]).max() < TOL
    assert m.training  # the session leaves the caller's mode alone
