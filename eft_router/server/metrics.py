"""Prometheus metrics of the router, and a :class:`Role` wrapper that times role calls.

Each router has its own registry (several routers in one process, as in the tests, do not
collide); ``RouterConfig.metrics_port`` serves it over HTTP for Prometheus to scrape.
"""

from __future__ import annotations

import time
from typing import Awaitable, Sequence, TypeVar

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..roles.interface import Draft, DraftItem, Role, ScoreItem, backend_name

T = TypeVar("T")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The router's metrics: requests by method and status, tokens, time to first token,
    per-role call latency, speculative drafts and acceptances, active sessions, and the
    scheduler's steps (their duration and how many requests shared them)."""

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
        self.step_seconds = Histogram("eft_step_seconds", "Duration of one engine step", buckets=_LATENCY_BUCKETS, registry=r)
        self.step_requests = Histogram(
            "eft_step_requests", "Requests advanced by one engine step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.waiting = Gauge("eft_waiting_requests", "Requests queued for admission to the engine", registry=r)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A metric's current value (0 when never observed): for tests and the demo."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


class TimedRole:
    """A :class:`Role` that records each call's latency in ``metrics`` and otherwise is ``role``."""

    def __init__(self, role: Role, metrics: Metrics) -> None:
        self.role = role
        self.info = role.info
        self.infos = role.infos
        # a co-served group's calls carry all its roles' items: labelled by all of them
        self._timers = {call: metrics.role_latency.labels(backend_name(role), call) for call in ("score", "draft", "release")}

    async def _timed(self, call: str, result: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await result
        finally:
            self._timers[call].observe(time.perf_counter() - started)

    async def score(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        return await self._timed("score", self.role.score(items))

    async def draft(self, items: Sequence[DraftItem]) -> list[Draft]:
        return await self._timed("draft", self.role.draft(items))

    async def release(self, session_ids: Sequence[str]) -> None:
        await self._timed("release", self.role.release(session_ids))

    async def probe(self, timeout_s: float) -> None:
        await self.role.probe(timeout_s)
