"""The EFT paper's experiments in miniature, on the embedded family, with exact-match metrics.

Sections (each over the same fixed prompt set, greedy and at temperature 1, fixed seeds):

1. scale decoupling, the paper's 2x2: small-ft, large-ft, EFT up-scaled, EFT down-scaled,
   and the fraction of the small-to-large gap each EFT recovers, per metric;
2. the reward-interpolation frontier between the helpful and the safe delta, at small scale
   and up-scaled;
3. up-scaling amplification (beta) and top-p filtering of the up-scaling weights;
4. speculative decoding: speed-up over plain EFT and acceptance at k = 1..8, the ceiling
   (ft_small alone), and the per-token TV distance between ft_small and the up-scaled model;
5. with the small fine-tunes as LoRA adapters co-served with base_small: the 2x2's rows that
   use them and the frontier, beside the full fine-tunes'.

Results go to ``results.json``, ``report.md`` and PNG plots in one output folder.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..core.spec import EFTSpec, SamplingParams, SpeculativeParams
from ..engine import Engine, GenerationRequest
from ..roles.adapters import Adapter
from .metrics import is_factual, is_harmless, is_helpful, is_refusal, wilson_interval
from .world import EvalPrompt, build_world, chat_messages, eval_prompts

METRICS = ("factuality", "helpfulness", "harmlessness")
TWO_BY_TWO = {
    "small-ft (lower bound)": EFTSpec(preset="linear", coefficients={"ft_small": 1.0}),
    "large-ft (upper bound)": EFTSpec(preset="linear", coefficients={"ft_large": 1.0}),
    "EFT up-scaled": EFTSpec(),
    "EFT down-scaled": EFTSpec(preset="downscale"),
}

ADAPTER_ROWS = ("small-ft (lower bound)", "EFT up-scaled")  # the 2x2's rows that use the small fine-tunes


@dataclass(frozen=True)
class EvalConfig:
    """What to sweep. The default is the full report; :data:`MINI_EVAL` is the same pipeline
    cut down to seconds for the test suite."""

    n_per_category: int = 50
    seed: int = 0
    max_new_tokens: int = 40
    temperatures: tuple[float, ...] = (0.0, 1.0)
    lambdas: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
    betas: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    weight_top_ps: tuple[float, ...] = (1.0, 0.95, 0.9, 0.8)
    ks: tuple[int, ...] = tuple(range(1, 9))

    def steps(self, adapters: bool = False) -> int:
        per_temperature = len(TWO_BY_TWO) + 2 * len(self.lambdas) + 2
        if adapters:
            per_temperature += len(ADAPTER_ROWS) + 2 * len(self.lambdas)
        return len(self.temperatures) * per_temperature + 1


MINI_EVAL = EvalConfig(n_per_category=2, max_new_tokens=6, lambdas=(0.0, 0.5, 1.0), betas=(1.0, 2.0),
                       weight_top_ps=(1.0, 0.8), ks=(1, 2))


@dataclass(frozen=True)
class Scored:
    """One metric over prompts: the proportion and its 95% Wilson interval."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, outcomes: Sequence[bool]) -> "Scored":
        values = [float(o) for o in outcomes]
        low, high = wilson_interval(values)
        return cls(sum(values) / len(values), low, high, len(values))

    def __str__(self) -> str:
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def _prompt_ids(engine: Engine, question: str) -> list[int]:
    text = engine.tokenizer.apply_chat_template(chat_messages(question), tokenize=False, add_generation_prompt=True)
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


async def score_config(
    engine: Engine, prompts: Sequence[EvalPrompt], eft: EFTSpec, temperature: float, cfg: EvalConfig
) -> dict[str, Scored]:
    """Generate an answer to every prompt (all at once: they share the engine's steps) and grade it."""
    outcomes: dict[str, list[bool]] = {m: [] for m in METRICS}
    requests = [
        GenerationRequest(
            _prompt_ids(engine, prompt.question), eft=eft,
            sampling=SamplingParams(temperature=temperature, seed=cfg.seed + i, max_new_tokens=cfg.max_new_tokens),
        )
        for i, prompt in enumerate(prompts)
    ]
    for prompt, g in zip(prompts, await asyncio.gather(*map(engine.generate, requests))):
        # helpfulness is over every prompt and a refusal is not helpful: the helpful model's
        # eagerness to answer everything is what the safe delta trades against
        outcomes["helpfulness"].append(is_helpful(g.text, g.finish_reason, prompt) and not is_refusal(g.text))
        if prompt.category == "fact":
            outcomes["factuality"].append(is_factual(g.text, prompt))
        else:
            outcomes["harmlessness"].append(is_harmless(g.text, prompt))
    return {m: Scored.of(v) for m, v in outcomes.items() if v}


def gap_recovered(results: dict[str, dict[str, Scored]], eft_name: str) -> dict[str, float | None]:
    """(EFT - lower) / (upper - lower) per metric; None where the bounds coincide."""
    lower, upper = results["small-ft (lower bound)"], results["large-ft (upper bound)"]
    out = {}
    for m in METRICS:
        gap = upper[m].mean - lower[m].mean
        out[m] = None if abs(gap) < 1e-9 else (results[eft_name][m].mean - lower[m].mean) / gap
    return out


async def speculative_section(engine: Engine, prompts: Sequence[EvalPrompt], cfg: EvalConfig) -> dict:
    """Tokens/s of plain EFT, speculative EFT at each k and ft_small alone, side by side
    (configurations interleaved prompt by prompt), and the drafter-to-EFT TV distances."""
    configs = {"plain EFT": (EFTSpec(), 0), "ft_small alone": (TWO_BY_TWO["small-ft (lower bound)"], 0)}
    configs.update({f"speculative k={k}": (EFTSpec(), k) for k in cfg.ks})
    totals = {name: [0.0, 0, 0, 0] for name in configs}  # seconds, tokens, drafted, accepted
    tv: list[float] = []
    for i, prompt in enumerate(prompts):
        ids = _prompt_ids(engine, prompt.question)
        sampling = SamplingParams(temperature=1.0, seed=cfg.seed + i, max_new_tokens=cfg.max_new_tokens)
        for name, (eft, k) in configs.items():
            t = time.perf_counter()
            g = await engine.generate(
                GenerationRequest(ids, eft=eft, sampling=sampling, speculative=SpeculativeParams(k=k), diagnostics=name == "plain EFT")
            )
            row = totals[name]
            row[0] += time.perf_counter() - t
            row[1] += len(g.token_ids)
            row[2] += g.stats.drafted_tokens
            row[3] += g.stats.accepted_tokens
            tv += [d.drafter_tv for d in g.diagnostics if d.drafter_tv is not None]
    plain_tps = totals["plain EFT"][1] / totals["plain EFT"][0]
    table = {
        name: {
            "tokens_per_s": row[1] / row[0],
            "speedup_vs_plain": row[1] / row[0] / plain_tps,
            "acceptance_rate": row[3] / row[2] if row[2] else None,
        }
        for name, row in totals.items()
    }
    return {"table": table, "tv": tv}


async def frontier(engine: Engine, prompts: Sequence[EvalPrompt], cfg: EvalConfig, temperature: float, tick) -> dict[str, list]:
    """The reward-interpolation curves, at small scale and up-scaled."""
    out = {}
    for scale, preset in (("small", "interpolate"), ("up-scaled", "upscale")):
        curve = []
        for lam in cfg.lambdas:
            eft = EFTSpec(preset=preset, deltas={"ft_small": lam, "ft_small_safe": round(1.0 - lam, 10)})
            curve.append({"lambda": lam, **await score_config(engine, prompts, eft, temperature, cfg)})
            tick(f"interpolation {scale} lambda={lam} T={temperature:g}")
        out[scale] = curve
    return out


async def run_experiments(
    engine: Engine, prompts: Sequence[EvalPrompt], cfg: EvalConfig, progress=None, adapter_engine: Engine | None = None
) -> dict:
    """Every section on ``engine``; with ``adapter_engine`` (the small fine-tunes as LoRA
    adapters) also section 5."""
    def tick(label: str) -> None:
        if progress is not None:
            progress(label)

    results: dict = {"two_by_two": {}, "gap_recovered": {}, "interpolation": {}, "beta": {}, "weight_top_p": {}}
    if adapter_engine is not None:
        results["adapters"] = {"two_by_two": {}, "interpolation": {}}
    for temperature in cfg.temperatures:
        key = f"T={temperature:g}"
        two = {}
        for name, eft in TWO_BY_TWO.items():
            two[name] = await score_config(engine, prompts, eft, temperature, cfg)
            tick(f"2x2 {name} {key}")
        results["two_by_two"][key] = two
        results["gap_recovered"][key] = {n: gap_recovered(two, n) for n in ("EFT up-scaled", "EFT down-scaled")}
        results["interpolation"][key] = await frontier(engine, prompts, cfg, temperature, tick)
        results["beta"][key] = {b: await score_config(engine, prompts, EFTSpec(beta=b), temperature, cfg) for b in cfg.betas}
        tick(f"beta {key}")
        results["weight_top_p"][key] = {
            p: await score_config(engine, prompts, EFTSpec(weight_top_p=p), temperature, cfg) for p in cfg.weight_top_ps
        }
        tick(f"weight top-p {key}")
        if adapter_engine is not None:
            lora = {}
            for name in ADAPTER_ROWS:
                lora[name] = await score_config(adapter_engine, prompts, TWO_BY_TWO[name], temperature, cfg)
                tick(f"LoRA 2x2 {name} {key}")
            results["adapters"]["two_by_two"][key] = lora
            results["adapters"]["interpolation"][key] = await frontier(adapter_engine, prompts, cfg, temperature, tick)
    results["speculative"] = await speculative_section(engine, [p for p in prompts if p.category == "fact"], cfg)
    tick("speculative")
    return results


def _jsonable(obj):
    if isinstance(obj, Scored):
        return {"mean": obj.mean, "low": obj.low, "high": obj.high, "n": obj.n}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def markdown_report(results: dict, meta: dict) -> str:
    lines = ["# EFT experiments on the embedded family", ""]
    lines += [f"Prompts: {meta['prompts']} ({meta['fact_prompts']} fact, {meta['harmful_prompts']} harmful), "
              f"entities held out of fine-tuning; 95% Wilson intervals in brackets. Family: `{meta['family']}`. "
              "Factuality: the right value and no other (fact prompts); helpfulness: an answer, not a refusal, "
              "in one well-formed sentence that ends with EOS (all prompts); harmlessness: refuses and does not "
              "leak the code (harmful prompts).", ""]
    for key, two in results["two_by_two"].items():
        lines += [f"## 1. Scale decoupling ({key})", ""]
        lines += _table(["model", *METRICS], [[name, *(two[name].get(m, "-") for m in METRICS)] for name in two])
        lines += ["", "Fraction of the small-ft to large-ft gap recovered:", ""]
        gaps = results["gap_recovered"][key]
        lines += _table(["EFT", *METRICS], [[n, *("-" if g[m] is None else f"{g[m]:.2f}" for m in METRICS)] for n, g in gaps.items()])
        lines.append("")
    for key, scales in results["interpolation"].items():
        lines += [f"## 2. Reward interpolation, helpful (lambda) vs safe (1 - lambda) ({key})", ""]
        rows = [[f"{pt['lambda']:.1f}", *(str(pts[i]["helpfulness"]) + " / " + str(pts[i]["harmlessness"]) for pts in scales.values())]
                for i, pt in enumerate(next(iter(scales.values())))]
        lines += _table(["lambda", *(f"{s}: helpful / harmless" for s in scales)], rows)
        lines.append("")
    for section, title in (("beta", "3a. Up-scaling amplification beta"), ("weight_top_p", "3b. Top-p filtering of the up-scaling weights")):
        for key, by in results[section].items():
            lines += [f"## {title} ({key})", ""]
            lines += _table([section, *METRICS], [[v, *(s.get(m, "-") for m in METRICS)] for v, s in by.items()])
            lines.append("")
    spec = results["speculative"]
    lines += ["## 4. Speculative decoding (temperature 1, fact prompts)", ""]
    lines += _table(
        ["configuration", "tokens/s", "vs plain EFT", "acceptance"],
        [[n, f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_plain']:.2f}x", "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"]
         for n, r in spec["table"].items()],
    )
    tv = spec["tv"]
    if tv:
        lines += ["", f"TV distance between ft_small and the up-scaled model per token ({len(tv)} tokens): "
                  f"median {statistics.median(tv):.3f}, mean {statistics.fmean(tv):.3f}, "
                  f"{sum(t < 0.1 for t in tv) / len(tv):.0%} below 0.1 (plot: `tv_distance.png`)."]
    lora = results.get("adapters")
    if lora:
        lines += ["", "## 5. The small fine-tunes as LoRA adapters of base_small, co-served with it", ""]
        for key, rows in lora["two_by_two"].items():
            full = results["two_by_two"][key]
            lines += [f"2x2 rows that use the small fine-tunes ({key}), full fine-tunes / LoRA adapters:", ""]
            lines += _table(["model", *METRICS], [[name, *(f"{full[name][m]} / {rows[name][m]}" for m in METRICS)] for name in rows])
            lines.append("")
        for key, scales in lora["interpolation"].items():
            full = results["interpolation"][key]["up-scaled"]
            lines += [f"Up-scaled frontier ({key}), helpful / harmless, full fine-tunes vs LoRA adapters:", ""]
            lines += _table(
                ["lambda", "full", "LoRA"],
                [[f"{a['lambda']:.1f}", f"{a['helpfulness']} / {a['harmlessness']}", f"{b['helpfulness']} / {b['harmlessness']}"]
                 for a, b in zip(full, scales["up-scaled"])],
            )
            lines.append("")
    lines += ["", "Frontier plot: `frontier.png` (LoRA adapters dashed)."]
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["interpolation"]), figsize=(5 * len(results["interpolation"]), 4), squeeze=False)
    for ax, (key, scales) in zip(axes[0], results["interpolation"].items()):
        lora = results.get("adapters", {}).get("interpolation", {}).get(key, {})
        curves = [(scale, pts, "o-") for scale, pts in scales.items()] + [(f"{scale} LoRA", pts, "s--") for scale, pts in lora.items()]
        for label, pts, style in curves:
            ax.plot([p["helpfulness"].mean for p in pts], [p["harmlessness"].mean for p in pts], style, label=label)
            for p in (pts[0], pts[-1]):
                ax.annotate(f"λ={p['lambda']:.1f}", (p["helpfulness"].mean, p["harmlessness"].mean), fontsize=7)
        ax.set(xlabel="helpfulness", ylabel="harmlessness", title=f"reward interpolation ({key})", xlim=(-0.05, 1.05), ylim=(-0.05, 1.05))
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)
    plt.close(fig)

    tv = results["speculative"]["tv"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(tv, bins=40, range=(0, 1))
    ax.set(xlabel="TV(ft_small, EFT up-scaled) per token", ylabel="tokens", title="drafter vs target distance")
    fig.tight_layout()
    fig.savefig(out / "tv_distance.png", dpi=110)
    plt.close(fig)


def run_eval(paths: dict[str, str], out: Path, cfg: EvalConfig = EvalConfig(), world_seed: int = 0,
             n_entities: int = 400, quiet: bool = False, adapters: dict[str, Adapter] | None = None) -> dict:
    """Run every section on the family at ``paths`` and write the report to ``out``; with
    ``adapters`` (role -> LoRA adapter, replacing that role's full model) also section 5."""
    from tqdm.auto import tqdm

    from ..roles.local import load_local_roles

    engine = Engine.local(paths)
    adapter_engine = None
    if adapters:
        adapter_engine = Engine(*load_local_roles({r: p for r, p in paths.items() if r not in adapters}, adapters=adapters))
    world = build_world(world_seed, n_entities)
    prompts = eval_prompts(world, n_per_category=cfg.n_per_category, seed=cfg.seed)
    bar = tqdm(total=cfg.steps(adapters=bool(adapters)), desc="eft eval", disable=quiet)

    def progress(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    started = time.perf_counter()
    results = asyncio.run(run_experiments(engine, prompts, cfg, progress, adapter_engine))
    bar.close()
    meta = {
        "family": str(Path(next(iter(paths.values()))).parent),
        "prompts": len(prompts),
        "fact_prompts": sum(p.category == "fact" for p in prompts),
        "harmful_prompts": sum(p.category == "harmful" for p in prompts),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, **_jsonable(results)}, indent=2))
    (out / "report.md").write_text(markdown_report(results, meta))
    plots(results, out)
    return results
