"""The one JSON encoder of every response body and SSE event, and the JSONResponse that uses it.

Python strings (and JSON strings) may hold lone UTF-16 surrogates ("a\\ud800b"), which have no UTF-8 form: a
route that echoes a client's text (`/score`, `return_full_text`, `echo`, an unknown name in an error message)
would fail to encode it mid-response. Here each one becomes U+FFFD, as the tokenizer reads them in prompts.
Knows JSON and Starlette's response class; nothing of routes.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.responses import JSONResponse as _JSONResponse

_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; lone surrogates become U+FFFD; NaN and infinities are refused (not JSON)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode("utf-8")


class JSONResponse(_JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)
