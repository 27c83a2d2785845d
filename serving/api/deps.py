"""Small dependencies the routes share: the engine (ready or 503), settings, and prompt encoding.

Routes reach the engine only through `ready_engine`; nothing here runs a model.
"""

from __future__ import annotations

from fastapi import Request

from ..config import Settings
from ..engine import AsyncEngine
from ..errors import ValidationError


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


def ready_engine(request: Request) -> AsyncEngine:
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


def token_text(engine: AsyncEngine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id])
