"""Concurrent streams over a pool of requests, as the benchmarks drive every front door.

``streams`` clients each take the next request of the pool when their last one ends, so the
engine always has ``streams`` requests in flight (fewer only as the pool runs dry). A stream
is anything that yields chunks of token ids: the engine's ``stream``, a gRPC or HTTP client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Sequence, TypeVar

import grpc

from eft_router.server.client import EFTClient

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_process(args: Sequence[str], env: dict[str, str] | None = None, within_s: float = 600) -> Iterator[tuple[subprocess.Popen, int, int]]:
    """``eft serve ARGS`` on free gRPC and HTTP ports, until it reports SERVING; yields the
    process and both ports, and stops it on exit."""
    port, http_port = free_port(), free_port()
    eft = Path(sys.executable).parent / "eft"
    cmd = [str(eft), "serve", *args, "--quiet", "--port", str(port), "--http-port", str(http_port)]
    log = tempfile.TemporaryFile("w+")  # not a pipe: a server that logs must never block on it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + within_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"eft serve exited: {log.read()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"eft serve did not become SERVING within {within_s:.0f} s")
            try:
                with EFTClient(f"localhost:{port}") as client:
                    if client.health(timeout=2) == "SERVING":
                        break
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        yield proc, port, http_port
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
