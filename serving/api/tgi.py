"""TGI-compatible routes: POST /generate, POST /generate_stream (SSE) and POST / (either, by `stream`).

Validation follows TGI's rules and messages (422; the engine's own ranges are checked, and worded, by
`SamplingParams`); `do_sample` absent means "sample if any sampling parameter is set" (TGI), explicitly false
means a true argmax. Knows the engine's async interface and the TGI wire format.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..config import Settings
from ..engine import AsyncEngine, FinishReason, RequestOutput, RequestStream, TokenInfo
from ..errors import ServingError, ValidationError
from ..sampling_params import SamplingParams
from .access_log import note_final
from .deps import encode_texts, get_settings, ready_engine, token_text
from .errors import tgi_body
from .responses import JSONResponse
from .schemas import CompatGenerateRequest, GenerateParameters, GenerateRequest
from .streaming import ClientDisconnected, EngineStreamingResponse, sse_event, until_disconnect

router = APIRouter(tags=["TGI"])

DEFAULT_MAX_NEW_TOKENS = 100

FINISH = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "eos_token",
    FinishReason.STOP: "stop_sequence",
    FinishReason.STOP_TOKEN: "stop_sequence",
}


def build_params(
    p: GenerateParameters, prompt_len: int, s: Settings, max_total: int
) -> tuple[SamplingParams, int]:
    """TGI parameters -> (SamplingParams, prompt tokens kept after `truncate`); raises ValidationError.

    Here only TGI's own rules (stricter than the engine's: `temperature`, `top_k` and `max_new_tokens` > 0,
    `top_p` and `typical_p` < 1) and the server's limits; `SamplingParams` checks the engine's ranges.
    """
    if p.best_of is not None and p.best_of != 1:
        raise ValidationError(f"`best_of` must be > 0 and <= 1. Given: {p.best_of}", param="best_of")
    if p.watermark:
        raise ValidationError("`watermark` is not supported by this server", param="watermark")
    if p.grammar is not None:
        raise ValidationError("`grammar` is not supported by this server", param="grammar")
    if p.adapter_id:
        raise ValidationError("`adapter_id` is not supported by this server (no adapters are loaded)",
                              param="adapter_id")
    if p.temperature is not None and not p.temperature > 0:
        raise ValidationError("`temperature` must be strictly positive", param="temperature")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0", param="top_p")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0", param="typical_p")
    if p.top_k is not None and p.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive", param="top_k")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise ValidationError("`max_new_tokens` must be strictly positive", param="max_new_tokens")
    if len(p.stop) > s.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {s.max_stop_sequences} stop sequences. Given: {len(p.stop)}",
                              param="stop")
    top_n = p.top_n_tokens or 0
    if not 0 <= top_n <= s.max_top_n_tokens:
        raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {s.max_top_n_tokens}. Given: {top_n}",
                              param="top_n_tokens")
    max_input = max_total - 1
    if p.truncate is not None:
        if not 0 < p.truncate <= max_input:
            raise ValidationError(f"`truncate` must be strictly positive and less than {max_total}. "
                                  f"Given: {p.truncate}", param="truncate")
        prompt_len = min(prompt_len, p.truncate)
    if prompt_len > max_input:
        raise ValidationError(f"`inputs` must have less than {max_total} tokens. Given: {prompt_len}", param="inputs")
    max_new = p.max_new_tokens
    if max_new is None:
        max_new = min(DEFAULT_MAX_NEW_TOKENS, max_total - prompt_len)
    if prompt_len + max_new > max_total:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. "
            f"Given: {prompt_len} `inputs` tokens and {max_new} `max_new_tokens`",
            param="max_new_tokens",
        )
    warpers = (
        (p.temperature is not None and p.temperature != 1.0)
        or p.top_k is not None
        or p.top_p is not None
        or p.typical_p is not None
    )
    sample = p.do_sample or ("do_sample" not in p.model_fields_set and warpers)
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=(p.temperature or 1.0) if sample else 0.0,
        top_k=p.top_k or 0,
        top_p=p.top_p or 1.0,
        typical_p=p.typical_p or 1.0,
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=p.seed,
        stop=tuple(p.stop),
        logprobs=top_n,
        prompt_logprobs=0 if p.decoder_input_details else None,
    )
    return params, prompt_len


async def _admit(
    req: GenerateRequest, engine: AsyncEngine, s: Settings, *, stream: bool
) -> tuple[RequestStream, GenerateParameters]:
    p = req.parameters or GenerateParameters()
    if stream and p.decoder_input_details:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens",
                              param="decoder_input_details")
    if not req.inputs:
        raise ValidationError("`inputs` cannot be empty", param="inputs")
    # With `truncate` any length is fine (the last tokens are kept); the body size limit bounds the work.
    max_input = None if p.truncate is not None else engine.config.max_total_tokens - 1
    (ids,) = await encode_texts(engine, [("inputs", req.inputs)], max_tokens=max_input)
    if not ids:
        raise ValidationError("`inputs` cannot be empty", param="inputs")
    params, keep = build_params(p, len(ids), s, engine.config.max_total_tokens)
    return engine.add_request(ids[len(ids) - keep :], params), p


def _token(engine: AsyncEngine, t: TokenInfo, text: str | None = None) -> dict[str, Any]:
    return {
        "id": t.id,
        "text": token_text(engine, t.id) if text is None else text,
        "logprob": t.logprob,
        "special": t.special,
    }


def _top(engine: AsyncEngine, t: TokenInfo) -> list[dict[str, Any]]:
    return [
        {"id": i, "text": token_text(engine, i), "logprob": lp, "special": i in engine.special_ids}
        for i, lp in (t.top or [])
    ]


def _timing_headers(final, n_prompt: int) -> dict[str, str]:
    ms = lambda s: str(int(round(s * 1000)))  # noqa: E731
    per_token = final.inference_time / max(1, final.generated_tokens)
    return {
        "x-total-time": ms(final.total_time),
        "x-queue-time": ms(final.queue_time),
        "x-inference-time": ms(final.inference_time),
        "x-time-per-token": ms(per_token),
        "x-prompt-tokens": str(n_prompt),
        "x-generated-tokens": str(final.generated_tokens),
    }


@router.post("/generate")
async def generate(
    req: GenerateRequest, request: Request, engine: AsyncEngine = Depends(ready_engine),
    s: Settings = Depends(get_settings),
) -> Response:
    stream, p = await _admit(req, engine, s, stream=False)
    try:
        outs = await until_disconnect(request, stream.collect())
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        stream.abort()
    return _generate_response(engine, req, p, outs)


def _generate_response(engine: AsyncEngine, req: GenerateRequest, p: GenerateParameters,
                       outs: list[RequestOutput]) -> JSONResponse:
    final = outs[-1].final
    note_final(final)
    text = (req.inputs if p.return_full_text else "") + final.text
    body: dict[str, Any] = {"generated_text": text}
    if p.details:
        tokens = [t for o in outs for t in o.tokens]
        prompt = outs[0].prompt if p.decoder_input_details else None
        details: dict[str, Any] = {
            "finish_reason": FINISH[final.finish_reason],
            "generated_tokens": final.generated_tokens,
            "seed": final.seed,
            "prefill": [{"id": t.id, "text": token_text(engine, t.id), "logprob": t.logprob} for t in prompt or []],
            "tokens": [_token(engine, t) for t in tokens],
            "best_of_sequences": None,
        }
        if p.top_n_tokens:
            details["top_tokens"] = [_top(engine, t) for t in tokens]
        body["details"] = details
    return JSONResponse(body, headers=_timing_headers(final, final.prompt_tokens))


@router.post("/generate_stream")
async def generate_stream(
    req: GenerateRequest, engine: AsyncEngine = Depends(ready_engine), s: Settings = Depends(get_settings)
) -> Response:
    stream, p = await _admit(req, engine, s, stream=True)
    return EngineStreamingResponse(_events(engine, req, p, stream), [stream])


async def _events(engine: AsyncEngine, req: GenerateRequest, p: GenerateParameters,
                  stream: RequestStream) -> AsyncIterator[bytes]:
    index = 0
    try:
        async for out in stream:
            for t in out.tokens:
                index += 1
                event: dict[str, Any] = {
                    "index": index,
                    # The text this token released: held-back stop-string prefixes and partial UTF-8 are not
                    # sent, so concatenating `token.text` gives exactly `generated_text`.
                    "token": _token(engine, t, text=out.text),
                    "generated_text": None,
                    "details": None,
                }
                if p.top_n_tokens:
                    event["top_tokens"] = _top(engine, t)
                if out.final is not None:
                    f = out.final
                    note_final(f)
                    event["generated_text"] = (req.inputs if p.return_full_text else "") + f.text
                    if p.details:
                        event["details"] = {
                            "finish_reason": FINISH[f.finish_reason],
                            "generated_tokens": f.generated_tokens,
                            "seed": f.seed,
                            "input_length": f.prompt_tokens,
                        }
                yield sse_event(event, space=False)
    except ServingError as e:
        yield sse_event(tgi_body(e), space=False)


@router.post("/")
async def compat_generate(
    req: CompatGenerateRequest, request: Request, engine: AsyncEngine = Depends(ready_engine),
    s: Settings = Depends(get_settings),
) -> Response:
    """TGI's compatibility route (what `huggingface_hub.InferenceClient(url).text_generation` calls)."""
    if req.stream:
        return await generate_stream(req, engine, s)
    return await generate(req, request, engine, s)
