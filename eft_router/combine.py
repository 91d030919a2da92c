"""The EFT combination: per-role log-probs in, combined scores out. Pure functions.

Inputs are log-softmax outputs of each role over the shared vocabulary, shaped
``[..., V]`` (positions, or batch x positions). Normalising per model *before* any filter
matters: raw logits and log-probs give the same softmax only while no term is masked.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .spec import CombinationPlan


def nucleus_mask(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the smallest set of tokens whose probability mass reaches ``top_p``.

    ``logprobs`` must be normalised. The most likely token is always kept; ties at the
    boundary are broken by sort order, as in every top-p implementation.
    """
    if top_p >= 1.0:
        return torch.ones_like(logprobs, dtype=torch.bool)
    sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True)
    probs = sorted_lp.exp()
    mass_before = probs.cumsum(dim=-1) - probs
    keep_sorted = mass_before < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def combine(logprobs: Mapping[str, torch.Tensor], plan: CombinationPlan) -> torch.Tensor:
    """``s = sum_r c_r l_r + beta * mask * (l_knowledge - l_reference)`` (unnormalised)."""
    scores = sum(coef * logprobs[role] for role, coef in plan.behaviour.items() if coef != 0.0)
    if not isinstance(scores, torch.Tensor):  # every coefficient was zero
        scores = torch.zeros_like(next(iter(logprobs.values())))
    weight = plan.weight
    if weight is None or weight.beta == 0.0:
        return scores
    up = logprobs[weight.knowledge] - logprobs[weight.reference]
    if weight.top_p < 1.0:
        inside = nucleus_mask(torch.log_softmax(scores, dim=-1), weight.top_p)
        up = torch.where(inside, up, torch.zeros_like(up))
    return scores + weight.beta * up
