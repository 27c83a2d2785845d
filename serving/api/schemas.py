"""Request bodies of every route as pydantic models (types only; value ranges are checked where params are built),
and the response bodies for the OpenAPI document.

Strict types: a string where a number belongs is a 422/400, not a silent coercion. Unknown fields: ignored on the
TGI routes (as TGI does), refused on /v1 (as OpenAI does) and on this server's own routes.
"""

from __future__ import annotations

from typing import Any, Literal

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


class _OpenAISampling(_Strict):
    """The fields /v1/completions and /v1/chat/completions share (one parameter builder reads them)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM's extra sampling parameters (the openai client sends them through `extra_body`).
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    prompt_logprobs: int | None = None


# ---- OpenAI chat completions -------------------------------------------------------------------------------


class ChatContentPart(BaseModel):
    """One part of a message's content. Only `text` parts are read; the other kinds (`image_url`, `input_audio`,
    `file`) are parsed so that the refusal can name them."""

    model_config = ConfigDict(strict=True, extra="allow")

    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # null only for an assistant message (OpenAI's, when it carried tool calls).
    content: str | list[ChatContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage]
    # Default: what fits in the context. `max_completion_tokens` is OpenAI's newer name for the same thing.
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    # A template per request (vLLM takes one): refused by name, the server's template is its operator's choice.
    chat_template: str | None = None


# ---- scoring -----------------------------------------------------------------------------------------------


class ScoreRequest(_Strict):
    texts: list[str]
    # Prepend <|endoftext|> so that the first token of each text is scored too.
    add_bos: bool = False
    top_n: int = 0  # alternatives per position


# ---- responses -----------------------------------------------------------------------------------------------
# Documentation only (serving/api/openapi.py puts them into /openapi.json): the routes build these bodies as dicts.


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(description="null for the first prompt token: nothing predicts it")


TgiFinishReason = Literal["length", "eos_token", "stop_sequence"]


class Details(BaseModel):
    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = Field(description="the prompt's tokens with `decoder_input_details`, else empty")
    tokens: list[Token]
    best_of_sequences: None = None
    top_tokens: list[list[Token]] | None = Field(None, description="with `top_n_tokens` > 0 only")


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = Field(None, description="with `details` only")


class StreamDetails(BaseModel):
    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    """One `data:` event of a TGI stream; the last one carries `generated_text` (and `details` if asked)."""

    index: int = Field(ge=1)
    token: Token = Field(description="`text` is the text this token released (held-back text comes later)")
    generated_text: str | None
    details: StreamDetails | None
    top_tokens: list[Token] | None = Field(None, description="with `top_n_tokens` > 0 only")


class ErrorResponse(BaseModel):
    """TGI's error body; also the final event of a stream that fails."""

    error: str
    error_type: str


class TokenSpan(BaseModel):
    id: int
    text: str
    start: int = Field(ge=0, description="character offset of the token's first character in `inputs`")
    stop: int = Field(ge=0)


class DetokenizeResponse(BaseModel):
    text: str


class ScoreAlternative(BaseModel):
    id: int
    text: str
    logprob: float


class ScoreToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(description="null for the first token unless `add_bos`")
    top: list[ScoreAlternative] | None = Field(None, description="with `top_n` > 0 only")


class ScoreResult(BaseModel):
    text: str
    tokens: list[ScoreToken]
    num_tokens: int = Field(ge=1)
    num_scored: int = Field(ge=0)
    total_logprob: float
    mean_logprob: float | None
    perplexity: float | None


class ScoreResponse(BaseModel):
    model: str
    results: list[ScoreResult]


class Health(BaseModel):
    status: Literal["ok"]
    last_error: str | None = Field(None, description="the last failed step, while the engine still serves")


class Info(BaseModel):
    model_id: str
    model_dtype: str
    model_device_type: str
    max_input_tokens: int
    max_total_tokens: int
    max_batch_size: int
    max_queue: int
    max_concurrent_requests: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_best_of: int
    max_client_batch_size: int
    prefill_chunk: int
    max_batched_tokens: int
    stagger_tokens: int = Field(description="a short prompt starts only while the step's short prompts hold "
                                "fewer than this many tokens (--stagger-tokens; 0: off)")
    quantize: Literal["int8"] | None = Field(None, description="the weights' quantization (--quantize)")
    prefix_caching: bool = Field(description="automatic prefix caching is on (--no-prefix-caching turns it off)")
    queue_timeout: float | None
    state: str
    last_error: str | None
    router: str
    version: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body on /v1; also a stream's last event before `[DONE]` when it fails."""

    error: OpenAIErrorDetail


class HealthErrorDetail(BaseModel):
    code: int
    message: str
    type: str


class HealthUnavailable(BaseModel):
    """/health while not ready, as llama.cpp answers."""

    error: HealthErrorDetail


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int = Field(ge=0)
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        None, description="with `prompt_logprobs` only: per prompt token, keyed by token id (the first is null)"
    )


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(ge=0, description="prompt tokens whose keys and values came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One `data:` event of a /v1/completions stream (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="the last chunk with `stream_options.include_usage` only")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="the token's UTF-8 bytes (a token may hold part of a character)")


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[ChatTopLogprob] = Field(description="the `top_logprobs` most likely tokens at this position")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int = Field(ge=0)
    message: ChatCompletionMessage
    logprobs: ChatLogprobs | None = Field(description="with `logprobs: true` only")
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="in each choice's first chunk only")
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = Field(ge=0)
    delta: ChatDelta = Field(description="empty in the chunk that carries `finish_reason`")
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a /v1/chat/completions stream (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="the last chunk with `stream_options.include_usage` only")
