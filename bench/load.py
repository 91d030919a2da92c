"""Concurrent streams over a pool of requests, as the benchmarks drive every front door.

``streams`` clients each take the next request of the pool when their last one ends, so the
engine always has ``streams`` requests in flight (fewer only as the pool runs dry). A stream
is anything that yields chunks of token ids: the engine's ``stream``, a gRPC or HTTP client.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence, TypeVar

R = TypeVar("R")


@dataclass
class Load:
    """What ``streams`` concurrent streams got: tokens, wall time, and per request its time
    to first token and time per output token after the first."""

    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def tpot_ms(self, q: float) -> float:
        """The q-quantile of time per output token, in ms."""
        return 1000 * quantile(self.tpot, q)


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_streams(stream: Callable[[R], AsyncIterator[Sequence[int]]], requests: Sequence[R], streams: int) -> Load:
    """Run ``requests`` through ``stream`` with ``streams`` of them in flight at a time."""
    load = Load()
    pending = list(reversed(requests))

    async def client() -> None:
        while pending:
            request = pending.pop()
            started, first, last, n = time.perf_counter(), None, None, 0
            async for tokens in stream(request):
                if tokens:
                    last = time.perf_counter()
                    first = first or last
                    n += len(tokens)
            load.tokens += n
            if first is not None:
                load.ttft.append(first - started)
                if n > 1:
                    load.tpot.append((last - first) / (n - 1))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(streams)))
    load.seconds = time.perf_counter() - started
    return load


def median_of(loads: Sequence[Load], read: Callable[[Load], float]) -> float:
    return statistics.median(read(x) for x in loads)
