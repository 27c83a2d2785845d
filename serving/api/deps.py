"""Small dependencies the routes share: the engine (ready or 503), settings, and prompt encoding.

Routes reach the engine only through `ready_engine`; nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import anyio
from fastapi import Request

from ..config import Settings
from ..engine import AsyncEngine
from ..errors import ValidationError


T = TypeVar("T")

# CPU-heavy request work (tokenizing, rendering chat templates, building big response bodies) runs in at most two
# threads: on anyio's shared pool, 40 large bodies at once would take every thread (FastAPI also runs plain `def`
# dependencies there) and most of the GIL from the engine thread.
_HEAVY = anyio.CapacityLimiter(2)


async def off_loop(fn: Callable[[], T]) -> T:
    """Run CPU-heavy request work in a worker thread (at most two at a time), never on the event loop."""
    return await anyio.to_thread.run_sync(fn, limiter=_HEAVY)


# The dependencies are `async def`: FastAPI would run plain `def` ones in the thread pool, so /health could wait
# behind long tokenizations for a free thread.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


async def ready_engine(request: Request) -> AsyncEngine:
    """The engine, or EngineUnavailableError (503) while loading, shutting down or dead."""
    engine: AsyncEngine = request.app.state.engine
    engine._check_ready()
    return engine


def encode(engine: AsyncEngine, text: str, *, param: str) -> list[int]:
    """Text -> token ids. Special-token text such as <|endoftext|> is read as the special token (as Hugging Face
    tokenizers do), so documents can be separated the way GPT-2 was trained."""
    try:
        return list(engine.tokenizer.encode(text, allowed_special="all"))
    except ValueError as e:
        raise ValidationError(f"`{param}` could not be tokenized: {e}", param=param) from None


async def encode_texts(
    engine: AsyncEngine, texts: Sequence[tuple[str, str]], *, max_tokens: int | None = None
) -> list[list[int]]:
    """(param, text) pairs -> token ids, tokenized in a worker thread: a long text takes a while (BPE is
    O(n log n) per word, and a 2 MB body is a lot of words), and the event loop serves /health and every other
    client meanwhile. With `max_tokens`, a text too long to fit in any case is refused before tokenizing."""
    per_token = getattr(engine.tokenizer, "max_token_bytes", None)
    if max_tokens is not None and per_token:
        for param, text in texts:
            # No token covers more than `per_token` bytes, hence more than `per_token` characters.
            if len(text) > max_tokens * per_token:
                raise ValidationError(
                    f"`{param}` is {len(text)} characters long: more than the {max_tokens} tokens allowed",
                    param=param)
    return await off_loop(lambda: [encode(engine, text, param=param) for param, text in texts])


def token_text(engine: AsyncEngine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id])
