"""Do token trees pay on these models? Where the drafter is unsure, how often is the token
the up-scaled model emits among the drafter's top m?

A chain drafts one token where the drafter is unsure and is accepted there with probability
a = sum_x min(p(x), q(x)). A tree's m branches, tried in turn by the multi-step rule, are
the token the chain would have sampled, then the drafter's most likely others: after the
sampled one is rejected, each top token is accepted with its mass under the residual r =
normalize(max(0, p - q)), so the tree is accepted with probability a + (1 - a) r(tops),
exactly, never below the chain. Trees of the top m tokens alone (no sampled branch) would be
accepted with p(top m), also shown. This measures all three along
answers that plain EFT samples (the embedded family's chat questions, or the synthetic
family), at every position where the drafter's top probability is below the confidence
threshold, with p the EFT target at the answer's temperature.

  python bench/tree_coverage.py --family              # the embedded family
  python bench/tree_coverage.py                       # the synthetic tiny family
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from dataclasses import replace

import torch

from bench_engine import bench_models, bench_prompts
from eft_router.core.combine import combine
from eft_router.core.sampling import sampling_probs
from eft_router.core.spec import EFTSpec, SamplingParams
from eft_router.engine import Engine, GenerationRequest
from eft_router.roles.interface import ScoreItem


def rows_along(engine: Engine, prompt: list[int], answer: list[int]) -> dict[str, torch.Tensor]:
    """Every role's log-prob rows at the answer's positions (the distribution of each token)."""
    ids = prompt + answer[:-1]
    out = {}
    for name, role in engine.roles.items():
        out[name] = role.worker.score([ScoreItem("coverage", ids, len(answer))])[0]
        role.worker.release(["coverage"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="store_true", help="the embedded family instead of the synthetic one")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per prompt")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--confidence", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)

    engine = Engine.local(bench_models(args.family, tempfile.mkdtemp(prefix="eft-bench-")))
    prompts = bench_prompts(engine, args.family, args.prompts)
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.tokens, ignore_eos=not args.family)
    plan = EFTSpec().resolve(list(engine.roles))
    # per position of every answer: the drafter's top probability, the emitted token's rank
    # among the drafter's tokens, p(top m), the chain's acceptance sum min(p, q), and the
    # tree's (sampled, then top tokens)
    top, rank, mass, chain, tree = [], [], {m: [] for m in args.widths}, [], {m: [] for m in args.widths}
    for i, prompt in enumerate(prompts):
        for s in range(args.samples):
            request = GenerationRequest(prompt, sampling=replace(sampling, seed=1000 * i + s))
            answer = asyncio.run(engine.generate(request)).token_ids
            rows = rows_along(engine, prompt, answer)
            p = sampling_probs(combine(rows, plan), args.temperature)
            q = sampling_probs(rows["ft_small"], args.temperature)
            drafter = rows["ft_small"].exp()  # its confidence: the temperature-1 probability
            order = drafter.argsort(dim=-1, descending=True)
            top.append(drafter.max(dim=-1).values)
            rank.append((order == torch.tensor(answer).unsqueeze(-1)).int().argmax(dim=-1))
            accepted = torch.minimum(p, q).sum(-1)
            for m in args.widths:
                mass[m].append(p.gather(-1, order[:, :m]).sum(-1))
                tree[m].append(sampled_tree_acceptance(p, q, order, m))
            chain.append(accepted)
    top, rank, chain = torch.cat(top), torch.cat(rank), torch.cat(chain)
    mass = {m: torch.cat(v) for m, v in mass.items()}
    tree = {m: torch.cat(v) for m, v in tree.items()}

    print(f"{'family' if args.family else 'synthetic'}: {len(prompts)} prompts x {args.samples} answers of plain EFT at "
          f"temperature {args.temperature}, {len(top)} positions")
    head = "".join(f"{f'in top {m}':>10}" for m in args.widths) + "".join(f"{f'p(top {m})':>10}" for m in args.widths)
    head += "".join(f"{f'tree m={m}':>10}" for m in args.widths if m > 1)
    print(f"{'drafter below':>14}{'positions':>11}{'chain acc':>10}{head}")
    for c in args.confidence:
        unsure = top < c
        n = int(unsure.sum())
        if not n:
            print(f"{c:>14.2f}{0:>11}")
            continue
        within = "".join(f"{float((rank[unsure] < m).float().mean()):>10.3f}" for m in args.widths)
        masses = "".join(f"{float(mass[m][unsure].mean()):>10.3f}" for m in args.widths)
        trees = "".join(f"{float(tree[m][unsure].mean()):>10.3f}" for m in args.widths if m > 1)
        print(f"{c:>14.2f}{n / len(top):>10.1%}{float(chain[unsure].mean()):>10.3f}{within}{masses}{trees}")
    print("(in top m: the answer's token among the drafter's m most likely; p(top m): a tree of the top m tokens' "
          "acceptance there; chain acc: a single sampled draft's, sum min(p, q); tree m: the sampled token, then "
          "the m - 1 most likely others, as speculative.tree_width m drafts)")


def sampled_tree_acceptance(p: torch.Tensor, q: torch.Tensor, order: torch.Tensor, m: int) -> torch.Tensor:
    """Per row, the probability that a tree of the sampled token x ~ q, then the drafter's
    m - 1 most likely tokens other than x, has a branch accepted. A rejected x has p(x) < q(x),
    so r(x) = 0: the top tokens after it hold r(top m - 1) when x is not among them, else
    r(top m)."""
    accepted = torch.minimum(p, q).sum(-1)
    if m < 2:
        return accepted
    waste = torch.clamp(q - p, min=0.0)  # q(x) (1 - min(1, p/q)): x drawn and rejected
    residual = torch.clamp(p - q, min=0.0)
    residual = residual / residual.sum(-1, keepdim=True).clamp_min(1e-30)
    inside = waste.gather(-1, order[:, : m - 1]).sum(-1)
    fewer, more = residual.gather(-1, order[:, : m - 1]).sum(-1), residual.gather(-1, order[:, :m]).sum(-1)
    return accepted + (waste.sum(-1) - inside) * fewer + inside * more


if __name__ == "__main__":
    main()
