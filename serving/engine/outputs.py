"""What the engine reports to a request's stream: tokens with logprobs, released text, and a final summary.

Plain data; knows nothing of HTTP wire formats (the API layer turns these into TGI or OpenAI payloads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ServingError
from .sequence import FinishReason


@dataclass
class TokenInfo:
    id: int
    logprob: float | None  # log-probability under the model (before penalties or temperature)
    special: bool = False
    top: list[tuple[int, float]] | None = None  # the n most likely (id, logprob) at this position


@dataclass
class FinalInfo:
    text: str  # the whole output text, cut at a stop string, special tokens skipped
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None
    # Seconds (time.monotonic differences): waiting for a slot, then prefill, then until the end.
    queue_time: float
    prefill_time: float
    inference_time: float
    total_time: float
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (OpenAI's usage.prompt_tokens_details)


@dataclass
class RequestOutput:
    """One event of a request's stream; the last one has `final` (or `error`) set."""

    request_id: str
    tokens: list[TokenInfo] = field(default_factory=list)
    text: str = ""  # text released by this event (held-back and stop text never appear)
    # With prompt logprobs requested, the first event carries them: one TokenInfo per prompt token (the first
    # token's logprob is None: nothing predicts it).
    prompt: list[TokenInfo] | None = None
    final: FinalInfo | None = None
    error: ServingError | None = None

    @property
    def finished(self) -> bool:
        return self.final is not None or self.error is not None
