"""Time to first token and tokens/s through each front door, side by side in one run:
the engine in-process, gRPC streaming (``AsyncEFTClient``) and OpenAI-compatible HTTP
streaming (the official ``openai`` client's ``AsyncOpenAI``, completions with token-id
prompts and ``return_token_ids``; and the same requests read as raw lines), at 1 and 16
concurrent streams, plain and speculative.

All run over the same models: the engine in this process, and the router as a process of
its own (``eft serve --in-process`` on the same model paths), as a user runs it, so that
the clients' own work (protobuf, or the ``openai`` client's httpx and pydantic objects)
does not share the server's interpreter. It still shares the machine's cores, so the
second table gives the server's and the clients' CPU time per token: the fronts' own costs
(protobuf and gRPC, or JSON, server-sent events and uvicorn) are the server column, and raw
HTTP shows the server's speed without the ``openai`` client's share. Configurations are
interleaved round by round and the tables report medians: read the ratios (HTTP / gRPC,
the issue's target is at least 0.9), not absolute numbers.

  python bench/bench_fronts.py              # synthetic tiny family (as bench_engine.py)
  python bench/bench_fronts.py --family     # the embedded family (eft family build)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import httpx2
import openai
import psutil
import torch
import yaml

from bench_engine import bench_models, bench_prompts, concurrency_parser
from load import Load, run_streams, serve_process
from eft_router.core.spec import SamplingParams, SpeculativeParams
from eft_router.engine import Engine, GenerationRequest
from eft_router.server.client import AsyncEFTClient

FRONTS = ("in-process", "gRPC", "HTTP", "raw HTTP")
Stream = Callable[[list[int]], AsyncIterator[Sequence[int]]]


def engine_stream(engine: Engine, k: int, max_tokens: int) -> Stream:
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_tokens, ignore_eos=True)

    async def stream(ids: list[int]) -> AsyncIterator[Sequence[int]]:
        async for chunk in engine.stream(GenerationRequest(ids, sampling=sampling, speculative=SpeculativeParams(k=k))):
            yield chunk.token_ids

    return stream


def grpc_stream(client: AsyncEFTClient, k: int, max_tokens: int) -> Stream:
    async def stream(ids: list[int]) -> AsyncIterator[Sequence[int]]:
        async for chunk in client.stream(ids, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, k=k):
            yield chunk.token_ids

    return stream


def http_extra(k: int) -> dict:
    return {"speculative": {"k": k}, "ignore_eos": True, "return_token_ids": True}


def http_stream(client: openai.AsyncOpenAI, k: int, max_tokens: int) -> Stream:
    async def stream(ids: list[int]) -> AsyncIterator[Sequence[int]]:
        chunks = await client.completions.create(model="eft", prompt=ids, temperature=0.0, max_tokens=max_tokens, stream=True, extra_body=http_extra(k))
        async for chunk in chunks:
            yield chunk.choices[0].model_extra["token_ids"]

    return stream


def raw_http_stream(client: httpx2.AsyncClient, k: int, max_tokens: int) -> Stream:
    """The same request and events as :func:`http_stream`, read as lines and ``json.loads``
    (what a curl script or a thin client does): the server's cost without the ``openai``
    client's pydantic objects, which share this machine's cores with the server."""

    async def stream(ids: list[int]) -> AsyncIterator[Sequence[int]]:
        body = {"model": "eft", "prompt": ids, "temperature": 0.0, "max_tokens": max_tokens, "stream": True, **http_extra(k)}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    yield json.loads(line[6:])["choices"][0]["token_ids"]

    return stream


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of this process, or of process ``pid``."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def bench(engine: Engine, server: int, ports: tuple[int, int], prompts: list[list[int]], args) -> tuple[dict[tuple, list[Load]], dict[tuple, list[tuple[float, float]]]]:
    """Loads per configuration, and per configuration the server's and this process's CPU
    milliseconds per token (the clients' share of the cores)."""
    grpc_client = AsyncEFTClient(f"localhost:{ports[0]}", timeout=600)
    http_client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ports[1]}/v1", api_key="unused", max_retries=0, timeout=600)
    raw_client = httpx2.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}", timeout=600, limits=httpx2.Limits(max_connections=None))
    makers = {
        "in-process": lambda k: engine_stream(engine, k, args.max_tokens),
        "gRPC": lambda k: grpc_stream(grpc_client, k, args.max_tokens),
        "HTTP": lambda k: http_stream(http_client, k, args.max_tokens),
        "raw HTTP": lambda k: raw_http_stream(raw_client, k, args.max_tokens),
    }
    configs = [(n, k, front) for n in args.streams for k in (0, args.k) for front in FRONTS]
    for n, k, front in configs:  # warm-up: connections, first calls, code paths
        await run_streams(makers[front](k), prompts[:2], min(n, 2))
    samples: dict[tuple, list[Load]] = {c: [] for c in configs}
    cpu: dict[tuple, list[tuple[float, float]]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for n, k, front in configs:
            requests = [prompts[i % len(prompts)] for i in range(max(8, 2 * n))]
            before = cpu_seconds(server), cpu_seconds()
            load = await run_streams(makers[front](k), requests, n)
            samples[(n, k, front)].append(load)
            cpu[(n, k, front)].append(((cpu_seconds(server) - before[0]) * 1e3 / load.tokens, (cpu_seconds() - before[1]) * 1e3 / load.tokens))
    await grpc_client.close()
    await http_client.close()
    await raw_client.aclose()
    return samples, cpu


def main() -> None:
    args = concurrency_parser(__doc__, "streams", [1, 16]).parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = bench_models(args.family, tmp)
        engine = Engine.local(paths)
        prompts = bench_prompts(engine, args.family)
        config = Path(tmp) / "fronts.yaml"
        config.write_text(yaml.safe_dump({"roles": {r: {"model": p} for r, p in paths.items()}, "router": {"max_concurrent_requests": 256}}))
        # one thread, as the in-process engine here
        with serve_process(["--in-process", "--config", str(config)], env={"OMP_NUM_THREADS": "1"}) as (proc, port, http_port):
            samples, cpu = asyncio.run(bench(engine, proc.pid, (port, http_port), prompts, args))

    def med(c: tuple, read: Callable[[Load], float]) -> float:
        return statistics.median(read(load) for load in samples[c])

    print(f"{'family' if args.family else 'synthetic'} roles, {args.max_tokens} tokens per request, greedy, "
          f"max(8, 2 x streams) requests per configuration, medians of {args.rounds} rounds")
    print(f"{'streams':>7} {'mode':>6} | " + " | ".join(f"{f + ' tok/s':>16} {'TTFT ms':>8}" for f in FRONTS)
          + f" | {'gRPC/in-proc':>12} {'HTTP/gRPC':>9} {'raw/gRPC':>8}")
    for n in args.streams:
        for k in (0, args.k):
            tps = {f: med((n, k, f), lambda x: x.tokens_per_s) for f in FRONTS}
            ttft = {f: med((n, k, f), lambda x: 1000 * statistics.median(x.ttft)) for f in FRONTS}
            cells = " | ".join(f"{tps[f]:>16.0f} {ttft[f]:>8.1f}" for f in FRONTS)
            mode = "plain" if k == 0 else f"k={k}"
            print(f"{n:>7} {mode:>6} | {cells} | {tps['gRPC'] / tps['in-process']:>12.2f} {tps['HTTP'] / tps['gRPC']:>9.2f} {tps['raw HTTP'] / tps['gRPC']:>8.2f}")
    remote = FRONTS[1:]
    print("\nCPU ms per token, server process / client process (the in-process engine is not a server):")
    print(f"{'streams':>7} {'mode':>6} | " + " | ".join(f"{f:>15}" for f in remote))
    for n in args.streams:
        for k in (0, args.k):
            cells = " | ".join(
                f"{statistics.median(c[0] for c in cpu[(n, k, f)]):>7.2f} / {statistics.median(c[1] for c in cpu[(n, k, f)]):<5.2f}" for f in remote
            )
            print(f"{n:>7} {'plain' if k == 0 else f'k={k}':>6} | {cells}")


if __name__ == "__main__":
    main()
