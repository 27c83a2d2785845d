"""The web playground: `GET /` serves one page (serving/ui/: plain HTML, CSS and JavaScript, no build step) that
talks to this server's own routes (`/info`, `/generate_stream`, `/score`) from the browser.

Everything the page loads comes from here, so it works on a machine without internet, and a strict
Content-Security-Policy keeps it that way (no CDN, no inline script, no other origin). The page itself needs no API
key (middleware.OPEN_PATHS); it asks for one when `data-auth` says the server wants it. Knows files and headers,
nothing of the engine.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ..config import Settings
from .deps import get_settings

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

# The page's own files, by URL path: (file in UI_DIR, media type). middleware.OPEN_PATHS lists the same paths.
ASSETS = {
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
    "/ui/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

# Only this origin, for everything; no inline script or style markup (the page sets styles through the CSSOM).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files: always revalidated, so a restarted server never leaves a stale page.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@cache
def _read(name: str) -> bytes:
    return (UI_DIR / name).read_bytes()


@router.api_route("/", methods=["GET", "HEAD"])
async def page(s: Settings = Depends(get_settings)) -> Response:
    # The page learns here whether to ask for a key before its first API call (rather than from a 401).
    auth = b"bearer" if s.api_key else b"none"
    body = _read("index.html").replace(b'data-auth="none"', b'data-auth="' + auth + b'"', 1)
    return Response(body, media_type="text/html; charset=utf-8", headers=HEADERS)


def _asset_route(name: str, media_type: str):
    async def asset() -> Response:
        return Response(_read(name), media_type=media_type, headers=HEADERS)

    return asset


for _path, (_name, _type) in ASSETS.items():
    router.add_api_route(_path, _asset_route(_name, _type), methods=["GET", "HEAD"])
