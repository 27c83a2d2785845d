"""Request bodies of every route as pydantic models (types only; value ranges are checked where params are built).

Strict types: a string where a number belongs is a 422/400, not a silent coercion. Unknown fields: ignored on the
TGI routes (as TGI does), refused on /v1 (as OpenAI does) and on this server's own routes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


# ---- TGI ---------------------------------------------------------------------------------------------------


class GenerateParameters(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    # Known TGI features this server does not have: refused by name rather than ignored.
    grammar: Any = None
    adapter_id: str | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    inputs: str
    parameters: GenerateParameters | None = None


class CompatGenerateRequest(GenerateRequest):
    """TGI's `POST /`: a generate request that says itself whether to stream."""

    stream: bool = False


class TokenizeRequest(GenerateRequest):
    pass


class DetokenizeRequest(_Strict):
    ids: list[int]


# ---- OpenAI completions ------------------------------------------------------------------------------------


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class CompletionRequest(_Strict):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool = False
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    suffix: str | None = None
    # vLLM's extra sampling parameters (the openai client sends them through `extra_body`).
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None


# ---- scoring -----------------------------------------------------------------------------------------------


class ScoreRequest(_Strict):
    texts: list[str]
    # Prepend <|endoftext|> so that the first token of each text is scored too.
    add_bos: bool = False
    top_n: int = 0  # alternatives per position
