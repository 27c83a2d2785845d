"""Hooks the engine calls as work happens; the default does nothing, the API's metrics module records them.

Called from the engine thread (and `on_rejected` from the event loop): implementations must be thread-safe.
Knows sequences and the scheduler's counters; nothing of Prometheus or HTTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scheduler import Scheduler
    from .sequence import Sequence


class EngineStats:
    def on_queue(self, scheduler: "Scheduler") -> None:
        """Waiting / running counts or slot usage may have changed."""

    def on_step(self, *, prefill_rows: int, prefill_tokens: int, decode_rows: int, step_time: float) -> None:
        """A step's pass ran: prompt chunks and decode tokens together (either may be empty)."""

    def on_prompt_tokens(self, n: int) -> None:
        """n prompt tokens were computed (prefilled)."""

    def on_prefix_cache(self, queries: int, hits: int) -> None:
        """Prompts looked up in the prefix cache: `queries` prompt tokens, of which `hits` were found."""

    def on_token(self, seq: "Sequence", now: float) -> None:
        """seq generated a token at `now`; seq.last_token_time is still the previous token's time (or None)."""

    def on_finish(self, seq: "Sequence") -> None:
        """seq finished (seq.finish_reason says how: a normal end, aborted, timed out or failed)."""

    def on_rejected(self, reason: str) -> None:
        """A request was refused before it was queued (e.g. "overloaded", "unavailable")."""
