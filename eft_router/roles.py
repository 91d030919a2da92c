"""The one interface between the decoder and a role model, whatever runs it.

The in-process backend (:mod:`eft_router.local`) and the Ray Serve backend implement it;
the decoder sees nothing else, so both give identical results. Every call carries the
session id and the *full* token ids: a replica that never saw the session (or evicted it)
recomputes the prefix, so correctness never depends on routing or cache state.

A role may set ``inline = True`` when its calls compute without ever suspending (the
in-process backend): the decoder then awaits the roles' calls one after another instead
of running them as concurrent tasks, which would only add overhead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Protocol, Sequence, runtime_checkable

import torch

from .spec import SamplingParams


@dataclass(frozen=True)
class RoleInfo:
    """What the decoder must know about a role before it sends work."""

    name: str
    model: str
    vocab_size: int  # the shared tokenizer's length, after trimming padded embedding rows
    context_length: int


@dataclass(frozen=True)
class Draft:
    """``tokens``: up to k tokens sampled from the drafter's own sampling distribution
    (fewer when one is a stop token); ``logprobs``: its raw log-softmax rows for the
    positions after each of them and the one before, ``[len(tokens) + 1, V]``."""

    tokens: list[int]
    logprobs: torch.Tensor


@runtime_checkable
class Role(Protocol):
    info: RoleInfo

    async def score(self, session_id: str, token_ids: Sequence[int], start: int) -> torch.Tensor:
        """Log-probs ``[len(token_ids) - start + 1, V]``: row i is the distribution of the
        token at position ``start + i`` given ``token_ids[:start + i]``."""
        ...

    async def draft(
        self, session_id: str, token_ids: Sequence[int], k: int, sampling: SamplingParams, uniforms: Sequence[float],
        stop_ids: Collection[int] = (), confidence: float = 0.0,
    ) -> Draft:
        """Sample k tokens after ``token_ids`` (inverse CDF on ``uniforms``), one per step,
        ending early after a token in ``stop_ids`` (nothing after a stop is ever emitted,
        so drafting past it would only cost forward passes) and before a position whose
        most likely token has probability below ``confidence``."""
        ...

    async def release(self, session_id: str) -> None:
        """Drop the session's cache; unknown sessions are ignored."""
        ...
