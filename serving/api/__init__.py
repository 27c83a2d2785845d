"""The HTTP layer: `create_app(settings)` with TGI, OpenAI and utility routes over the async engine."""

from .app import create_app

__all__ = ["create_app"]
