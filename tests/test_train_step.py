"""The compiled update (AdamW, clipping, accumulation) against torch.optim.AdamW, and the LR schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tools.training.schedule import learning_rate


def test_schedule_warmup_then_cosine_to_floor():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    lrs = [learning_rate(s, **kw) for s in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.55)  # half way through the cosine
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[14] == lrs[15] == 0.1


def test_no_decay_names():
    from tools.training.step import no_decay

    assert no_decay("transformer.h.0.attn.c_attn.bias")
    assert no_decay("transformer.h.3.ln_1.weight")
    assert no_decay("transformer.ln_f.weight")
    assert no_decay("transformer.wpe.weight")
    assert not no_decay("transformer.wte.weight")
    assert not no_decay("transformer.h.0.mlp.c_fc.weight")


def _nets(seed: int = 0):
    """The same two-parameter regression model in MindSpore and torch; training mode returns the loss."""
    import mindspore as ms
    import torch
    from mindspore import Parameter, nn, ops

    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    b0 = rng.normal(size=(3,)).astype(np.float32)

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.weight = Parameter(ms.Tensor(w0), name="layer.weight")
            self.bias = Parameter(ms.Tensor(b0), name="layer.bias")

        def construct(self, x):
            y = ops.matmul(x[:, :5], self.weight) + self.bias
            return ops.mean(ops.square(y - x[:, 5:]))

    tw = torch.nn.Parameter(torch.tensor(w0))
    tb = torch.nn.Parameter(torch.tensor(b0))

    def torch_loss(x):
        return ((x[:, :5] @ tw + tb - x[:, 5:]) ** 2).mean()

    return Net(), (tw, tb), torch_loss


@pytest.mark.parametrize("accum", [1, 2])
def test_update_matches_torch_adamw(accum):
    import mindspore as ms
    import torch

    from tools.training.step import AdamW, TrainStep
    from model.runtime import set_device

    set_device("CPU")
    net, (tw, tb), torch_loss = _nets()
    opt = AdamW(net.trainable_params(), weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    step = TrainStep(net, opt, accum_steps=accum, grad_clip=0.5)
    topt = torch.optim.AdamW(
        [{"params": [tw], "weight_decay": 0.1}, {"params": [tb], "weight_decay": 0.0}], lr=1.0, betas=(0.9, 0.95), eps=1e-8
    )
    data = np.random.default_rng(1).normal(size=(4, accum, 6, 8)).astype(np.float32)
    for i, lr in enumerate([0.05, 0.1, 0.02, 0.07]):
        for m in range(accum - 1):
            step.micro(ms.Tensor(data[i, m]))
        loss, norm, applied = step.last(ms.Tensor(data[i, accum - 1]), lr)
        # torch: mean of the micro-batch losses, clipped to global norm 0.5.
        for g in topt.param_groups:
            g["lr"] = lr
        topt.zero_grad()
        total = sum(torch_loss(torch.tensor(data[i, m])) for m in range(accum)) / accum
        total.backward()
        tnorm = torch.nn.utils.clip_grad_norm_([tw, tb], 0.5)
        topt.step()
        assert bool(applied.asnumpy())
        assert float(norm.asnumpy()) == pytest.approx(float(tnorm), rel=1e-5)
        np.testing.assert_allclose(net.weight.asnumpy(), tw.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(net.bias.asnumpy(), tb.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert float(opt.step.asnumpy()) == 4
    assert math.isfinite(float(loss.asnumpy()))
