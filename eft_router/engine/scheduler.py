"""Which requests run in the next step, and what each of them does in it.

First come, first served, like vLLM's scheduler: the running requests go first, oldest
first, each with its next decode block; then waiting requests are admitted in arrival order
while fewer than ``max_running`` run and the step's token budget
(``max_num_batched_tokens``) has room. A prompt that does not fit the rest of the budget is
prefilled in chunks over several steps; its first block runs in the step that feeds the end
of its prompt. Decode blocks of running requests are never held back by the budget (only
prefill waits), so a long prompt arriving cannot stall the streams already under way.
Requests that finished or were cancelled leave at the start of the step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

from .state import RequestState


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_num_seqs``: most requests running at once (also bounded by the roles' KV slots);
    ``max_num_batched_tokens``: the tokens one step feeds the roles, decode blocks plus
    prefill chunks; ``max_queued_requests``: most requests waiting for admission (beyond it
    :class:`QueueFull`)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_queued_requests: int = 256

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


class QueueFull(RuntimeError):
    """The engine's queue of waiting requests is at ``max_queued_requests``."""


@dataclass(frozen=True)
class Work:
    """One request's part of a step: feed its context from ``start`` up to ``end``;
    ``block``: then run its next decode block (draft, verify, accept), or finish its score."""

    request: RequestState
    start: int
    end: int
    block: bool


@dataclass(frozen=True)
class StepPlan:
    work: list[Work]
    leaving: list[RequestState]  # their sessions are released on every role they touched


class Scheduler:
    def __init__(self, config: SchedulerConfig, max_running: int) -> None:
        self.config = config
        self.max_running = min(config.max_num_seqs, max_running)
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []

    def __iter__(self) -> Iterator[RequestState]:
        yield from self.running
        yield from self.waiting

    def add(self, request: RequestState) -> None:
        """Queue ``request``; refused when ``max_queued_requests`` already wait beyond the
        running slots the next step can fill."""
        free = max(0, self.max_running - len(self.running))
        if len(self.waiting) >= self.config.max_queued_requests + free:
            raise QueueFull(
                f"the engine's queue is full ({self.config.max_queued_requests} requests waiting for one of "
                f"{self.max_running} running slots); retry later"
            )
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> StepPlan:
        leaving = [r for r in self.running if r.done]
        self.running = [r for r in self.running if not r.done]
        self.waiting = deque(r for r in self.waiting if not r.done)  # never reached a role
        budget = self.config.max_num_batched_tokens
        work = []
        for request in self.running:
            planned, budget = self._plan(request, budget, force=True)
            if planned is not None:
                work.append(planned)
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            planned, budget = self._plan(self.waiting[0], budget, force=False)
            if planned is None:
                break
            self.running.append(self.waiting.popleft())
            work.append(planned)
        return StepPlan(work, leaving)

    @staticmethod
    def _plan(request: RequestState, budget: int, force: bool) -> tuple[Work | None, int]:
        """``request``'s work within ``budget`` tokens (``force``: a running request's decode
        block goes ahead whatever the budget)."""
        start = request.prefilled
        remaining = request.prefill_end - start
        cost = remaining + request.block_tokens()
        block = Work(request, start, len(request.context), True)
        if (remaining <= 0 and force) or cost <= budget:
            request.prefilled = request.prefill_end
            return block, budget - cost
        if budget <= 0:
            return None, budget
        chunk = min(remaining - 1, budget)  # the prompt's last token is fed in the block's step
        if chunk <= 0:  # only that token is left: its block goes a little over the budget
            request.prefilled = request.prefill_end
            return block, budget - cost
        request.prefilled += chunk
        return Work(request, start, request.prefilled, False), budget - chunk
