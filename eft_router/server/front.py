"""What the router's front doors (gRPC and the OpenAI HTTP API) share: one concurrency limit,
one classification of failures, one way of counting a finished generation.

Each front maps a :class:`Failure` to its own wire form (a gRPC status, an HTTP status and
OpenAI error body), so a request means and fails the same whichever door it came through.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from ..core.spec import SpecError
from ..engine import GenerationStats, QueueFull
from ..roles.interface import RoleError
from .metrics import Metrics

log = logging.getLogger(__name__)

Kind = Literal["invalid", "overloaded", "unavailable", "internal"]


class Overloaded(Exception):
    """The router is at its limit of concurrent requests."""


class Admission:
    """The router's one limit of concurrent requests, across its front doors."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self.in_flight = 0

    def enter(self) -> None:
        """Admit one request, or raise :class:`Overloaded`."""
        if self.in_flight >= self.limit:
            raise Overloaded(f"the server is at its limit of {self.limit} concurrent requests; retry later")
        self.in_flight += 1
        self.metrics.active.inc()

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.active.dec()


@dataclass(frozen=True)
class Failure:
    """Why a request failed, in the fronts' common terms; ``field``: the engine's dotted name
    of the bad field (``sampling.top_p``), for ``invalid``."""

    kind: Kind
    message: str
    field: str | None = None


def classify(err: Exception, where: str) -> Failure:
    """A bad field, a full server or queue, an unreachable or failing role, or a bug (logged
    with its traceback: it should never happen)."""
    if isinstance(err, SpecError):
        return Failure("invalid", err.message, err.field)
    if isinstance(err, (Overloaded, QueueFull)):
        return Failure("overloaded", str(err))
    if isinstance(err, RoleError):
        log.warning("%s: %s", where, err)
        return Failure("unavailable", str(err))
    log.exception("%s failed", where, exc_info=err)
    return Failure("internal", f"internal error: {type(err).__name__}: {err}")


def record(metrics: Metrics, stats: GenerationStats) -> None:
    """Count a finished generation's tokens and speculation."""
    metrics.tokens.inc(stats.generated_tokens)
    if stats.drafted_tokens:
        metrics.drafted.inc(stats.drafted_tokens)
        metrics.accepted.inc(stats.accepted_tokens)
        metrics.acceptance.observe(stats.acceptance_rate)
