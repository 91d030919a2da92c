"""Prometheus metrics of the router, and a :class:`Role` wrapper that times role calls.

Each router has its own registry (several routers in one process, as in the tests, do not
collide); ``RouterConfig.metrics_port`` serves it over HTTP for Prometheus to scrape.
"""

from __future__ import annotations

import time
from typing import Awaitable, Collection, Sequence, TypeVar

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .roles import Draft, Role
from .spec import SamplingParams

T = TypeVar("T")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The router's metrics: requests by method and status, tokens, time to first token,
    per-role call latency, speculative drafts and acceptances, active sessions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("eft_requests", "Requests by method and final gRPC status", ["method", "code"], registry=r)
        self.tokens = Counter("eft_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("eft_time_to_first_token_seconds", "Time to the first streamed token", buckets=_LATENCY_BUCKETS, registry=r)
        self.role_latency = Histogram(
            "eft_role_call_seconds", "Latency of calls to a role", ["role", "call"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.drafted = Counter("eft_speculative_drafted_tokens", "Draft tokens proposed", registry=r)
        self.accepted = Counter("eft_speculative_accepted_tokens", "Draft tokens accepted (rate: accepted / drafted)", registry=r)
        self.acceptance = Histogram(
            "eft_speculative_acceptance_rate", "Per-request acceptance rate", buckets=[i / 10 for i in range(11)], registry=r
        )
        self.active = Gauge("eft_active_sessions", "Requests (sessions) in flight", registry=r)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A metric's current value (0 when never observed): for tests and the demo."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


class TimedRole:
    """A :class:`Role` that records each call's latency in ``metrics`` and otherwise is ``role``."""

    def __init__(self, role: Role, metrics: Metrics) -> None:
        self.role = role
        self.info = role.info
        self.inline = getattr(role, "inline", False)
        self._timers = {call: metrics.role_latency.labels(role.info.name, call) for call in ("score", "draft", "release")}

    async def _timed(self, call: str, result: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await result
        finally:
            self._timers[call].observe(time.perf_counter() - started)

    async def score(self, session_id: str, token_ids: Sequence[int], start: int) -> torch.Tensor:
        return await self._timed("score", self.role.score(session_id, token_ids, start))

    async def draft(
        self, session_id: str, token_ids: Sequence[int], k: int, sampling: SamplingParams, uniforms: Sequence[float],
        stop_ids: Collection[int] = (), confidence: float = 0.0,
    ) -> Draft:
        return await self._timed("draft", self.role.draft(session_id, token_ids, k, sampling, uniforms, stop_ids, confidence))

    async def release(self, session_id: str) -> None:
        await self._timed("release", self.role.release(session_id))
