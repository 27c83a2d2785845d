"""OpenAI-compatible routes (as vLLM serves them): POST /v1/completions and GET /v1/models.

Prompts may be a string, a list of strings, token ids or a list of token-id lists; `n` completions each.
`echo` + `logprobs` returns the prompt's token logprobs (the first is null), also with `max_tokens=0`, which is
how lm-eval-harness scores text. Errors are 400 with an OpenAI error object naming the parameter. The checks and
the building of sampling parameters are shared with /v1/chat/completions (`chat.py`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..config import Settings
from ..engine import AsyncEngine, FinishReason, RequestOutput, RequestStream, TokenInfo
from ..errors import ServingError, ValidationError
from ..sampling_params import MAX_SEED, SamplingParams
from .access_log import note_final
from .deps import encode_texts, get_settings, off_loop, ready_engine, token_text
from .errors import NotFoundError, openai_body
from .responses import JSONResponse
from .schemas import CompletionRequest
from .streaming import ClientDisconnected, EngineStreamingResponse, merge, sse_event, until_disconnect

router = APIRouter(prefix="/v1", tags=["OpenAI"])

_CREATED = int(time.time())


@router.get("/models")
async def models(request: Request, s: Settings = Depends(get_settings)) -> dict[str, Any]:
    engine: AsyncEngine = request.app.state.engine
    return {
        "object": "list",
        "data": [{
            "id": s.model_name,
            "object": "model",
            "created": _CREATED,
            "owned_by": "gpt2-mindspore-server",
            "max_model_len": engine.config.max_total_tokens,
        }],
    }


@dataclass
class _Prompt:
    ids: list[int]
    text: str


async def _prompts(req: CompletionRequest, engine: AsyncEngine, s: Settings) -> list[_Prompt]:
    p = req.prompt
    if isinstance(p, str):
        items: list[Any] = [p]
    elif p and isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise ValidationError("`prompt` must not be an empty list", param="prompt")
    if len(items) > s.max_score_texts:
        raise ValidationError(f"at most {s.max_score_texts} prompts per request, got {len(items)}", param="prompt")
    for item in items:
        if not isinstance(item, str):
            bad = [t for t in item if not 0 <= t < engine.vocab_size]
            if bad:
                raise ValidationError(f"token ids in `prompt` must be in [0, {engine.vocab_size}), got {bad[:5]}",
                                      param="prompt")
    limit = engine.config.max_total_tokens
    texts = [("prompt", item) for item in items if isinstance(item, str)]
    encoded = iter(await encode_texts(engine, texts, max_tokens=limit))
    # Token-id prompts are decoded for `echo` in a worker thread too: a body may hold ~500k ids.
    decoded = iter(await off_loop(
        lambda: [engine.tokenizer.decode(item) for item in items if not isinstance(item, str)]))
    out = []
    for item in items:
        ids, text = (next(encoded), item) if isinstance(item, str) else (list(item), next(decoded))
        if not ids:
            raise ValidationError("`prompt` cannot be empty", param="prompt")
        out.append(_Prompt(ids, text))
    return out


@dataclass(frozen=True)
class OpenAISampling:
    """The sampling fields /v1/completions and /v1/chat/completions share, as plain values. The `*_param` names
    are what errors call the fields the routes name differently (chat's `max_completion_tokens`, `top_logprobs`,
    `messages`)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # alternatives per generated token (0: the chosen token's logprob only)
    prompt_logprobs: int | None = None
    echo: bool = False
    max_tokens_param: str = "max_tokens"
    logprobs_param: str = "logprobs"
    prompt_param: str = "prompt"


def check_request(
    s: Settings, *, model: str | None, n: int, seed: int | None, stream: bool, stream_options: object | None
) -> None:
    """The checks of the fields both routes have outside the sampling parameters."""
    if model is not None and model != s.model_name:
        raise NotFoundError(f"The model `{model}` does not exist.")
    if not 1 <= n <= s.max_n:
        raise ValidationError(f"`n` must be in [1, {s.max_n}], got {n}", param="n")
    if stream_options is not None and not stream:
        raise ValidationError("`stream_options` is only allowed when `stream` is true", param="stream_options")


def choice_seed(seed: int | None, j: int) -> int | None:
    """One seed per choice: the request's own for the first (so `SamplingParams` checks its range), then the
    next ones, wrapping past 2^64 - 1 rather than refusing a valid seed for n > 1."""
    return seed if seed is None or j == 0 else (seed + j) % (MAX_SEED + 1)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage; cached_tokens: prompt tokens the prefix cache supplied (vLLM reports them the same way)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish_reason(out: RequestOutput) -> str | None:
    """OpenAI's finish reason of a final output (an EOS token, a stop string or a stop token id are all "stop")."""
    if out.final is None:
        return None
    return "length" if out.final.finish_reason is FinishReason.LENGTH else "stop"


async def collect(request: Request, streams: list[RequestStream]) -> list[list[RequestOutput]] | None:
    """Every stream's outputs, or None if the client went away first; the requests are aborted either way."""
    try:
        return await until_disconnect(request, asyncio.gather(*(st.collect() for st in streams)))
    except ClientDisconnected:
        return None
    finally:
        for st in streams:
            st.abort()


def _params(
    req: CompletionRequest, prompt_len: int, engine: AsyncEngine, s: Settings, seed: int | None
) -> SamplingParams:
    if req.best_of is not None and req.best_of != req.n:
        raise ValidationError("`best_of` different from `n` is not supported", param="best_of")
    if req.suffix is not None:
        raise ValidationError("`suffix` is not supported", param="suffix")
    o = OpenAISampling(
        max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        typical_p=req.typical_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, logit_bias=req.logit_bias, stop=req.stop,
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        logprobs=req.logprobs, prompt_logprobs=req.prompt_logprobs, echo=req.echo,
    )
    return sampling_params(o, prompt_len, engine, s, seed)


def sampling_params(
    o: OpenAISampling, prompt_len: int, engine: AsyncEngine, s: Settings, seed: int | None
) -> SamplingParams:
    """OpenAI's own rules (stricter than the engine's: temperature <= 2, top_k -1 for "disabled"), the server's
    limits and the fields' OpenAI names, then `SamplingParams`, which checks the engine's ranges."""
    max_total = engine.config.max_total_tokens
    if o.temperature is not None and not 0.0 <= o.temperature <= 2.0:
        raise ValidationError(f"`temperature` must be in [0, 2], got {o.temperature}", param="temperature")
    if o.top_k is not None and o.top_k < -1:
        raise ValidationError(f"`top_k` must be -1 (disabled) or >= 1, got {o.top_k}", param="top_k")
    for name, v in ((o.logprobs_param, o.logprobs), ("prompt_logprobs", o.prompt_logprobs)):
        if v is not None and not 0 <= v <= s.max_top_n_tokens:
            raise ValidationError(f"`{name}` must be in [0, {s.max_top_n_tokens}], got {v}", param=name)
    stop = [o.stop] if isinstance(o.stop, str) else list(o.stop or [])
    if len(stop) > s.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {s.max_stop_sequences} sequences, got {len(stop)}", param="stop")
    bias = []
    for key, value in (o.logit_bias or {}).items():
        # ASCII digits only: str.isdigit() also takes "²" (int() then fails) and "١٢" (int() reads 12).
        if not (0 < len(key) <= 10 and key.isascii() and key.isdigit()) or not int(key) < engine.vocab_size:
            raise ValidationError(f"`logit_bias` keys must be token ids in [0, {engine.vocab_size}), got {key!r}",
                                  param="logit_bias")
        bias.append((int(key), float(value)))
    name = o.max_tokens_param
    max_tokens = o.max_tokens if o.max_tokens is not None else max_total - prompt_len
    if max_tokens < 0:
        raise ValidationError(f"`{name}` must be >= 0, got {max_tokens}", param=name)
    if prompt_len + max_tokens > max_total:
        raise ValidationError(
            f"This model's maximum context length is {max_total} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion). "
            "Please reduce the length of the prompt or completion.",
            param=o.prompt_param if prompt_len >= max_total else name,
        )
    if not 0 <= o.min_tokens <= max_tokens:
        raise ValidationError(f"`min_tokens` must be in [0, {name}={max_tokens}], got {o.min_tokens}",
                              param="min_tokens")
    prompt_logprobs = o.prompt_logprobs
    if o.echo and o.logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, o.logprobs)
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if o.temperature is None else o.temperature,
        top_k=max(0, o.top_k or 0),
        top_p=1.0 if o.top_p is None else o.top_p,
        min_p=o.min_p or 0.0,
        typical_p=1.0 if o.typical_p is None else o.typical_p,
        repetition_penalty=1.0 if o.repetition_penalty is None else o.repetition_penalty,
        presence_penalty=o.presence_penalty or 0.0,
        frequency_penalty=o.frequency_penalty or 0.0,
        logit_bias=tuple(bias),
        seed=seed,
        ignore_eos=o.ignore_eos,
        min_new_tokens=o.min_tokens,
        stop=tuple(stop),
        stop_token_ids=tuple(o.stop_token_ids or ()),
        logprobs=o.logprobs,
        prompt_logprobs=prompt_logprobs,
    )


@dataclass
class _Choice:
    """One completion being assembled: its prompt, text so far and OpenAI logprobs lists."""

    index: int
    prompt: _Prompt
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    offset: int = 0
    generated: int = 0
    finish_reason: str | None = None
    cached: int = 0  # prompt tokens from the prefix cache


def _cached(choices: list[_Choice], n: int) -> int:
    # usage counts each prompt once, as prompt_tokens does: its first choice's hits.
    return sum(c.cached for c in choices if c.index % n == 0)


def _add_tokens(engine: AsyncEngine, c: _Choice, toks: list[TokenInfo]) -> dict[str, Any]:
    """Append tokens to the choice's logprobs lists; returns just the new part (for a stream chunk)."""
    new: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in toks:
        s = token_text(engine, t.id)
        top = None
        if t.logprob is not None:
            top = {token_text(engine, i): lp for i, lp in (t.top or [])}
            top.setdefault(s, t.logprob)
        for key, val in (("tokens", s), ("token_logprobs", t.logprob), ("top_logprobs", top),
                         ("text_offset", c.offset)):
            new[key].append(val)
            getattr(c, key).append(val)
        c.offset += len(s)
    return new


def _apply(
    engine: AsyncEngine, req: CompletionRequest, c: _Choice, out: RequestOutput, first: bool
) -> tuple[str, dict | None]:
    """Fold one engine output into a choice; returns (text delta, logprobs delta or None)."""
    delta = ""
    lp_delta: dict[str, list] | None = None
    want = req.logprobs is not None
    if first and req.echo:
        delta += c.prompt.text
        if want:
            prompt = out.prompt or [TokenInfo(i, None) for i in c.prompt.ids]
            lp_delta = _add_tokens(engine, c, prompt)
        else:
            c.offset += len(c.prompt.text)
    delta += out.text
    if want and out.tokens:
        more = _add_tokens(engine, c, out.tokens)
        lp_delta = more if lp_delta is None else {k: lp_delta[k] + more[k] for k in lp_delta}
    c.text += delta
    c.generated += len(out.tokens)
    if out.final is not None:
        c.finish_reason = finish_reason(out)
        c.cached = out.final.cached_tokens
        note_final(out.final)
    return delta, lp_delta


def _prompt_logprobs(engine: AsyncEngine, prompt: list[TokenInfo] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, decoded_token}}, the
    prompt's own token first, then the top alternatives."""
    if prompt is None:
        return None
    out: list[dict[str, Any] | None] = []
    for t in prompt:
        if t.logprob is None:
            out.append(None)
            continue
        entry = {str(t.id): {"logprob": t.logprob, "decoded_token": token_text(engine, t.id)}}
        for i, lp in t.top or []:
            entry.setdefault(str(i), {"logprob": lp, "decoded_token": token_text(engine, i)})
        out.append(entry)
    return out


def _logprobs_obj(c: _Choice) -> dict[str, Any]:
    return {"tokens": c.tokens, "token_logprobs": c.token_logprobs, "top_logprobs": c.top_logprobs,
            "text_offset": c.text_offset}


@router.post("/completions")
async def completions(
    req: CompletionRequest, request: Request, engine: AsyncEngine = Depends(ready_engine),
    s: Settings = Depends(get_settings),
) -> Response:
    check_request(s, model=req.model, n=req.n, seed=req.seed, stream=req.stream, stream_options=req.stream_options)
    prompts = await _prompts(req, engine, s)
    choices, ids, params = [], [], []
    for prompt in prompts:
        for j in range(req.n):
            params.append(_params(req, len(prompt.ids), engine, s, choice_seed(req.seed, j)))
            ids.append(prompt.ids)
            choices.append(_Choice(len(choices), prompt))
    streams = engine.add_requests(ids, params)
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    usage_prompt = sum(len(p.ids) for p in prompts)
    if req.stream:
        return EngineStreamingResponse(_stream(engine, req, s, choices, streams, cid, created, usage_prompt), streams)
    outs = await collect(request, streams)
    if outs is None:
        return Response(status_code=499)
    body_choices = []
    for c, stream_outs in zip(choices, outs):
        for k, out in enumerate(stream_outs):
            _apply(engine, req, c, out, first=k == 0)
        choice = {
            "index": c.index,
            "text": c.text,
            "logprobs": _logprobs_obj(c) if req.logprobs is not None else None,
            "finish_reason": c.finish_reason,
        }
        if req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _prompt_logprobs(engine, stream_outs[0].prompt if stream_outs else None)
        body_choices.append(choice)
    completion = sum(c.generated for c in choices)
    return JSONResponse({
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": s.model_name,
        "choices": body_choices,
        "usage": usage(usage_prompt, completion, _cached(choices, req.n)),
    })


async def _stream(engine: AsyncEngine, req: CompletionRequest, s: Settings, choices: list[_Choice],
                  streams: list[RequestStream], cid: str, created: int, usage_prompt: int) -> AsyncIterator[bytes]:
    seen: set[int] = set()

    def chunk(choice_list: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": cid, "object": "text_completion", "created": created, "model": s.model_name,
                "choices": choice_list, **extra}
        return sse_event(body, space=True)

    try:
        async for i, out in merge(streams):
            c = choices[i]
            first = i not in seen
            delta, lp = _apply(engine, req, c, out, first=first)
            seen.add(i)
            if not delta and lp is None and out.final is None and not (first and req.prompt_logprobs is not None):
                continue  # nothing releasable yet (held-back stop-string prefix or partial character)
            item = {"index": c.index, "text": delta, "logprobs": lp,
                    "finish_reason": c.finish_reason if out.final is not None else None}
            if first and req.prompt_logprobs is not None:
                item["prompt_logprobs"] = _prompt_logprobs(engine, out.prompt)
            yield chunk([item])
        if req.stream_options is not None and req.stream_options.include_usage:
            completion = sum(c.generated for c in choices)
            yield chunk([], usage=usage(usage_prompt, completion, _cached(choices, req.n)))
    except ServingError as e:
        yield sse_event(openai_body(e), space=True)
    yield sse_event("[DONE]", space=True)
