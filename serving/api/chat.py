"""OpenAI's POST /v1/chat/completions: the messages rendered into one prompt by the chat template, then generated as
/v1/completions generates (the same checks, sampling parameters and stream handling, from `openai.py`).

GPT-2 was never trained on conversations and has no template: without `--chat-template` (or one in the model
directory) the route answers 400 saying how to provide one, as vLLM does. Messages are text: content is a string
or a list of `{"type": "text"}` parts (joined with newlines); image, audio and file parts are refused. `n`
choices each; `logprobs` + `top_logprobs` (at most --max-top-n-tokens) per generated token; a stream sends each
choice's role first, then its content deltas, then a chunk with its finish reason, then usage if asked and
`data: [DONE]`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..config import Settings
from ..engine import AsyncEngine, RequestOutput, RequestStream, TokenInfo
from ..errors import ServingError, ValidationError
from .access_log import note_final
from .chat_template import NO_TEMPLATE, ChatTemplate, load_chat_template
from .deps import encode_texts, get_settings, off_loop, ready_engine, token_text
from .errors import openai_body
from .openai import OpenAISampling, check_request, choice_seed, collect, finish_reason, sampling_params, usage
from .responses import JSONResponse
from .schemas import ChatCompletionRequest
from .streaming import EngineStreamingResponse, merge, sse_event

log = logging.getLogger("serving.api")


def _bad(msg: str, param: str | None = "messages") -> ValidationError:
    return ValidationError(msg, param=param)


def chat_router(settings: Settings) -> APIRouter:
    """The route, its template loaded and compiled now: a template that cannot be read or compiled stops the
    server at start (ChatTemplateError, a ValueError) rather than failing every chat request."""
    template = load_chat_template(settings.chat_template, settings.model)
    if template is None:
        log.info("no chat template: /v1/chat/completions answers 400 (start with --chat-template FILE)")
    else:
        log.info("chat template: %s", template.origin)
    router = APIRouter(prefix="/v1", tags=["OpenAI"])

    @router.post("/chat/completions")
    async def chat_completions(
        req: ChatCompletionRequest, request: Request, engine: AsyncEngine = Depends(ready_engine),
        s: Settings = Depends(get_settings),
    ) -> Response:
        return await _complete(req, request, engine, s, template)

    return router


def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as the template sees them: `role`, `content` as one string, `name`/`tool_call_id` if given."""
    if not req.messages:
        raise _bad("`messages` must not be empty")
    out = []
    for i, m in enumerate(req.messages):
        if m.content is None:
            if m.role != "assistant":
                raise _bad(f"`messages[{i}].content` must not be null in a {m.role} message")
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            parts = []
            for k, part in enumerate(m.content):
                where = f"messages[{i}].content[{k}]"
                if part.type != "text":
                    raise _bad(f"`{where}` is of type {part.type!r}: this model reads text only "
                               "(content as a string or parts of type \"text\")")
                if part.model_extra:
                    raise _bad(f"Unrecognized request argument supplied: {where}.{next(iter(part.model_extra))}")
                if part.text is None:
                    raise _bad(f"`{where}` is a text part without `text`")
                parts.append(part.text)
            text = "\n".join(parts)
        msg: dict[str, Any] = {"role": m.role, "content": text}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _sampling(req: ChatCompletionRequest) -> OpenAISampling:
    """The request's sampling fields under completions' names (`top_logprobs` -> `logprobs`)."""
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise _bad(f"`max_completion_tokens` ({req.max_completion_tokens}) and `max_tokens` ({req.max_tokens}) "
                   "disagree: give one of them", "max_completion_tokens")
    if req.top_logprobs is not None and not req.logprobs:
        raise _bad("`top_logprobs` is only allowed when `logprobs` is true", "top_logprobs")
    given_max = req.max_completion_tokens is not None
    return OpenAISampling(
        max_tokens=req.max_completion_tokens if given_max else req.max_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, typical_p=req.typical_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, logit_bias=req.logit_bias, stop=req.stop,
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        max_tokens_param="max_completion_tokens" if given_max else "max_tokens",
        logprobs_param="top_logprobs",
        prompt_param="messages",
    )


async def _prompt(req: ChatCompletionRequest, template: ChatTemplate, engine: AsyncEngine) -> list[int]:
    """Render and tokenize, both in a worker thread (a 2 MB body of messages takes a while)."""
    messages = _messages(req)
    special = token_text(engine, engine.tokenizer.eos_token_id)  # GPT-2's bos and eos: <|endoftext|>
    text = await off_loop(lambda: template.render(
        messages, add_generation_prompt=req.add_generation_prompt, bos_token=special, eos_token=special))
    (ids,) = await encode_texts(engine, [("messages", text)], max_tokens=engine.config.max_total_tokens)
    if not ids:
        raise _bad("the chat template rendered these messages as an empty prompt")
    return ids


@dataclass
class _Choice:
    index: int
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    generated: int = 0
    finish_reason: str | None = None
    cached: int = 0  # prompt tokens from the prefix cache


def _logprob(engine: AsyncEngine, token_id: int, logprob: float | None) -> dict[str, Any]:
    return {"token": token_text(engine, token_id), "logprob": logprob,
            "bytes": list(engine.tokenizer.token_bytes(token_id))}


def _token_logprobs(engine: AsyncEngine, tokens: list[TokenInfo]) -> list[dict[str, Any]]:
    return [{**_logprob(engine, t.id, t.logprob), "top_logprobs": [_logprob(engine, i, lp) for i, lp in t.top or []]}
            for t in tokens]


def _fold(engine: AsyncEngine, c: _Choice, out: RequestOutput, want_logprobs: bool) -> list[dict[str, Any]] | None:
    """Add one engine output to a choice; returns its logprobs entries (None when not asked for)."""
    c.text += out.text
    c.generated += len(out.tokens)
    if out.final is not None:
        c.finish_reason = finish_reason(out)
        c.cached = out.final.cached_tokens
        note_final(out.final)
    if not want_logprobs:
        return None
    entries = _token_logprobs(engine, out.tokens)
    c.logprobs += entries
    return entries


async def _complete(req: ChatCompletionRequest, request: Request, engine: AsyncEngine, s: Settings,
                    template: ChatTemplate | None) -> Response:
    check_request(s, model=req.model, n=req.n, seed=req.seed, stream=req.stream, stream_options=req.stream_options)
    if req.chat_template is not None:
        raise _bad("`chat_template` in a request is not supported: the server's template is set with "
                   "--chat-template", "chat_template")
    if template is None:
        raise _bad(NO_TEMPLATE, None)
    sampling = _sampling(req)
    ids = await _prompt(req, template, engine)
    params = [sampling_params(sampling, len(ids), engine, s, choice_seed(req.seed, j)) for j in range(req.n)]
    streams = engine.add_requests([ids] * req.n, params)
    choices = [_Choice(j) for j in range(req.n)]
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    want = bool(req.logprobs)
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return EngineStreamingResponse(
            _stream(engine, s, choices, streams, want, include_usage, cid, created, len(ids)), streams)
    outs = await collect(request, streams)
    if outs is None:
        return Response(status_code=499)
    for c, stream_outs in zip(choices, outs):
        for out in stream_outs:
            _fold(engine, c, out, want)
    return JSONResponse({
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": s.model_name,
        "choices": [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": {"content": c.logprobs} if want else None,
            "finish_reason": c.finish_reason,
        } for c in choices],
        "usage": usage(len(ids), sum(c.generated for c in choices), choices[0].cached),
    })


async def _stream(engine: AsyncEngine, s: Settings, choices: list[_Choice], streams: list[RequestStream],
                  want_logprobs: bool, include_usage: bool, cid: str, created: int,
                  prompt_tokens: int) -> AsyncIterator[bytes]:
    def chunk(items: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": s.model_name,
                "choices": items, **extra}
        return sse_event(body, space=True)

    def item(c: _Choice, delta: dict[str, Any], logprobs: list | None = None,
             finish: str | None = None) -> dict[str, Any]:
        return {"index": c.index, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish}

    try:
        # Each choice's role comes first, before any text, as OpenAI sends it.
        for c in choices:
            yield chunk([item(c, {"role": "assistant", "content": ""})])
        async for i, out in merge(streams):
            c = choices[i]
            lp = _fold(engine, c, out, want_logprobs)
            # Nothing releasable yet (a held-back stop-string prefix or partial character) and no logprobs: skip.
            if out.text or lp:
                yield chunk([item(c, {"content": out.text}, lp)])
            if out.final is not None:
                yield chunk([item(c, {}, finish=c.finish_reason)])
        if include_usage:
            yield chunk([], usage=usage(prompt_tokens, sum(c.generated for c in choices), choices[0].cached))
    except ServingError as e:
        yield sse_event(openai_body(e), space=True)
    yield sse_event("[DONE]", space=True)
