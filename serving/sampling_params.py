"""Per-request decoding parameters, validated once at admission.

The engine's own rules only (ranges that make the sampler well defined); the stricter or different rules of
each wire format (TGI rejects `temperature=0`, OpenAI allows it) live in the API layer that builds these.
Knows nothing of HTTP, tokenizers or models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ValidationError

# numpy's Generator accepts any non-negative int; TGI's wire type is u64.
MAX_SEED = 2**64 - 1
# Counts and token ids are int32 in the engine's arrays; anything larger is a request error, never an overflow
# inside a batched step.
MAX_INT32 = 2**31 - 1
# Below this a temperature overflows float32 logits (x / T) into inf and NaN; vLLM raises such values to 0.01 too.
MIN_TEMPERATURE = 1e-2
# Above these the distribution is already flat (temperature) or the token already banned (penalty): larger values
# only reach float32's limits (inf / inf = NaN).
MAX_TEMPERATURE = 100.0
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
# OpenAI's ranges for the additive penalties and the logit bias (logits are O(10): +-100 already forces or bans).
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
# Per-token work on the engine thread grows with these (stop-string matching, penalty arrays), so one request's
# long lists would slow every request batched with it. 300 logit_bias entries is OpenAI's own limit.
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    # 0 means greedy: a true argmax over the (penalised) logits, no random draw at all.
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # nucleus over the whole vocabulary; 1 disables
    min_p: float = 0.0  # drop tokens below min_p * p(best token); 0 disables
    typical_p: float = 1.0  # locally typical sampling; 1 disables
    # HF/CTRL-style multiplicative penalty on every token seen in the prompt or the output.
    repetition_penalty: float = 1.0
    # OpenAI-style additive penalties on tokens already generated (not the prompt).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    min_new_tokens: int = 0  # EOS and stop token ids are suppressed until this many tokens exist
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # None: no logprobs; 0: the chosen token's logprob; n > 0: also the n most likely alternatives.
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, lo=0, hi=MAX_INT32)
        _check_float("temperature", self.temperature, lo=0.0, hi=MAX_TEMPERATURE)
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
        # top_k above the vocabulary size keeps every token (the sampler clamps it).
        _check_int("top_k", self.top_k, lo=0, hi=MAX_INT32)
        _check_float("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_float("typical_p", self.typical_p, lo=0.0, lo_open=True, hi=1.0)
        lo, hi = REPETITION_PENALTY_RANGE
        _check_float("repetition_penalty", self.repetition_penalty, lo=lo, hi=hi)
        _check_float("presence_penalty", self.presence_penalty, lo=PENALTY_RANGE[0], hi=PENALTY_RANGE[1])
        _check_float("frequency_penalty", self.frequency_penalty, lo=PENALTY_RANGE[0], hi=PENALTY_RANGE[1])
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=MAX_SEED)
        _check_int("min_new_tokens", self.min_new_tokens, lo=0, hi=MAX_INT32)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValidationError(
                f"`min_new_tokens` ({self.min_new_tokens}) must be <= `max_new_tokens` ({self.max_new_tokens})",
                param="min_new_tokens",
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValidationError(f"`stop` sequences must be non-empty strings, got {s!r}", param="stop")
            if len(s) > MAX_STOP_CHARS:
                raise ValidationError(f"`stop` sequences must be at most {MAX_STOP_CHARS} characters, got {len(s)}",
                                      param="stop")
        _check_count("stop_token_ids", self.stop_token_ids, MAX_STOP_TOKEN_IDS)
        _check_count("logit_bias", self.logit_bias, MAX_LOGIT_BIAS)
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0, hi=MAX_INT32)
        for tok, bias in self.logit_bias:
            _check_int("logit_bias", tok, lo=0, hi=MAX_INT32)
            _check_float("logit_bias", bias, lo=LOGIT_BIAS_RANGE[0], hi=LOGIT_BIAS_RANGE[1])
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=MAX_INT32)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_INT32)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_filtering(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0 or self.typical_p < 1.0


def _check_count(name: str, items: tuple, most: int) -> None:
    if len(items) > most:
        raise ValidationError(f"`{name}` takes at most {most} entries, got {len(items)}", param=name)


def _check_int(name: str, value: object, *, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"`{name}` must be an integer, got {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValidationError(f"`{name}` must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}", param=name)


def _check_float(
    name: str, value: object, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(f"`{name}` must be a finite number, got {value!r}", param=name)
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    if too_low or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        upper = hi if hi is not None else "inf"
        raise ValidationError(f"`{name}` must be in {left}{lo}, {upper}], got {value}", param=name)
