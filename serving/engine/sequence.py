"""A request's token sequence as the scheduler sees it: ids, status, KV slot and progress.

Knows token ids and sampling parameters; nothing of text, tensors, threads or asyncio.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no slot
    PREFILLING = "prefilling"  # holds a slot, prompt partly in the KV cache
    RUNNING = "running"  # prompt cached, decoding one token per step
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos_token"
    STOP = "stop_sequence"  # a stop string matched
    STOP_TOKEN = "stop_token"  # a stop token id was generated
    ABORTED = "aborted"  # the client went away
    TIMEOUT = "queue_timeout"
    ERROR = "error"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    # Tokens whose K/V are in the slot: positions [0, num_cached). A running sequence feeds its last token next.
    num_cached: int = 0
    # Prompt tokens found in the prefix cache (their K/V copied or reused, not computed).
    num_cached_prompt: int = 0
    finish_reason: FinishReason | None = None
    group: int = 0  # the scheduler's `add` call that queued it: a request's sequences start together
    queued_step: int = 0  # the scheduler's step count when it was queued
    # Sampling state: the seed actually used (reported to clients) and this request's own generator.
    seed: int | None = None
    rng: np.random.Generator | None = None
    # Timestamps (time.monotonic) for metrics and timing headers.
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        assert self.prompt_ids, "a sequence needs at least one prompt token"

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def score_only(self) -> bool:
        """Only the prompt is evaluated (scoring, echo with max_tokens=0): no token is generated."""
        return self.params.max_new_tokens == 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def prefill_remaining(self) -> int:
        return self.num_prompt - self.num_cached
