"""The Cells against a seeded random Hugging Face GPT-2: names, logits, training loss and gradients."""

import numpy as np
import pytest

from model.runtime import set_device
from model_helpers import TINY, hf_logits, hf_model, our_config, our_model_from_hf

torch = pytest.importorskip("torch")
ms = pytest.importorskip("mindspore")


@pytest.fixture(scope="module")
def model_pair():
    set_device("CPU")
    hf = hf_model()
    return hf, our_model_from_hf(hf)


def test_parameter_names_are_hugging_face_state_dict_keys(model_pair):
    from model.checkpoint import parameter_shapes, state_dict
    from model.gpt2 import is_transposed_weight

    hf, ours = model_pair
    hf_keys = {k: tuple(v.shape) for k, v in hf.state_dict().items()
               if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))}
    ours_keys = {k: tuple(v.shape) for k, v in state_dict(ours).items()}
    assert ours_keys == hf_keys == parameter_shapes(our_config())
    # Internally the Conv1D weights are [out, in]; state dicts and files keep the Hugging Face [in, out].
    stored = {p.name: tuple(p.shape) for p in ours.get_parameters()}
    assert stored == {k: v[::-1] if is_transposed_weight(k) else v for k, v in hf_keys.items()}
    assert sum(map(is_transposed_weight, stored)) == 4 * our_config().n_layer


def test_eval_logits_match_transformers_on_a_padded_batch(model_pair):
    hf, ours = model_pair
    rng = np.random.default_rng(1)
    lengths = [7, 23, 15]
    ids = np.zeros((3, 23), np.int32)
    mask = np.zeros((3, 23), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(0, TINY["vocab_size"], n)
        mask[i, :n] = 1
    ours.set_train(False)
    got = ours(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    assert got.shape == (3, 23, TINY["vocab_size"]) and got.dtype == np.float32
    for i, n in enumerate(lengths):
        ref = hf_logits(hf, ids[i:i + 1, :n])[0]
        assert np.abs(got[i, :n] - ref).max() < 1e-4


def test_training_loss_equals_torch_cross_entropy(model_pair):
    hf, ours = model_pair
    ids = np.random.default_rng(2).integers(0, TINY["vocab_size"], (2, 17)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0  # right padding: labels at 11.. are excluded
    ours.set_train(True)
    try:
        loss = float(ours(ms.Tensor(ids)).asnumpy())
        masked = float(ours(ms.Tensor(ids), ms.Tensor(mask)).asnumpy())
    finally:
        ours.set_train(False)
    t = torch.as_tensor(ids, dtype=torch.long)
    with torch.no_grad():
        ref = hf(t, labels=t).loss.item()
        logits = hf(t).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1),
                                               reduction="none").reshape(2, 16)
        w = torch.as_tensor(mask[:, 1:], dtype=torch.float32)
        ref_masked = ((ce * w).sum() / w.sum()).item()
    assert abs(loss - ref) < 1e-5
    assert abs(masked - ref_masked) < 1e-5


def test_training_forward_is_differentiable_in_graph_mode(model_pair):
    hf, ours = model_pair
    ids = np.random.default_rng(3).integers(0, TINY["vocab_size"], (2, 9)).astype(np.int32)
    params = ms.ParameterTuple(ours.trainable_params())
    grad_fn = ms.value_and_grad(ours, None, params)

    @ms.jit
    def step(x):
        return grad_fn(x)

    from model.gpt2 import is_transposed_weight

    ours.set_train(True)
    try:
        loss, grads = step(ms.Tensor(ids))
    finally:
        ours.set_train(False)
    t = torch.as_tensor(ids, dtype=torch.long)
    hf.zero_grad()
    ref = hf(t, labels=t).loss
    ref.backward()
    hf_grads = dict(hf.named_parameters())
    assert abs(float(loss.asnumpy()) - ref.item()) < 1e-5
    for p, g in zip(params, grads):
        # wte gets gradient from the embedding and the tied head in both frameworks.
        # Conv1D weights are stored [out, in] here, [in, out] in Hugging Face.
        ref_g = hf_grads[p.name].grad.numpy()
        if is_transposed_weight(p.name):
            ref_g = ref_g.T
        assert np.abs(g.asnumpy() - ref_g).max() < 1e-5, p.name
    hf.zero_grad()


def test_compute_dtype_is_a_constructor_setting():
    from model import GPT2LMHeadModel

    with pytest.raises(ValueError, match="float32"):
        GPT2LMHeadModel(our_config(), compute_dtype="int8")
    m = GPT2LMHeadModel(our_config(), compute_dtype="float16")
    assert m.compute_dtype == ms.float16
    # Parameters stay float32 (master weights); only the matmuls run in the compute dtype.
    assert all(p.dtype == ms.float32 for p in m.get_parameters())


def test_float16_compute_stays_close_to_the_reference(model_pair):
    """The Ascend/GPU setting, exercised on CPU: matmuls in float16, norms, softmax and logits in float32."""
    from model import GPT2LMHeadModel, InferenceSession
    from model.checkpoint import load_state_dict, state_dict
    from model_helpers import SESSION_KW, prompts

    hf, ours = model_pair
    m16 = GPT2LMHeadModel(ours.config, compute_dtype="float16")
    load_state_dict(m16, state_dict(ours))
    m16.set_train(False)
    ids = np.array(prompts(seed=9, lengths=(20,)))
    ref = hf_logits(hf, ids)
    full = m16(ms.Tensor(ids.astype(np.int32))).asnumpy()
    stepped = InferenceSession(m16, **SESSION_KW).step(ids, np.arange(20)[None], np.array([0]), None)
    assert full.dtype == stepped.dtype == np.float32
    assert np.abs(full - ref).max() < 1e-2 and np.abs(stepped - ref).max() < 1e-2
