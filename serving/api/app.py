"""`create_app(settings)`: the FastAPI application, its lifespan (engine start and graceful stop) and routers.

Everything the routes need hangs off `app.state`: settings, engine, metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from ..config import EngineConfig, ModelInfo, Settings
from ..engine import AsyncEngine, EngineParts
from ..errors import ServingError
from . import chat, common, openai, tgi, ui
from .access_log import AccessLogMiddleware
from .errors import install_handlers
from .metrics import Metrics
from .middleware import GuardMiddleware
from .openapi import install_openapi
from .responses import JSONResponse


def create_app(
    settings: Settings,
    *,
    loader: Callable[[], EngineParts] | None = None,
    model_info: ModelInfo | None = None,
) -> FastAPI:
    """Build the app. `loader` and `model_info` replace the model directory (tests pass a fake model)."""
    if model_info is None:
        if not settings.model:
            raise ValueError("no model: pass --model DIR (or set GPT2_MODEL)")
        model_info = ModelInfo.from_dir(settings.model)
    config = EngineConfig.from_settings(settings, model_info)
    if loader is None:
        from ..engine.loader import model_dir_loader

        loader = model_dir_loader(settings, config)
    metrics = Metrics(max_batch_size=config.max_batch_size)
    engine = AsyncEngine(loader, config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown(settings.shutdown_timeout)

    app = FastAPI(
        title="GPT-2 text generation server",
        version=__version__,
        description="Continuous-batching GPT-2 on MindSpore with TGI- and OpenAI-compatible APIs.",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics

    def count_error(exc: ServingError) -> None:
        # Refusals before the engine: the engine counts its own (overloaded, unavailable, queue_timeout, error).
        if exc.error_type in ("validation", "authentication", "payload_too_large", "not_found", "request_timeout"):
            metrics.on_rejected(exc.error_type)

    install_handlers(app, on_error=count_error)
    app.include_router(common.router)
    app.include_router(tgi.router)
    app.include_router(openai.router)
    app.include_router(chat.chat_router(settings))
    if settings.ui:
        app.include_router(ui.router)
    install_openapi(app, settings, config, model_info)
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       body_timeout=settings.body_timeout, on_reject=count_error)
    # Added last, so outermost: the guard's 401/408/413 answers carry the request id and are logged too.
    app.add_middleware(AccessLogMiddleware, enabled=settings.access_log != "off")
    return app
