"""Command line: `python -m serving --model DIR [--host --port --max-batch-size --max-queue ...]` (`gpt2-serve`).

Binds the socket first (so `--port 0` works and the real URL can be printed), then runs the server
(`serving/server.py`): on SIGTERM/SIGINT running requests get up to --shutdown-timeout seconds to finish and the
process exits 0; if the engine dies it exits 1.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Sequence

# Absolute imports: MindSpore's compile cache parses the entry script's top-level imports without a package.
from serving.config import Settings


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = Settings.from_sources(argv)
        if not settings.model:
            raise ValueError("no model directory: pass --model DIR or set GPT2_MODEL")
    except ValueError as e:
        print(f"gpt2-serve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from serving.api.access_log import configure_access_log
    from serving.api.app import create_app
    from serving.server import Server, guarded_protocol

    configure_access_log(settings.access_log)
    try:
        app = create_app(settings)
        sock = _bind(settings.host, settings.port)
    except (ValueError, OSError) as e:
        print(f"gpt2-serve: error: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    auth = ' -H "Authorization: Bearer $GPT2_API_KEY"' if settings.api_key else ""
    print(f"Serving {settings.model_name} on {url} (GET {url}/health answers 200 once the model is loaded)")
    print(
        f"Try: curl {url}/generate -H 'Content-Type: application/json'{auth} "
        """-d '{"inputs": "Hello, my name is", "parameters": {"max_new_tokens": 20}}'""",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        http=guarded_protocol(settings.header_timeout),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout,
        # The engine has drained by the time uvicorn shuts down: what is left is writing the last events.
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = Server(config, app.state.engine, drain_timeout=settings.shutdown_timeout)
    server.run(sockets=[sock])
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
