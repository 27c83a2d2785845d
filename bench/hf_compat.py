"""Calling a transformers GPT-2 with a KV cache across transformers 4.x and 5.x (the reference side of the
benchmarks; torch only, never imported by the project's packages).

transformers 5.2x renamed the forward's `past_key_values=` to `cache=` (and the output field with it) and
warns on the old name; `forward` passes whichever this version takes.
"""

from __future__ import annotations

import inspect
from typing import Any


def _cache_name(model: Any) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(model: Any, input_ids: Any, cache: Any = None, **kw: Any) -> tuple[Any, Any]:
    """model(input_ids, <cache>=cache, use_cache=True, **kw) -> (logits, cache)."""
    name = getattr(model, "_bench_cache_name", None)
    if name is None:
        name = model._bench_cache_name = _cache_name(model)
    out = model(input_ids, use_cache=True, **{name: cache}, **kw)
    return out.logits, getattr(out, name)


def filled_cache(config: Any, batch: int, length: int, torch: Any) -> Any:
    """A DynamicCache holding `length` positions of random K/V per layer, as if a prompt had been prefilled."""
    from transformers import DynamicCache

    head_dim = config.n_embd // config.n_head
    try:
        cache = DynamicCache(config=config)
    except TypeError:  # transformers 4.x
        cache = DynamicCache()
    g = torch.Generator().manual_seed(0)
    for layer in range(config.n_layer):
        k = torch.randn(batch, config.n_head, length, head_dim, generator=g)
        v = torch.randn(batch, config.n_head, length, head_dim, generator=g)
        cache.update(k, v, layer)
    return cache
