"""Engine throughput: roles alone, plain EFT and speculative EFT, measured side by side.

Every configuration runs once per round, rounds interleaved, and the table reports medians,
so machine noise hits all rows alike; read the ratios, not the absolute numbers.

  python bench/bench_engine.py                      # synthetic tiny family (built here)
  python bench/bench_engine.py --family             # the embedded family (eft family build)
  python bench/bench_engine.py --model base_large=DIR --model base_small=DIR --model ft_small=DIR

The synthetic family matches the embedded family's *cost* ratio (base_large's cached decode
step several times base_small's) and makes the drafter a good approximation of the EFT
target, as a chat model is of its up-scaled self: the base models are nearly flat (small
init), so ``l_large - l_small`` is a small correction to ``ft_small``'s peaked distribution.

The "overlap EFT" rows draft the next block while this one is verified; in one process the
roles take turns on one compute thread, so they show its cost here (the discarded drafts),
and bench_serve.py --overlap its gain, where drafter and verifiers are separate deployments.

The "tree EFT" rows branch into the drafter's top m tokens where it is below
``--tree-confidence`` and verify the tree in one pass per role; ``tree_coverage.py`` shows
how often that catches the up-scaled model's token on these models.

The "perfect drafter" rows run speculative decoding with the drafter's own distribution as
the target while still calling every role: every draft is accepted, so they show how far a
better drafter could go with these models' costs, and split a shortfall of the speculative
rows into the drafter's acceptance (the gap to these rows) and the costs (these rows' own gap).
Timings include the prompt's prefill, as a user's request does.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from eft_router.core.spec import EFTSpec, SamplingParams, SpeculativeParams
from eft_router.engine import Engine, GenerationRequest
from eft_router.roles.interface import ScoreItem
from eft_router.tiny import TinyModel, build_tiny_family

SYNTHETIC = {
    "base_large": TinyModel(hidden=512, layers=8, heads=8, seed=1, init_std=0.012),
    "base_small": TinyModel(hidden=64, layers=2, seed=2, init_std=0.012),
    "ft_small": TinyModel(hidden=64, layers=2, seed=3, init_std=0.25),
}
SYNTHETIC_PROMPTS = ["w1 w2 w3", "w10 w11", "w5 w9 w13 w17", "w40"]


def step_time(engine: Engine, role: str, repeats: int = 60) -> float:
    """Median seconds of one cached single-token decode step of ``role`` (each step rolls the
    last token back: the next call's last token differs)."""
    worker = engine.roles[role].worker
    ids = list(range(2, 34))
    worker.score([ScoreItem("step", ids, 1)])
    times = []
    for i in range(repeats):
        seq = ids + [2 + i % 50]
        t = time.perf_counter()
        worker.score([ScoreItem("step", seq, 1)])
        times.append(time.perf_counter() - t)
    worker.release(["step"])
    return statistics.median(times)


def family_prompts(engine: Engine, n: int = 4) -> list[list[int]]:
    """Chat-formatted fact questions about held-out entities of the embedded family."""
    from eft_router.family.world import build_world, chat_messages, eval_prompts

    questions = [p.question for p in eval_prompts(build_world(), n_per_category=n)[:n]]
    tok = engine.tokenizer
    return [tok(tok.apply_chat_template(chat_messages(q), tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for q in questions]


async def run_config(
    engine: Engine, prompts: list[list[int]], eft: EFTSpec, speculative: SpeculativeParams, sampling: SamplingParams, seed: int
) -> tuple[float, int, int, int, int, float]:
    """(seconds, generated tokens, blocks, drafted, accepted, seconds inside model forwards)
    over all prompts."""
    workers = [role.worker for role in engine.roles.values()]
    forward_before = sum(w.forward_seconds for w in workers)
    total = [0.0, 0, 0, 0, 0, 0.0]
    for i, ids in enumerate(prompts):
        t = time.perf_counter()
        g = await engine.generate(GenerationRequest(ids, eft=eft, sampling=replace(sampling, seed=seed + i), speculative=speculative))
        total[0] += time.perf_counter() - t
        total[1] += len(g.token_ids)
        total[2] += g.stats.blocks
        total[3] += g.stats.drafted_tokens
        total[4] += g.stats.accepted_tokens
    total[5] = sum(w.forward_seconds for w in workers) - forward_before
    return tuple(total)  # type: ignore[return-value]


ROLES = ("base_large", "base_small", "ft_small")


def bench_models(family: bool, tmp: str) -> dict[str, str]:
    """The three roles of the embedded family (built if not cached) or of the synthetic one (built in ``tmp``)."""
    if family:
        from eft_router.family.build import build_family

        paths = build_family(quiet=True)
    else:
        paths = build_tiny_family(tmp, [f"w{i}" for i in range(200)], SYNTHETIC)
    return {r: str(paths[r]) for r in ROLES}


def bench_prompts(engine: Engine, family: bool, n: int = 4) -> list[list[int]]:
    return family_prompts(engine, n) if family else [engine.tokenizer(p)["input_ids"] for p in SYNTHETIC_PROMPTS]


def concurrency_parser(doc: str, concurrency: str, default: list[int]) -> argparse.ArgumentParser:
    """The options of the benchmarks that compare a path against the engine in-process."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="store_true", help="the embedded family instead of the synthetic one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("-k", type=int, default=4, help="draft block size of the speculative rows")
    parser.add_argument(f"--{concurrency}", type=int, nargs="+", default=default)
    return parser


# The drafter's own distribution as the target, every role still called: each draft is
# accepted, so this is the speed of a drafter that is never wrong at these models' costs,
# the ceiling of speculative EFT on them whatever the drafter.
PERFECT_DRAFTER = EFTSpec(preset="linear", coefficients={"ft_small": 1.0, "base_large": 0.0, "base_small": 0.0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="ROLE=PATH", help="default: a synthetic tiny family")
    parser.add_argument("--family", action="store_true", help="the embedded family, chat questions as prompts")
    parser.add_argument("--prompts", type=int, default=16, help="questions per round (embedded family)")
    parser.add_argument("--tokens", type=int, default=64, help="most new tokens per prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="generate exactly --tokens tokens (default: on for random models, whose EOS means nothing; "
        "off for the embedded family, whose answers end at EOS as a user gets them)",
    )
    parser.add_argument("--confidence", type=float, default=0.0, help="speculative.confidence of the speculative rows")
    parser.add_argument("--tree-confidence", type=float, default=0.5, help="speculative.confidence of the tree rows (where they branch)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-k", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.model:
        paths = {r: p for r, p in (item.split("=", 1) for item in args.model) if r in ROLES}
    else:
        paths = bench_models(args.family, tempfile.mkdtemp(prefix="eft-bench-"))
    engine = Engine.local(paths)
    prompts = bench_prompts(engine, args.family, args.prompts)
    ignore_eos = not args.family if args.ignore_eos is None else args.ignore_eos
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.tokens, ignore_eos=ignore_eos)

    ks = range(1, args.max_k + 1)
    configs = {
        "ft_small alone": (EFTSpec(preset="linear", coefficients={"ft_small": 1.0}), SpeculativeParams()),
        "base_large alone": (EFTSpec(preset="linear", coefficients={"base_large": 1.0}), SpeculativeParams()),
        "plain EFT": (EFTSpec(), SpeculativeParams()),
        **{f"speculative EFT k={k}": (EFTSpec(), SpeculativeParams(k=k, confidence=args.confidence)) for k in ks},
        **{f"adaptive EFT k<={k}": (EFTSpec(), SpeculativeParams(k=k, confidence=args.confidence, adaptive=True)) for k in ks if k in (4, 8)},
        **{f"overlap EFT k={k}": (EFTSpec(), SpeculativeParams(k=k, confidence=args.confidence, overlap=True)) for k in ks if k in (4, 8)},
        **{f"tree EFT m={m} k={k}": (EFTSpec(), SpeculativeParams(k=k, confidence=args.tree_confidence, tree_width=m))
           for k in ks if k in (4, 8) for m in (2, 4)},
        **{f"tree+overlap EFT m=2 k={k}": (EFTSpec(), SpeculativeParams(k=k, confidence=args.tree_confidence, tree_width=2, overlap=True))
           for k in ks if k == 4},
        **{f"tree+adaptive EFT m=2 k<={k}": (EFTSpec(), SpeculativeParams(k=k, confidence=args.tree_confidence, tree_width=2, adaptive=True))
           for k in ks if k == 8},
        **{f"perfect drafter k={k}": (PERFECT_DRAFTER, SpeculativeParams(k=k)) for k in ks},
    }
    warm_up = replace(sampling, max_new_tokens=8)
    asyncio.run(run_config(engine, prompts, EFTSpec(), SpeculativeParams(k=2), warm_up, 0))
    samples: dict[str, list[tuple]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, (eft, speculative) in configs.items():
            samples[name].append(asyncio.run(run_config(engine, prompts, eft, speculative, sampling, seed=1000 * r)))
    steps = {role: step_time(engine, role) for role in ("base_large", "base_small", "ft_small")}

    tps = {name: statistics.median(s[1] / s[0] for s in runs) for name, runs in samples.items()}
    generated = sum(s[1] for s in samples["plain EFT"])
    print(f"{len(prompts)} prompts x {args.rounds} rounds, temperature {args.temperature}, draft confidence {args.confidence}, "
          + (f"{args.tokens} tokens each (EOS ignored)" if ignore_eos else
             f"up to {args.tokens} tokens, stopping at EOS (plain EFT: {generated / len(prompts) / args.rounds:.1f} tokens per answer)"))
    print("cached decode step (median): " + ", ".join(f"{r} {t * 1e3:.2f} ms" for r, t in steps.items()))
    print(f"base_large / ft_small step cost: {steps['base_large'] / steps['ft_small']:.1f}x")
    print()
    width = max(map(len, samples))
    print(f"{'configuration':<{width}}{'tokens/s':>10}{'vs plain':>10}{'accept':>9}{'tok/block':>11}{'vs ceiling':>12}")
    for name, runs in samples.items():
        drafted, accepted = sum(s[3] for s in runs), sum(s[4] for s in runs)
        blocks, tokens = sum(s[2] for s in runs), sum(s[1] for s in runs)
        rate = f"{accepted / drafted:.3f}" if drafted else "-"
        k = re.search(r"k<?=(\d+)", name)
        ceiling = tps.get(f"perfect drafter k={k.group(1)}") if k else None
        versus = f"{tps[name] / ceiling:>11.0%}" if ceiling and not name.startswith("perfect") else f"{'-':>11}"
        print(f"{name:<{width}}{tps[name]:>10.1f}{tps[name] / tps['plain EFT']:>9.2f}x{rate:>9}{tokens / blocks:>11.2f} {versus}")
    print("(vs ceiling: against the perfect drafter at the same k; a tree's acceptance is over all its nodes, one path of which can be taken)")

    small_speedup = tps["ft_small alone"] / tps["base_large alone"]
    print()
    print(f"ft_small alone over base_large alone: {small_speedup:.2f}x")
    for kind in ("speculative EFT", "adaptive EFT", "overlap EFT", "tree EFT", "tree+", "perfect drafter"):
        best = max((n for n in tps if n.startswith(kind)), key=tps.get, default=None)
        if best is None:
            continue
        speedup = tps[best] / tps["plain EFT"]
        print(f"best {best}: {speedup:.2f}x plain EFT (target 2.5x), {speedup / small_speedup:.0%} of ft_small's "
              f"speed-up (target 70%), {tps[best] / tps['ft_small alone']:.0%} of the drafter's own speed")
    # The bound: the same plain-EFT runs' tokens over the time spent inside the three models'
    # forward passes alone (measured in the workers), so the gap is the engine's own overhead.
    bound = statistics.median(s[1] / s[5] for s in samples["plain EFT"])
    print(f"plain EFT {tps['plain EFT']:.1f} tok/s vs bound 1/(sum of the roles' forward times) {bound:.1f} tok/s: "
          f"{tps['plain EFT'] / bound:.0%} of the bound (target 90%)")
    print(f"(isolated steps sum to {1e3 * sum(steps.values()):.2f} ms, i.e. {1 / sum(steps.values()):.1f} tok/s: "
          "in the ensemble, alternating models also cost cache misses)")


if __name__ == "__main__":
    main()
