"""Routes that are neither TGI generation nor OpenAI: /health, /info, /metrics, /tokenize, /detokenize, /score."""

from __future__ import annotations

import codecs
import math
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..config import Settings
from ..engine import AsyncEngine, EngineState
from ..errors import ValidationError
from .deps import encode_texts, get_engine, get_settings, off_loop, ready_engine, token_text
from .errors import RETRY_AFTER
from .responses import JSONResponse, dumps
from .schemas import DetokenizeRequest, ScoreRequest, TokenizeRequest
from .streaming import ClientDisconnected, until_disconnect

router = APIRouter()


@router.get("/health")
async def health(engine: AsyncEngine = Depends(get_engine)) -> JSONResponse:
    """200 when ready; 503 while loading, shutting down, or after the engine died (llama.cpp's shapes)."""
    if engine.state is EngineState.READY:
        body = {"status": "ok"}
        if engine.last_error:
            # Still serving, but a step failed (and failed its requests): say when and why.
            body["last_error"] = engine.last_error
        return JSONResponse(body)
    message = {
        EngineState.LOADING: "Loading model",
        EngineState.STOPPING: "Shutting down",
    }.get(engine.state, f"Engine error: {engine.dead_reason}")
    return JSONResponse({"error": {"code": 503, "message": message, "type": "unavailable_error"}}, status_code=503,
                        headers={"Retry-After": RETRY_AFTER})


@router.get("/info")
async def info(engine: AsyncEngine = Depends(get_engine), s: Settings = Depends(get_settings)) -> dict[str, Any]:
    c = engine.config
    return {
        "model_id": s.model_name,
        "model_dtype": s.compute_dtype,
        "model_device_type": "cpu",
        "max_input_tokens": c.max_total_tokens - 1,
        "max_total_tokens": c.max_total_tokens,
        "max_batch_size": c.max_batch_size,
        "max_queue": c.max_queue,
        "max_concurrent_requests": c.max_batch_size + c.max_queue,
        "max_stop_sequences": s.max_stop_sequences,
        "max_top_n_tokens": s.max_top_n_tokens,
        "max_best_of": 1,
        "max_client_batch_size": s.max_score_texts,
        "prefill_chunk": c.prefill_chunk,
        "max_batched_tokens": c.max_batched_tokens,
        "stagger_tokens": c.stagger_tokens,
        "quantize": c.quantize,
        "prefix_caching": c.prefix_caching,
        "queue_timeout": c.queue_timeout,
        "state": engine.state.value,
        "last_error": engine.last_error,
        "router": "gpt2-mindspore-server",
        "version": __version__,
    }


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, engine: AsyncEngine = Depends(ready_engine)) -> list[dict[str, Any]]:
    """TGI's shape: one {id, text, start, stop} per token; start/stop are character offsets into `inputs`."""
    (ids,) = await encode_texts(engine, [("inputs", req.inputs)])
    # A 2 MB body is ~500k tokens: their list and its JSON are built in a worker thread, off the event loop.
    body = await off_loop(lambda: dumps(_tokens_with_offsets(engine, ids)))
    return Response(body, media_type="application/json")


def _tokens_with_offsets(engine: AsyncEngine, ids: list[int]) -> list[dict[str, Any]]:
    # Character offsets counted incrementally (decoding the growing prefix per token would be quadratic); a
    # character split across tokens counts where it completes.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    out, n = [], 0
    for i in ids:
        start = n
        n += len(decoder.decode(engine.tokenizer.token_bytes(i)))
        out.append({"id": i, "text": token_text(engine, i), "start": start, "stop": n})
    return out


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, engine: AsyncEngine = Depends(ready_engine)) -> dict[str, Any]:
    bad = [i for i in req.ids if not 0 <= i < engine.vocab_size]
    if bad:
        raise ValidationError(f"`ids` must be token ids in [0, {engine.vocab_size}), got {bad[:5]}", param="ids")
    return {"text": engine.tokenizer.decode(req.ids)}


@router.post("/score")
async def score(
    req: ScoreRequest, request: Request, engine: AsyncEngine = Depends(ready_engine),
    s: Settings = Depends(get_settings),
) -> Response:
    """Per-token logprobs, total and mean logprob and perplexity of each text (batched prefill passes)."""
    if not 1 <= len(req.texts) <= s.max_score_texts:
        raise ValidationError(f"`texts` must hold 1 to {s.max_score_texts} texts, got {len(req.texts)}", param="texts")
    if not 0 <= req.top_n <= s.max_top_n_tokens:
        raise ValidationError(f"`top_n` must be in [0, {s.max_top_n_tokens}], got {req.top_n}", param="top_n")
    limit = engine.config.max_total_tokens
    bos = [engine.tokenizer.eos_token_id] if req.add_bos else []
    prompts = []
    encoded = await encode_texts(engine, [(f"texts.{k}", text) for k, text in enumerate(req.texts)],
                                 max_tokens=limit)
    for k, ids in enumerate(encoded):
        if not ids:
            raise ValidationError(f"`texts.{k}` is empty", param=f"texts.{k}")
        if len(bos) + len(ids) > limit:
            raise ValidationError(f"`texts.{k}` has {len(bos) + len(ids)} tokens; at most {limit} can be scored",
                                  param=f"texts.{k}")
        prompts.append(bos + ids)
    try:
        results = await until_disconnect(request, engine.score(prompts, top_n=req.top_n))
    except ClientDisconnected:
        return Response(status_code=499)
    # Up to 64 texts x 1,024 tokens x top_n alternatives: built and encoded off the event loop.
    body = await off_loop(
        lambda: dumps({"model": s.model_name, "results": _score_results(engine, req, results, len(bos))}))
    return Response(body, media_type="application/json")


def _score_results(engine: AsyncEngine, req: ScoreRequest, results: list, skip: int) -> list[dict[str, Any]]:
    out = []
    for text, infos in zip(req.texts, results):
        infos = infos[skip:]
        scored = [t.logprob for t in infos if t.logprob is not None]
        total = float(sum(scored))
        mean = total / len(scored) if scored else None
        tokens = []
        for t in infos:
            item: dict[str, Any] = {"id": t.id, "text": token_text(engine, t.id), "logprob": t.logprob}
            if req.top_n:
                item["top"] = [{"id": i, "text": token_text(engine, i), "logprob": lp} for i, lp in (t.top or [])]
            tokens.append(item)
        out.append({
            "text": text,
            "tokens": tokens,
            "num_tokens": len(infos),
            "num_scored": len(scored),
            "total_logprob": total,
            "mean_logprob": mean,
            # exp overflows past ~709: such a perplexity is reported as null rather than failing the response.
            "perplexity": math.exp(-mean) if mean is not None and -mean < 700 else None,
        })
    return out
