"""The engine's state of one request between steps.

A request's context grows by its accepted tokens; ``prefilled`` tracks how much of its prompt
the roles have been fed, for chunked prefill. Results leave through ``outbox`` (an asyncio
queue the caller's stream reads): chunks, then the end (None), or the exception that ended it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from ..core.spec import CombinationPlan
from ..core.stopping import StopChecker
from ..roles.interface import Draft, DraftParams
from .request import GenerationRequest, GenerationStats, ScoreRequest

END = None  # the outbox's last item after a clean finish


@dataclass(eq=False)
class RequestState:
    session_id: str
    context: list[int]
    plan: CombinationPlan
    roles: tuple[str, ...]  # every role the request touches: its plan's, and its drafter
    prefill_end: int  # the prompt's end: feeding up to here is prefill, chunked if long
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    prefilled: int = 0
    cancelled: bool = False
    finished: bool = False

    @property
    def done(self) -> bool:
        return self.cancelled or self.finished

    def block_tokens(self) -> int:
        """Tokens a decode block feeds beyond the prompt (the scheduler's budget)."""
        return 0

    def finish(self, error: BaseException | None = None) -> None:
        if not self.finished:
            self.finished = True
            self.outbox.put_nowait(END if error is None else error)


@dataclass(eq=False)
class GenerationState(RequestState):
    request: GenerationRequest | None = None
    drafter: str | None = None
    draft: DraftParams = field(default_factory=DraftParams)
    generator: torch.Generator | None = None
    stops: StopChecker | None = None
    stats: GenerationStats | None = None
    tv_role: str | None = None  # whose distribution diagnostics compare with the target
    block_k: int | None = None  # adaptive speculation: the current block size (None: k)
    # overlapped speculation: the next block's drafts, drafted while the last block was
    # verified; ``ahead_full``: the drafter drafted all it was asked (else it stopped unsure)
    ahead: Draft | None = None
    ahead_full: bool = False

    def next_k(self) -> int:
        """The next block's drafts: speculative k (adaptive: the current block size), but
        never past ``max_new_tokens`` (the block's last token is always the target's own)."""
        if self.drafter is None:
            return 0
        return max(0, min(self._block_size(), self._left() - 1))

    def ahead_k(self, drafts: int) -> int:
        """Overlapped speculation: the tokens to draft past a block of ``drafts`` while it is
        verified: the block size plus the one verified at this block's bonus position, but no
        more than the next block can emit within ``max_new_tokens`` (0 without ``overlap``)."""
        if self.drafter is None or not self.request.speculative.overlap:
            return 0
        return max(0, min(self._block_size() + 1, self._left() - drafts - 1))

    def _left(self) -> int:
        return self.request.sampling.max_new_tokens - len(self.stops.token_ids)

    def _block_size(self) -> int:
        return self.request.speculative.k if self.block_k is None else self.block_k

    def adapt(self, drafted: int, accepted: int) -> None:
        """After a block: the adaptive block size grows by 2 when every draft was accepted and
        shrinks by 1 otherwise, within [1, k] (a block cut short by max_new_tokens or by the
        drafter's confidence counts as drafted)."""
        speculative = self.request.speculative
        if not speculative.adaptive or drafted == 0:
            return
        current = self._block_size()
        self.block_k = min(speculative.k, current + 2) if accepted == drafted else max(1, current - 1)

    def block_tokens(self) -> int:
        return self.next_k() + 1


@dataclass(eq=False)
class ScoreState(RequestState):
    request: ScoreRequest | None = None
    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per role, as chunks return them
