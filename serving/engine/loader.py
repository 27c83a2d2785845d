"""Loading a model directory into engine parts (tokenizer + model runner), with optional shape warm-up.

Runs on the engine thread, so /health can answer 503 "Loading model" meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from model import packed_cache
from model.checkpoint import wait_packed

from ..config import EngineConfig, Settings
from .engine import EngineParts
from .model_runner import ModelRunner, load_session, warmup

log = logging.getLogger("serving.engine")


def model_dir_loader(settings: Settings, config: EngineConfig) -> Callable[[], EngineParts]:
    def load() -> EngineParts:
        from tokenizer import GPT2Tokenizer

        t0 = time.monotonic()
        tok = GPT2Tokenizer.from_pretrained(settings.model)
        session = load_session(
            settings.model,
            num_slots=config.max_batch_size,
            max_seq_len=config.max_total_tokens,
            batch_buckets=config.batch_buckets,
            chunk_buckets=config.chunk_buckets,
            device_target=settings.device_target,
            compute_dtype=settings.compute_dtype,
            compile_cache_dir=settings.compile_cache_dir,
            quantize=config.quantize,
            # the projections are packed on a background thread while the step graphs compile (warm-up steps
            # compute from half-written weights and their outputs are dropped); nothing is served before the wait
            defer_packing=True,
        )
        runner = ModelRunner(session, eos_token_id=tok.eos_token_id)
        log.info("model built in %.1f s", time.monotonic() - t0)
        if settings.warmup:
            t1 = time.monotonic()
            n = warmup(session)
            log.info("compiled %d step shapes in %.1f s", n, time.monotonic() - t1)
        t1 = time.monotonic()
        wait_packed(session.model)
        log.info("model loaded in %.1f s (%.1f s waiting for its weights to be packed)", time.monotonic() - t0,
                 time.monotonic() - t1)
        # the packed weights for the next start (model/packed_cache.py), written in the background between
        # requests once the server serves
        return EngineParts(runner, tok, background=lambda idle: packed_cache.write_pending(session.model, idle))

    return load
