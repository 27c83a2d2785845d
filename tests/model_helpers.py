"""Shared pieces of the model and converter tests: a seeded random Hugging Face GPT-2 as the reference.

Everything is tiny (2 layers, n_embd 64, 4 heads, vocab 1000, 128 positions) so that compiling graphs stays
within seconds on a shared 2-core machine.
"""

from __future__ import annotations

import os

import numpy as np

TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
# Small session buckets: every padded shape is a compiled graph.
SESSION_KW = dict(num_slots=4, max_seq_len=128, batch_buckets=(1, 4), chunk_buckets=(1, 8, 32),
                  context_buckets=(64, 128))


def session_kernels_on() -> bool:
    """Whether an InferenceSession can run the CPU kernels here (not switched off by GPT2_CPU_KERNELS=0, and they
    build): tests of sessions with cpu_kernels=True skip otherwise."""
    from model import kernels

    return kernels.enabled_by_env() and kernels.library_path() is not None


def hf_model(seed: int = 0, **overrides):
    """A seeded random transformers.GPT2LMHeadModel in eval mode, with non-trivial biases and norms."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **overrides})).eval()
    # Fresh init leaves biases 0 and norms 1; randomise them so their conversion is tested too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def our_config(**overrides):
    from model import GPT2Config

    return GPT2Config(**{**TINY, **overrides})


def our_model_from_hf(hf):
    """Our model with the weights of `hf` (names are identical; buffers and the tied head are left out)."""
    from model import GPT2LMHeadModel
    from model.checkpoint import load_state_dict, parameter_shapes

    cfg = our_config()
    model = GPT2LMHeadModel(cfg)
    names = parameter_shapes(cfg)
    load_state_dict(model, {k: v.detach().numpy() for k, v in hf.state_dict().items() if k in names})
    model.set_train(False)
    return model


def hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    import torch

    # No end-of-sequence stop: compare exactly n greedy tokens.
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def save_hf_dir(hf, path: str, *, fmt: str = "bin", prefix: bool = True, buffers: bool = False,
                lm_head: bool = False) -> str:
    """A Hugging Face style directory: config.json + pytorch_model.bin or model.safetensors.

    prefix: keep the `transformer.` prefix; buffers: add the old `attn.bias`/`attn.masked_bias` buffers;
    lm_head: include the tied `lm_head.weight`.
    """
    import torch

    os.makedirs(path, exist_ok=True)
    hf.config.to_json_file(os.path.join(path, "config.json"))
    sd = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            if lm_head:
                sd[k] = v.clone()
            continue
        sd[k if prefix else k[len("transformer."):]] = v.clone()
    if buffers:
        n_pos = hf.config.n_positions
        for i in range(hf.config.n_layer):
            p = "transformer." if prefix else ""
            sd[f"{p}h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
            sd[f"{p}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if fmt == "bin":
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"),
                  metadata={"format": "pt"})
    return path


def prompts(seed: int = 0, lengths=(5, 17, 9)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, TINY["vocab_size"], n).tolist() for n in lengths]


def aot_call(lib, name: str, *arrays: np.ndarray) -> int:
    """Call a kernel library op (ctypes) as MindSpore calls an AOT Custom op: (nparam, params, ndims, shapes,
    dtypes, stream, extra) -> status; dtypes by MindSpore's names ("float32", "int8"), numpy's too."""
    import ctypes

    n = len(arrays)
    params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
    dims = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims])
    names = (ctypes.c_char_p * n)(*[str(a.dtype).encode() for a in arrays])
    return getattr(lib, name)(n, params, ndims, shapes, names, None, None)


def q8_reference(x: np.ndarray, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The Q8 ops' arithmetic before the bias, in numpy, bit for bit (cpu_kernels.c, "int8 weights: integer dot
    products"): each row of x (M, K) quantized on its own to int16 (QMAX: the largest with K * 128 * QMAX < 2^31,
    at most 32,767; sx = max|x| / QMAX, xq = rint(x * (QMAX / max|x|))), exact integer sums against q (N, K), then
    (((float32)sum * sx) * ex) * s, all in float32 (ex is 1 but for rows below 2^-60). A row with a NaN or an
    infinity gives NaN."""
    x = np.asarray(x, np.float32)
    k = x.shape[1]
    qmax = np.float32(min(32767, (2**31 - 1) // (128 * k)))
    bad = ~np.isfinite(x).all(axis=1)
    x = np.where(bad[:, None], np.float32(0), x)
    # rows whose largest value is below 2^-60 are taken times 2^100 first (exact) and their sums times 2^-100
    tiny = np.abs(x).max(axis=1) < np.float32(2.0**-60)
    up = np.where(tiny, np.float32(2.0**100), np.float32(1))
    ex = np.where(tiny, np.float32(2.0**-100), np.float32(1))
    x = x * up[:, None]
    amax = np.abs(x).max(axis=1)
    inv = np.where(amax > 0, qmax / np.where(amax > 0, amax, np.float32(1)), np.float32(0)).astype(np.float32)
    xq = np.rint(x * inv[:, None]).astype(np.int64)
    sx = np.where(bad, np.float32(np.nan), amax / qmax).astype(np.float32)
    sums = xq @ np.asarray(q, np.int64).T
    return ((sums.astype(np.float32) * sx[:, None]) * ex[:, None]) * np.asarray(s, np.float32)[None, :]
