"""Aggregate throughput of the step engine, in-process and through Ray Serve, side by side.

One run starts a private local Ray, deploys base_large, base_small and ft_small as Serve
deployments (``services.launch.family_config``: one replica per role) and loads the same
three models in this process. For each number of concurrent streams and each mode (plain
EFT, speculative k = 4, and the other k of ``--ks``, to find the best; with ``--overlap``
each k also with overlapped drafting, with ``--trees`` token trees at k = 4, with
``--perfect`` the perfect-drafter ceiling of bench_engine at k = 4, chained and overlapped), both backends serve the same pool of
requests (``max(8, 2 x streams)`` requests, ``--max-tokens`` new tokens each; greedy and
EOS ignored unless ``--temperature`` / ``--stop-at-eos``), through the same engine code. Configurations run once per round,
rounds interleaved; the tables report medians over rounds: read the ratios, not absolute
numbers (the machine is shared and noisy).

Beside tokens/s:

* the compute bound: tokens over the time the roles spent inside their forward passes
  (summed over roles, read from the workers: in-process directly, on Serve from the
  replicas' stats), so the gap to it is the engine's, the threads' and the transport's cost;
* p50 and p99 time per output token (a request's time after its first token over its
  tokens after the first);
* the ratios the continuous-batching issue sets targets for: 16 (and 64) streams over one,
  and Serve over in-process;
* with ``--overlap``, at one stream, the step-time model of overlapped drafting: a chain
  step costs drafting plus verifying, an overlapped one (after a fully accepted block) the
  longer of the two, measured from the engine's own call timings.

  python bench/bench_serve.py               # synthetic tiny family
  python bench/bench_serve.py --family      # the embedded family (eft family build)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from typing import Sequence

import torch

from bench_engine import PERFECT_DRAFTER, ROLES, bench_models, bench_prompts
from load import Load, run_streams
from eft_router.core.spec import EFTSpec, SamplingParams, SpeculativeParams
from eft_router.engine import Engine, GenerationRequest
from eft_router.roles.interface import backends
from eft_router.roles.serve import aconnect_serve_roles, use_serve_env


async def forward_seconds(engine: Engine) -> float:
    """Seconds all roles have spent inside forward passes so far (every replica on Serve)."""
    total = 0.0
    for role in backends(engine.roles):  # a co-served group once
        if hasattr(role, "worker"):
            total += role.worker.forward_seconds
        else:
            total += sum(st["forward_seconds"] for st in (await role.replica_stats()).values())
    return total


Mode = tuple[EFTSpec, SpeculativeParams]


def modes(
    ks: Sequence[int] = (), overlap: bool = False, trees: bool = False, perfect: bool = False, tree_confidence: float = 0.5,
    adaptive: bool = False,
) -> dict[str, Mode]:
    """The configurations compared: plain, a chain at k = 4 and at each of ``ks``, and the
    options asked for."""
    ks = sorted({4, *ks})
    out: dict[str, Mode] = {"plain": (EFTSpec(), SpeculativeParams())}
    out.update({f"k={k}": (EFTSpec(), SpeculativeParams(k=k)) for k in ks})
    if adaptive:
        out.update({f"adaptive k<={k}": (EFTSpec(), SpeculativeParams(k=k, adaptive=True)) for k in ks if k >= 4})
    if overlap:
        out.update({f"overlap k={k}": (EFTSpec(), SpeculativeParams(k=k, overlap=True)) for k in ks})
    if trees:
        for m in (2, 4):
            out[f"tree m={m} k=4"] = (EFTSpec(), SpeculativeParams(k=4, confidence=tree_confidence, tree_width=m))
        if overlap:
            out["tree m=2 overlap k=4"] = (EFTSpec(), SpeculativeParams(k=4, confidence=tree_confidence, tree_width=2, overlap=True))
    if perfect:
        out["perfect k=4"] = (PERFECT_DRAFTER, SpeculativeParams(k=4))
        if overlap:
            out["perfect overlap k=4"] = (PERFECT_DRAFTER, SpeculativeParams(k=4, overlap=True))
    return out


async def measure(engine: Engine, prompts: list[list[int]], streams: int, mode: Mode, sampling: SamplingParams) -> tuple[Load, float, dict]:
    """One configuration: the load's figures, the seconds spent inside forward passes, and
    the engine's steps and call timings over it."""
    eft, speculative = mode
    requests = [
        GenerationRequest(prompts[i % len(prompts)], eft=eft, sampling=replace(sampling, seed=i), speculative=speculative)
        for i in range(max(8, 2 * streams))
    ]

    drafts = [0, 0]  # drafted, accepted

    async def stream(request: GenerationRequest):
        async for chunk in engine.stream(request):
            if chunk.stats is not None:
                drafts[0] += chunk.stats.drafted_tokens
                drafts[1] += chunk.stats.accepted_tokens
            yield chunk.token_ids

    before, steps, calls, seconds = await forward_seconds(engine), engine.steps, engine.role_calls.copy(), engine.call_seconds.copy()
    load = await run_streams(stream, requests, streams)
    timing = {
        "steps": engine.steps - steps, "calls": engine.role_calls - calls, "seconds": engine.call_seconds - seconds,
        "drafted": drafts[0], "accepted": drafts[1],
    }
    return load, await forward_seconds(engine) - before, timing


def step_model(timing: dict, load: Load) -> str:
    """Measured milliseconds per step, per draft call and per call of the slowest verifier,
    and the two step times they predict: chain (draft + verify) and overlapped (the longer)."""
    calls, seconds = timing["calls"], timing["seconds"]
    per = {key: seconds[key] / n for key, n in calls.items() if n and key[1] != "release"}
    draft = max((t for (_, call), t in per.items() if call == "draft"), default=0.0)
    verify = max((t for (_, call), t in per.items() if call == "score"), default=0.0)
    step = load.seconds / max(1, timing["steps"])
    return (f"step {1e3 * step:.1f} ms; draft call {1e3 * draft:.1f}, slowest score call {1e3 * verify:.1f}: "
            f"chain model {1e3 * (draft + verify):.1f}, overlapped model {1e3 * max(draft, verify):.1f}")


async def bench(paths: dict[str, str], args: argparse.Namespace) -> None:
    local = Engine.local(paths)
    engines = {"in-process": local, "Serve": Engine(await aconnect_serve_roles(list(ROLES)), local.tokenizer)}
    prompts = bench_prompts(local, args.family)
    named = modes(args.ks, overlap=args.overlap, trees=args.trees, perfect=args.perfect, tree_confidence=args.tree_confidence, adaptive=args.adaptive)
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_tokens, ignore_eos=not args.stop_at_eos)
    configs = [(n, m, path) for n in args.streams for m in named for path in engines]
    for n, m, path in configs:  # warm-up: first calls, caches, code paths
        await measure(engines[path], prompts, min(n, 4), named[m], replace(sampling, max_new_tokens=4))
    samples: dict[tuple, list[tuple[Load, float, dict]]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for n, m, path in configs:
            samples[(n, m, path)].append(await measure(engines[path], prompts, n, named[m], sampling))

    def med(c: tuple, read) -> float:
        return statistics.median(read(load, fwd) for load, fwd, _ in samples[c])

    tps = {c: med(c, lambda load, _: load.tokens_per_s) for c in configs}
    bound = {c: med(c, lambda load, fwd: load.tokens / fwd) for c in configs}
    p50 = {c: med(c, lambda load, _: load.tpot_ms(0.5)) for c in configs}
    p99 = {c: med(c, lambda load, _: load.tpot_ms(0.99)) for c in configs}
    speculative = [m for m in named if m != "plain" and not m.startswith("perfect")]
    best = {(n, path): max(speculative, key=lambda m: tps[(n, m, path)]) for n in args.streams for path in engines}
    rates = {c: _acceptance(samples[c]) for c in configs}

    kind = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    print(f"{'family' if args.family else 'synthetic'} roles ({', '.join(ROLES)}), {args.max_tokens} tokens per request"
          f"{' at most (stopping at EOS)' if args.stop_at_eos else ''}, {kind}, max(8, 2 x streams) requests per configuration, "
          f"medians of {args.rounds} rounds")
    print()
    width = max(map(len, named))
    print(f"{'streams':>7} {'mode':>{width}} | {'in-process':>10} {'bound':>7} {'p50 ms':>7} {'p99 ms':>7} {'accept':>7} | "
          f"{'Serve':>7} {'bound':>7} {'p50 ms':>7} {'p99 ms':>7} {'accept':>7} | {'Serve/in-proc':>13} {'Serve/plain':>11}")
    for n in args.streams:
        for m in named:
            cells = []
            for path in engines:
                c = (n, m, path)
                star = "*" if best[(n, path)] == m else " "
                cells.append(f"{tps[c]:>9.0f}{star} {bound[c]:>7.0f} {p50[c]:>7.1f} {p99[c]:>7.1f} {rates[c]:>7}")
            ratio = tps[(n, m, "Serve")] / tps[(n, m, "in-process")]
            over_plain = tps[(n, m, "Serve")] / tps[(n, "plain", "Serve")]
            print(f"{n:>7} {m:>{width}} | {cells[0]} | {cells[1]} | {ratio:>13.2f} {over_plain:>10.2f}x")
    print("(* the best speculative mode at that stream count; bound: tokens over the seconds inside the roles' forward passes;"
          " accept: accepted over drafted tokens)")
    print()
    lo, hi = min(args.streams), max(args.streams)
    if hi > lo:
        print("scaling (tokens/s at N streams over 1 stream, same mode and backend):")
        for path in engines:
            for m in ("plain", "k=4"):
                row = ", ".join(f"{n}: {tps[(n, m, path)] / tps[(lo, m, path)]:.1f}x" for n in args.streams if n != lo)
                print(f"  {path:>10} {m:>6}  {row}")
            row = ", ".join(f"{n}: {tps[(n, best[(n, path)], path)] / tps[(lo, best[(lo, path)], path)]:.1f}x" for n in args.streams if n != lo)
            print(f"  {path:>10} {'best':>6}  {row}")
    for n in dict.fromkeys((lo, 16 if 16 in args.streams else hi)):
        ratios = ", ".join(f"{m} {tps[(n, m, 'Serve')] / tps[(n, m, 'in-process')]:.2f}" for m in ("plain", "k=4"))
        print(f"Serve / in-process at {n} stream(s): {ratios}")
    for m in named:
        if m.startswith("perfect"):
            ceiling = tps[(lo, m, "Serve")]
            print(f"Serve at {lo} stream(s), {m}: {ceiling / tps[(lo, 'plain', 'Serve')]:.2f}x plain; best speculative "
                  f"({best[(lo, 'Serve')]}) reaches {tps[(lo, best[(lo, 'Serve')], 'Serve')] / ceiling:.0%} of it")
    if args.overlap:
        print()
        print(f"step-time model at {lo} stream(s) (median round):")
        for path in engines:
            for m in named:
                if m != "plain":
                    load, _, timing = sorted(samples[(lo, m, path)], key=lambda s: s[0].tokens_per_s)[len(samples[(lo, m, path)]) // 2]
                    print(f"  {path:>10} {m:>{width}}: {step_model(timing, load)}")
    for role in backends(engines["Serve"].roles):
        await role.close()  # its handle, on this loop (Serve's shutdown runs after the loop closes)


def _acceptance(runs: list[tuple[Load, float, dict]]) -> str:
    drafted = sum(timing["drafted"] for _, _, timing in runs)
    return f"{sum(timing['accepted'] for _, _, timing in runs) / drafted:.3f}" if drafted else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="store_true", help="the embedded family instead of the synthetic one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8], help="speculative k besides 4 (the best is marked)")
    parser.add_argument("--overlap", action="store_true", help="also each k with overlapped drafting, and the step-time model")
    parser.add_argument("--perfect", action="store_true", help="also the perfect-drafter ceiling at k = 4")
    parser.add_argument("--adaptive", action="store_true", help="also adaptive block sizes, k at most 4 and each k of --ks above it")
    parser.add_argument("--trees", action="store_true", help="also token trees (m = 2, 4) at k = 4")
    parser.add_argument("--tree-confidence", type=float, default=0.5, help="where the tree rows branch")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--stop-at-eos", action="store_true", help="answers end at EOS (default: exactly --max-tokens)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    use_serve_env()  # as `eft serve` runs Serve; before Ray starts

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
