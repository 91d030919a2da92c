"""The ``eft`` command line: run the EFT engine in-process on local or hub models.

  eft family build [--force]               # train the embedded family (cached)
  eft eval [--out DIR]                     # the paper's experiments on it: JSON, Markdown, PNG
  eft tiny-family DIR                      # random tiny roles, for trying the engine
  eft generate --model base_large=DIR/base_large --model base_small=... --model ft_small=... "w1 w2"
  eft score --model ... --prompt "w1 w2" "w3 w4"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, replace

from .decoder import Engine
from .spec import PRESETS, EFTSpec, SamplingParams, SpecError, SpeculativeParams


def _pairs(items: list[str], what: str, cast=str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what}: expected NAME=VALUE, got {item!r}")
        out[key] = cast(value)
    return out


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="ROLE=PATH", help="a role's model (local dir or hub id); repeat per role")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="upscale", choices=PRESETS)
    p.add_argument("--delta", action="append", default=[], metavar="ROLE=LAMBDA", help="a fine-tuned delta and its lambda; repeatable")
    p.add_argument("--coef", action="append", default=[], metavar="ROLE=C", help="a coefficient for preset 'linear'; repeatable")
    p.add_argument("--beta", type=float, default=1.0, help="up-scaling amplification")
    p.add_argument("--weight-top-p", type=float, default=1.0, help="top-p filter of the up-scaling weights")


def _eft(args: argparse.Namespace) -> EFTSpec:
    return EFTSpec(
        preset=args.preset,
        deltas=_pairs(args.delta, "--delta", float) or None,
        beta=args.beta,
        weight_top_p=args.weight_top_p,
        coefficients=_pairs(args.coef, "--coef", float) or None,
    )


async def _generate(args: argparse.Namespace) -> None:
    engine = Engine.local(_pairs(args.model, "--model"), dtype=args.dtype, device=args.device)
    ids = engine.tokenizer(args.prompt)["input_ids"]
    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        max_new_tokens=args.max_tokens, stop=tuple(args.stop),
    )
    kwargs = dict(eft=_eft(args), sampling=sampling, speculative=SpeculativeParams(k=args.k), diagnostics=args.json)
    if args.json:
        g = await engine.generate(ids, **kwargs)
        stats = asdict(g.stats) | {"acceptance_rate": g.stats.acceptance_rate}
        print(json.dumps({"text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason,
                          "stats": stats, "diagnostics": [asdict(d) for d in g.diagnostics]}, indent=2))
        return
    async for chunk in engine.stream(ids, **kwargs):
        print(chunk.text, end="", flush=True)
        if chunk.stats is not None:
            s = chunk.stats
            print(f"\n[{chunk.finish_reason}] {s.generated_tokens} tokens in {s.blocks} blocks, "
                  f"acceptance {s.acceptance_rate:.2f}, seed {s.seed}", file=sys.stderr)


async def _score(args: argparse.Namespace) -> None:
    engine = Engine.local(_pairs(args.model, "--model"), dtype=args.dtype, device=args.device)
    prompt = engine.tokenizer(args.prompt)["input_ids"]
    cont = engine.tokenizer(args.continuation, add_special_tokens=False)["input_ids"]
    print(json.dumps(asdict(await engine.score(prompt, cont, _eft(args))), indent=2))


def _tiny_family(args: argparse.Namespace) -> None:
    from .tiny import TinyModel, build_tiny_family

    roles = {
        "base_large": TinyModel(hidden=128, layers=4, seed=1, init_std=0.05),
        "base_small": TinyModel(hidden=32, layers=1, seed=2, init_std=0.05),
        "ft_small": TinyModel(hidden=32, layers=1, seed=3, init_std=0.3),
    }
    for role, path in build_tiny_family(args.dir, [f"w{i}" for i in range(100)], roles).items():
        print(f"{role}={path}")


def _family(args: argparse.Namespace) -> None:
    from .family.build import DEFAULT, MINIATURE, build_family, family_dir, read_manifest

    config = MINIATURE if args.miniature else DEFAULT
    paths = build_family(config, force=args.force, quiet=args.quiet)
    manifest = read_manifest(family_dir(config))
    for role, path in paths.items():
        print(f"{role}={path}")
    probes = manifest["probes"]
    print(
        f"family v{manifest['version']} ({manifest['digest']}), built in {manifest['seconds']} s; "
        f"held-out fact accuracy base_small {probes['base_small_fact_accuracy']:.2f}, base_large "
        f"{probes['base_large_fact_accuracy']:.2f} ({probes['fact_probes']} probes); decode step base_small "
        f"{probes['base_small_step_ms']:.2f} ms, base_large {probes['base_large_step_ms']:.2f} ms ({probes['step_ratio']}x)",
        file=sys.stderr,
    )


def _eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .family.build import DEFAULT, MINIATURE, build_family
    from .family.evaluate import MINI_EVAL, EvalConfig, run_eval

    config = MINIATURE if args.miniature else DEFAULT
    paths = build_family(config, quiet=args.quiet)
    cfg = replace(MINI_EVAL if args.miniature else EvalConfig(), seed=args.seed)
    if args.prompts is not None:
        cfg = replace(cfg, n_per_category=args.prompts)
    run_eval(paths, Path(args.out), cfg, world_seed=config.seed, n_entities=config.n_entities, quiet=args.quiet)
    print(f"report: {Path(args.out) / 'report.md'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eft", description="Emulated fine-tuning (EFT) engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="sample from the EFT distribution (in-process)")
    _engine_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
    gen.add_argument("-k", "--speculative-k", dest="k", type=int, default=0, help="draft block size (0: off)")
    gen.add_argument("--json", action="store_true", help="one JSON object with statistics and diagnostics")

    score = sub.add_parser("score", help="per-token log-probs of a continuation (in-process)")
    _engine_args(score)
    score.add_argument("--prompt", required=True)
    score.add_argument("continuation")

    tiny = sub.add_parser("tiny-family", help="build random tiny role models (for trying the engine)")
    tiny.add_argument("dir")

    fam = sub.add_parser("family", help="the embedded model family")
    fam_sub = fam.add_subparsers(dest="family_command", required=True)
    build = fam_sub.add_parser("build", help="train it if it is not cached; print role=path lines")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    for p in (build, ev := sub.add_parser("eval", help="run the EFT experiments on the family")):
        p.add_argument("--miniature", action="store_true", help="toy sizes, seconds (for tests)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--out", default="eval-report", help="output folder (results.json, report.md, PNGs)")
    ev.add_argument("--prompts", type=int, default=None, help="prompts per category, fact and harmful (default 50)")
    ev.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    try:
        if args.command == "tiny-family":
            _tiny_family(args)
        elif args.command == "family":
            _family(args)
        elif args.command == "eval":
            _eval(args)
        else:
            asyncio.run(_generate(args) if args.command == "generate" else _score(args))
    except (SpecError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
