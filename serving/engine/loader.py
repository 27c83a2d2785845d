"""Loading a model directory into engine parts (tokenizer + model runner), with optional shape warm-up.

Runs on the engine thread, so /health can answer 503 "Loading model" meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..config import EngineConfig, Settings
from .engine import EngineParts
from .model_runner import ModelRunner, load_session, warmup

log = logging.getLogger("serving.engine")


def chunk_buckets(config: EngineConfig) -> tuple[int, ...]:
    """Token counts per row a step is padded to: 1 (decode), then a few prefill chunk sizes."""
    return config.chunk_buckets


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
            chunk_buckets=chunk_buckets(config),
            device_target=settings.device_target,
            compute_dtype=settings.compute_dtype,
            compile_cache_dir=settings.compile_cache,
        )
        fixed = config.decode_batching == "fixed"
        # Packed prefill runs flat (no padding between prompts) where the attention kernel allows it.
        flat = config.packed_prefill and session.cpu_kernels
        runner = ModelRunner(
            session,
            num_slots=config.max_batch_size,
            eos_token_id=tok.eos_token_id,
            decode_batch=config.max_batch_size if fixed else None,
            flat_prefill=flat,
        )
        log.info("model loaded in %.1f s", time.monotonic() - t0)
        if settings.warmup:
            t0 = time.monotonic()
            n = warmup(
                session,
                decode_batches=(config.max_batch_size,) if fixed else config.batch_buckets,
                max_prefill_tokens=config.max_prefill_tokens if config.packed_prefill else None,
                flat_prefill=flat,
            )
            log.info("compiled %d step shapes in %.1f s", n, time.monotonic() - t0)
        return EngineParts(runner, tok)

    return load
