"""Chat templates: Hugging Face's `chat_template` convention (Jinja2), turning chat messages into one prompt.

Where the template comes from, as vLLM does it: `--chat-template` (a file, or the template text itself), else the
model directory's own (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`, as transformers saves
them). GPT-2 has none. It renders as transformers' `apply_chat_template` does: in Jinja2's immutable sandbox (a
template reaches no Python internals and cannot change its arguments), with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, `raise_exception(message)`, a `tojson` that keeps non-ASCII text and `strftime_now`; the
variables are `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.

A template that cannot be read or compiled stops the server at start; one that fails on a request's messages
(`raise_exception`, an undefined variable, a sandbox violation) is that request's error. Knows Jinja2 and files;
nothing of HTTP or the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ValidationError

# What an inline template has and a file name does not (vLLM's test for the same question).
_TEMPLATE_CHARS = "{}\n"

NO_TEMPLATE = (
    "this model has no chat template: start the server with --chat-template FILE (a Jinja2 template in Hugging "
    "Face's chat_template format; configs/chat/plain.jinja is one for plain-text models such as GPT-2), "
    "or add `chat_template` to the model directory's tokenizer_config.json"
)


class ChatTemplateError(ValueError):
    """A template that cannot be loaded or compiled (a start-up error, not a request's)."""


class _Refused(jinja2.TemplateError):
    """`raise_exception(message)` in a template: the template refuses these messages."""


def _raise_exception(message: str) -> None:
    raise _Refused(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' `tojson`: Jinja2's own escapes HTML characters and non-ASCII text, which a prompt must not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled template and where it came from; `bos_token`/`eos_token` are the model directory's when it names
    them (None: the caller passes its tokenizer's)."""

    template: jinja2.Template
    origin: str
    bos_token: str | None = None
    eos_token: str | None = None

    @classmethod
    def compile(cls, source: str, origin: str, **tokens: str | None) -> ChatTemplate:
        try:
            template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template {origin}: line {e.lineno}: {e.message}") from None
        return cls(template, origin, **tokens)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool, bos_token: str,
               eos_token: str) -> str:
        """The prompt, or ValidationError (param `messages`) naming what the template failed on."""
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token if self.bos_token is not None else bos_token,
                eos_token=self.eos_token if self.eos_token is not None else eos_token,
            )
        except _Refused as e:
            raise ValidationError(f"the chat template refused these messages: {e}", param="messages") from None
        # Whatever a template raises on a request's messages is that request's error (400), never a 500:
        # an undefined attribute, a sandbox violation, `messages[0]['content'] + 1`, a recursive macro.
        except Exception as e:  # noqa: BLE001
            raise ValidationError(f"the chat template failed on these messages: {type(e).__name__}: {e}",
                                  param="messages") from None


def load_chat_template(setting: str | None, model_dir: str | None) -> ChatTemplate | None:
    """`--chat-template` (a file or the template text), else the model directory's template, else None."""
    config = _tokenizer_config(model_dir)
    tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    if setting:
        path = Path(setting)
        if _is_file(path):
            return ChatTemplate.compile(_read(path, "--chat-template"), str(path), **tokens)
        if not any(c in setting for c in _TEMPLATE_CHARS):
            raise ChatTemplateError(
                f"--chat-template {setting!r}: no such file (a template given inline contains `{{`)")
        return ChatTemplate.compile(setting, "--chat-template (inline)", **tokens)
    if model_dir is None:
        return None
    jinja_file = Path(model_dir) / "chat_template.jinja"
    if jinja_file.is_file():
        return ChatTemplate.compile(_read(jinja_file, "the model's chat template"), str(jinja_file), **tokens)
    source = config.get("chat_template")
    origin = str(Path(model_dir) / "tokenizer_config.json")
    if isinstance(source, list):
        # transformers' named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
            raise ChatTemplateError(
                f"{origin}: `chat_template` names templates {sorted(map(str, named))} but none `default`: "
                "choose one with --chat-template")
        source, origin = named["default"], f"{origin} (`default`)"
    if source is None:
        return None
    if not isinstance(source, str):
        raise ChatTemplateError(f"{origin}: `chat_template` must be a string, got {type(source).__name__}")
    return ChatTemplate.compile(source, origin, **tokens)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a template given inline can be longer than a file name may be
        return False


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{what} {str(path)!r} cannot be read: {e}") from None


def _tokenizer_config(model_dir: str | None) -> dict[str, Any]:
    if model_dir is None:
        return {}
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(_read(path, "the model's tokenizer config"))
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ChatTemplateError(f"{path} must hold a JSON object")
    return config


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
