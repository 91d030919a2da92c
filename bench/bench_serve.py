"""Aggregate throughput of the step engine, in-process and through Ray Serve, side by side.

One run starts a private local Ray, deploys base_large, base_small and ft_small as Serve
deployments (``services.launch.family_config``: one replica per role) and loads the same
three models in this process. For each number of concurrent streams and each mode (plain
EFT, speculative k = 4, and the other k of ``--ks``, to find the best), both backends serve
the same pool of greedy requests (``max(8, 2 x streams)`` requests, ``--max-tokens`` new
tokens each, EOS ignored), through the same engine code. Configurations run once per round,
rounds interleaved; the tables report medians over rounds: read the ratios, not absolute
numbers (the machine is shared and noisy).

Beside tokens/s:

* the compute bound: tokens over the time the roles spent inside their forward passes
  (summed over roles, read from the workers: in-process directly, on Serve from the
  replicas' stats), so the gap to it is the engine's, the threads' and the transport's cost;
* p50 and p99 time per output token (a request's time after its first token over its
  tokens after the first);
* the ratios the continuous-batching issue sets targets for: 16 (and 64) streams over one,
  and Serve over in-process.

  python bench/bench_serve.py               # synthetic tiny family
  python bench/bench_serve.py --family      # the embedded family (eft family build)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import torch

from bench_engine import ROLES, bench_models, bench_prompts
from load import Load, run_streams
from eft_router.core.spec import SamplingParams, SpeculativeParams
from eft_router.engine import Engine, GenerationRequest
from eft_router.roles.interface import backends
from eft_router.roles.serve import SERVE_FLAG, aconnect_serve_roles


async def forward_seconds(engine: Engine) -> float:
    """Seconds all roles have spent inside forward passes so far (every replica on Serve)."""
    total = 0.0
    for role in backends(engine.roles):  # a co-served group once
        if hasattr(role, "worker"):
            total += role.worker.forward_seconds
        else:
            total += sum(st["forward_seconds"] for st in (await role.replica_stats()).values())
    return total


async def measure(engine: Engine, prompts: list[list[int]], streams: int, k: int, max_tokens: int) -> tuple[Load, float]:
    """One configuration: the load's figures and the seconds spent inside forward passes."""
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_tokens, ignore_eos=True)
    requests = [GenerationRequest(prompts[i % len(prompts)], sampling=sampling, speculative=SpeculativeParams(k=k)) for i in range(max(8, 2 * streams))]

    async def stream(request: GenerationRequest):
        async for chunk in engine.stream(request):
            yield chunk.token_ids

    before = await forward_seconds(engine)
    load = await run_streams(stream, requests, streams)
    return load, await forward_seconds(engine) - before


async def bench(paths: dict[str, str], args: argparse.Namespace) -> None:
    local = Engine.local(paths)
    engines = {"in-process": local, "Serve": Engine(await aconnect_serve_roles(list(ROLES)), local.tokenizer)}
    prompts = bench_prompts(local, args.family)
    ks = sorted({0, 4, *args.ks})
    configs = [(n, k, path) for n in args.streams for k in ks for path in engines]
    for n, k, path in configs:  # warm-up: first calls, caches, code paths
        await measure(engines[path], prompts, min(n, 4), k, 4)
    samples: dict[tuple, list[tuple[Load, float]]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for n, k, path in configs:
            samples[(n, k, path)].append(await measure(engines[path], prompts, n, k, args.max_tokens))

    def med(c: tuple, read) -> float:
        return statistics.median(read(load, fwd) for load, fwd in samples[c])

    tps = {c: med(c, lambda load, _: load.tokens_per_s) for c in configs}
    bound = {c: med(c, lambda load, fwd: load.tokens / fwd) for c in configs}
    p50 = {c: med(c, lambda load, _: load.tpot_ms(0.5)) for c in configs}
    p99 = {c: med(c, lambda load, _: load.tpot_ms(0.99)) for c in configs}
    best = {(n, path): max((k for k in ks if k), key=lambda k: tps[(n, k, path)]) for n in args.streams for path in engines}

    print(f"{'family' if args.family else 'synthetic'} roles ({', '.join(ROLES)}), {args.max_tokens} tokens per request, "
          f"greedy, max(8, 2 x streams) requests per configuration, medians of {args.rounds} rounds")
    print()
    print(f"{'streams':>7} {'mode':>9} | {'in-process':>10} {'bound':>7} {'p50 ms':>7} {'p99 ms':>7} | "
          f"{'Serve':>7} {'bound':>7} {'p50 ms':>7} {'p99 ms':>7} | {'Serve/in-proc':>13}")
    for n in args.streams:
        for k in ks:
            mode = "plain" if k == 0 else f"k={k}"
            cells = []
            for path in engines:
                c = (n, k, path)
                star = "*" if k and best[(n, path)] == k else " "
                cells.append(f"{tps[c]:>9.0f}{star} {bound[c]:>7.0f} {p50[c]:>7.1f} {p99[c]:>7.1f}")
            ratio = tps[(n, k, "Serve")] / tps[(n, k, "in-process")]
            print(f"{n:>7} {mode:>9} | {cells[0]} | {cells[1]} | {ratio:>13.2f}")
    print("(* the best k at that stream count; bound: tokens over the seconds inside the roles' forward passes)")
    print()
    lo, hi = min(args.streams), max(args.streams)
    print("scaling (tokens/s at N streams over 1 stream, same mode and backend):")
    for path in engines:
        for k in (0, 4):
            row = ", ".join(f"{n}: {tps[(n, k, path)] / tps[(lo, k, path)]:.1f}x" for n in args.streams if n != lo)
            print(f"  {path:>10} {'plain' if k == 0 else f'k={k}':>6}  {row}")
        row = ", ".join(f"{n}: {tps[(n, best[(n, path)], path)] / tps[(lo, best[(lo, path)], path)]:.1f}x" for n in args.streams if n != lo)
        print(f"  {path:>10} {'best k':>6}  {row}")
    for n in (lo, 16 if 16 in args.streams else hi):
        ratios = ", ".join(f"{'plain' if k == 0 else f'k={k}'} {tps[(n, k, 'Serve')] / tps[(n, k, 'in-process')]:.2f}" for k in (0, 4))
        print(f"Serve / in-process at {n} stream(s): {ratios}")
    for role in backends(engines["Serve"].roles):
        await role.close()  # its handle, on this loop (Serve's shutdown runs after the loop closes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="store_true", help="the embedded family instead of the synthetic one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8], help="speculative k besides 4 (the best is marked)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault(SERVE_FLAG, "1")  # as `eft serve` runs Serve; before Ray starts

    from ray import serve

    from services.app import deploy_ensemble
    from services.launch import family_config, ray_session

    with tempfile.TemporaryDirectory() as tmp:
        paths = bench_models(args.family, tmp)
        started = time.perf_counter()
        with ray_session(None):
            serve.start(proxy_location="Disabled")
            deploy_ensemble(family_config(paths))
            print(f"Ray started and {len(ROLES)} roles deployed in {time.perf_counter() - started:.0f} s", flush=True)
            asyncio.run(bench(paths, args))


if __name__ == "__main__":
    main()
