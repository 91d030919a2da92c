"""The adapter ensemble against separate full models: tokens/s on both backends, and memory.

The small fine-tunes (``ft_small``, ``ft_small_safe``) as LoRA adapters co-served with
``base_small`` (one model, one deployment, each step's rows of the group in one forward
pass) against the same adapters merged into separate full models (three small models,
three deployments): the outputs are identical (tests/test_adapters.py), so the rows
compare serving costs only. Up-scaling (base_large + base_small + ft_small), plain and
speculative k = 4, greedy (with ``--overlap`` also k = 4 overlapped), at 1 and 16 streams,
in-process and through Ray Serve. Configurations run once per round, rounds interleaved;
medians. Memory: the weights (parameters and buffers) of the small group's model against
one small model and against three separate small models.

  python bench/bench_adapters.py              # synthetic: tiny base models, random LoRA adapters
  python bench/bench_adapters.py --family     # the embedded family's LoRA fine-tunes (eft family build)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench_engine import SYNTHETIC, bench_prompts
from bench_serve import measure, modes
from eft_router.core.spec import SamplingParams
from eft_router.roles.adapters import Adapter
from eft_router.roles.interface import backends
from eft_router.roles.local import load_local_roles
from eft_router.roles.serve import aconnect_serve_roles, use_serve_env
from eft_router.engine import Engine
from eft_router.tiny import build_tiny_family, merged_lora, tiny_lora

ADAPTER_ROLES = ("ft_small", "ft_small_safe")
ENSEMBLES = ("full models", "adapters")


def models(family: bool, tmp: str) -> tuple[dict[str, str], dict[str, Adapter], dict[str, str]]:
    """The roles with models of their own, the adapter roles, and the adapters merged."""
    if family:
        from eft_router.family.build import adapter_ensemble, build_family, family_dir

        build_family(quiet=True)
        full, adapters = adapter_ensemble(family_dir())
        full = {r: full[r] for r in ("base_large", "base_small")}
    else:
        full = build_tiny_family(tmp, [f"w{i}" for i in range(200)], {r: SYNTHETIC[r] for r in ("base_large", "base_small")})
        adapters = {r: Adapter(tiny_lora(full["base_small"], Path(tmp) / r, seed), "base_small") for seed, r in enumerate(ADAPTER_ROLES, 1)}
    merged = {r: merged_lora(full["base_small"], a.path, Path(tmp) / f"{r}-merged") for r, a in adapters.items()}
    return full, adapters, merged


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def memory_table(full: dict[str, str], adapters: dict[str, Adapter], merged: dict[str, str]) -> None:
    group, _ = load_local_roles({"base_small": full["base_small"]}, adapters=adapters)
    separate, _ = load_local_roles({"base_small": full["base_small"], **merged})
    one = weight_bytes(separate["base_small"].worker.model)
    grouped = weight_bytes(group["base_small"].group.worker.model)
    three = sum(weight_bytes(r.worker.model) for r in separate.values())
    print(f"memory of the small roles' weights: one small model {one / 1e6:.2f} MB; the group (base_small + "
          f"{len(adapters)} LoRA adapters) {grouped / 1e6:.2f} MB = {grouped / one:.2f}x one; "
          f"{len(separate)} separate small models {three / 1e6:.2f} MB = {three / one:.2f}x one")


def configs(family: bool, tmp: str) -> tuple[dict, dict, dict, dict]:
    full, adapters, merged = models(family, tmp)
    from services.config import EnsembleConfig

    def config(prefix: str, roles: dict) -> EnsembleConfig:
        opts = {"num_replicas": 1, "max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.25}}
        return EnsembleConfig.model_validate({"roles": {r: {**spec, **(opts if "model" in spec else {})} for r, spec in roles.items()}, "app_prefix": prefix})

    serve_configs = {
        "full models": config("full-", {**{r: {"model": p} for r, p in full.items()}, **{r: {"model": p} for r, p in merged.items()}}),
        "adapters": config("lora-", {**{r: {"model": p} for r, p in full.items()}, **{r: {"adapter": a.path, "base": a.base} for r, a in adapters.items()}}),
    }
    return full, adapters, merged, serve_configs


async def bench(full: dict, adapters: dict, merged: dict, serve_configs: dict, args: argparse.Namespace) -> None:
    local_full = Engine.local({**full, **merged})
    local_adapters = Engine(*load_local_roles(full, adapters=adapters))
    engines: dict[tuple[str, str], Engine] = {("in-process", "full models"): local_full, ("in-process", "adapters"): local_adapters}
    for name, config in serve_configs.items():
        roles = await aconnect_serve_roles(list(config.roles), app_prefix=config.app_prefix, served_by=config.served_by())
        engines[("Serve", name)] = Engine(roles, local_full.tokenizer)
    prompts = bench_prompts(local_full, args.family)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.max_tokens, ignore_eos=True)
    compared = modes(overlap=args.overlap)  # plain, k=4 and with --overlap "overlap k=4"
    cases = [(n, mode, path) for n in args.streams for mode in compared for path in engines]
    for n, mode, path in cases:  # warm-up
        await measure(engines[path], prompts, min(n, 4), compared[mode], replace(sampling, max_new_tokens=4))
    samples: dict[tuple, list[float]] = {c: [] for c in cases}
    calls: dict[tuple, list[float]] = {c: [] for c in cases}
    for _ in range(args.rounds):
        for n, mode, path in cases:
            load, _, timing = await measure(engines[path], prompts, n, compared[mode], sampling)
            samples[(n, mode, path)].append(load.tokens_per_s)
            calls[(n, mode, path)].append(sum(v for key, v in timing["calls"].items() if key[1] != "release") / timing["steps"])
    tps = {c: statistics.median(v) for c, v in samples.items()}
    per_step = {c: statistics.median(v) for c, v in calls.items()}
    print(f"{'family' if args.family else 'synthetic'}: up-scaling (base_large, base_small, ft_small), {args.max_tokens} tokens "
          f"per request, greedy, max(8, 2 x streams) requests per configuration, medians of {args.rounds} rounds")
    print()
    print(f"{'streams':>7} {'mode':>11} {'backend':>10} | {'full models':>11} {'adapters':>9} {'adapters/full':>13} | {'calls/step full':>15} {'adapters':>8}")
    for n in args.streams:
        for mode in compared:
            for backend in ("in-process", "Serve"):
                f, a = tps[(n, mode, (backend, "full models"))], tps[(n, mode, (backend, "adapters"))]
                cf, ca = per_step[(n, mode, (backend, "full models"))], per_step[(n, mode, (backend, "adapters"))]
                print(f"{n:>7} {mode:>11} {backend:>10} | {f:>11.0f} {a:>9.0f} {a / f:>13.2f} | {cf:>15.2f} {ca:>8.2f}")
    for (backend, _), engine in engines.items():
        if backend == "Serve":
            for role in backends(engine.roles):
                await role.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="store_true", help="the embedded family's LoRA fine-tunes instead of synthetic ones")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--overlap", action="store_true", help="also speculative k = 4 with overlapped drafting")
    args = parser.parse_args()
    torch.set_num_threads(1)
    use_serve_env()  # as `eft serve` runs Serve; before Ray starts

    from ray import serve

    from services.app import deploy_ensemble
    from services.launch import ray_session

    with tempfile.TemporaryDirectory() as tmp:
        full, adapters, merged, serve_configs = configs(args.family, tmp)
        memory_table(full, adapters, merged)
        started = time.perf_counter()
        with ray_session(None):
            serve.start(proxy_location="Disabled")
            for config in serve_configs.values():
                deploy_ensemble(config)
            print(f"Ray started and both ensembles deployed in {time.perf_counter() - started:.0f} s", flush=True)
            asyncio.run(bench(full, adapters, merged, serve_configs, args))


if __name__ == "__main__":
    main()
