"""Client-observed throughput and time to first token through gRPC, against the engine in-process.

Both sides run the same roles (in-process backend: the router's only extra work is gRPC,
protobuf and its own event loop), at 1 and 16 concurrent streams, plain and speculative.
Configurations are interleaved round by round and the table reports medians: read the
ratio column (gRPC / in-process), not absolute numbers.

  python bench/bench_grpc.py              # synthetic tiny family (as bench_engine.py)
  python bench/bench_grpc.py --family     # the embedded family (eft family build)
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

import torch

from bench_engine import bench_models, bench_prompts, concurrency_parser
from eft_router.server.client import AsyncEFTClient
from eft_router.engine import Engine
from eft_router.server.config import RouterConfig
from eft_router.server.grpc_server import Router, RouterThread
from eft_router.core.spec import SamplingParams, SpeculativeParams


async def run_engine(engine: Engine, prompts: list[list[int]], k: int, max_tokens: int) -> tuple[int, list[float]]:
    """Tokens generated and each stream's time to first token, all streams at once."""

    async def one(ids: list[int]) -> tuple[int, float]:
        started, first, n = time.perf_counter(), None, 0
        sampling = SamplingParams(temperature=0.0, max_new_tokens=max_tokens, ignore_eos=True)
        async for chunk in engine.stream(ids, sampling=sampling, speculative=SpeculativeParams(k=k)):
            first = first or time.perf_counter() - started
            n += len(chunk.token_ids)
        return n, first

    results = await asyncio.gather(*(one(p) for p in prompts))
    return sum(n for n, _ in results), [t for _, t in results]


async def run_grpc(target: str, prompts: list[list[int]], k: int, max_tokens: int) -> tuple[int, list[float]]:
    async with AsyncEFTClient(target, timeout=600) as client:

        async def one(ids: list[int]) -> tuple[int, float]:
            started, first, n = time.perf_counter(), None, 0
            async for chunk in client.stream(ids, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, k=k):
                first = first or time.perf_counter() - started
                n += len(chunk.token_ids)
            return n, first

        results = await asyncio.gather(*(one(p) for p in prompts))
    return sum(n for n, _ in results), [t for _, t in results]


def main() -> None:
    args = concurrency_parser(__doc__, "streams", [1, 16]).parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.local(bench_models(args.family, tmp))
        prompts = bench_prompts(engine, args.family)

        async def make() -> Router:
            return Router(Engine(engine.roles, engine.tokenizer), RouterConfig(port=0, max_concurrent_requests=256))

        with RouterThread(make) as router:
            target = f"localhost:{router.port}"
            configs = [(path, n, k) for n in args.streams for k in (0, args.k) for path in ("in-process", "gRPC")]
            samples: dict[tuple, list[tuple[float, float]]] = {c: [] for c in configs}
            for _ in range(args.rounds):
                for path, n, k in configs:
                    batch = [prompts[i % len(prompts)] for i in range(n)]
                    started = time.perf_counter()
                    if path == "gRPC":
                        tokens, ttfts = asyncio.run(run_grpc(target, batch, k, args.max_tokens))
                    else:
                        tokens, ttfts = asyncio.run(run_engine(engine, batch, k, args.max_tokens))
                    samples[(path, n, k)].append((tokens / (time.perf_counter() - started), statistics.median(ttfts)))

    def med(c: tuple, i: int) -> float:
        return statistics.median(s[i] for s in samples[c])

    print(f"{'family' if args.family else 'synthetic'} roles, {args.max_tokens} tokens per stream, greedy, medians of {args.rounds} rounds")
    print(f"{'streams':>7} {'mode':>12} {'in-process tok/s':>17} {'gRPC tok/s':>11} {'ratio':>6} {'TTFT in-proc ms':>16} {'TTFT gRPC ms':>13}")
    for n in args.streams:
        for k in (0, args.k):
            local, remote = ("in-process", n, k), ("gRPC", n, k)
            mode = "plain" if k == 0 else f"spec k={k}"
            print(
                f"{n:>7} {mode:>12} {med(local, 0):>17.0f} {med(remote, 0):>11.0f} {med(remote, 0) / med(local, 0):>6.2f} "
                f"{1000 * med(local, 1):>16.1f} {1000 * med(remote, 1):>13.1f}"
            )


if __name__ == "__main__":
    main()
