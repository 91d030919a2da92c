"""The EFT combination: per-role log-probs in, combined scores out. Pure functions.

Inputs are log-softmax outputs of each role over the shared vocabulary. Normalising per
model *before* any filter matters: raw logits and log-probs give the same softmax only while
no term is masked.

One step of the engine combines the rows of every request at once, each request with its
own plan (preset, deltas, beta, weight top-p). :func:`plan_rows` turns a batch of plans into
per-row coefficients and :func:`combine_rows` applies them; a request's rows are computed
element by element from its own coefficients, so they do not depend on what shares the
batch. :func:`combine` is the same computation for one plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .spec import CombinationPlan


def nucleus_mask(logprobs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Boolean mask of the smallest set of tokens whose probability mass reaches ``top_p``
    (a number, or one per row of ``logprobs[..., V]``; 1 keeps every token).

    ``logprobs`` must be normalised. The most likely token is always kept; ties at the
    boundary are broken by (stable) sort order, as in every top-p implementation.
    """
    top_p = torch.as_tensor(top_p, dtype=logprobs.dtype).expand(logprobs.shape[:-1]).unsqueeze(-1)
    sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    probs = sorted_lp.exp()
    mass_before = probs.cumsum(dim=-1) - probs
    keep_sorted = (mass_before < top_p) | (top_p >= 1.0)
    keep_sorted[..., 0] = True  # a top-p below float32's smallest number still keeps one token
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@dataclass(frozen=True)
class RowCoefficients:
    """A batch of plans as per-row coefficients over ``roles``:
    ``s[i] = sum_r behaviour[i, r] * l_r[i] + beta[i] * mask_i * (l_knowledge[i] - l_reference[i])``,
    with ``mask_i`` the top-p (``top_p[i]``) nucleus of the behaviour part (1: no filter).
    Rows without a weight term have ``beta`` 0 and knowledge = reference."""

    roles: tuple[str, ...]
    behaviour: torch.Tensor  # [R, n] float32
    knowledge: list[int]  # per row, index into roles
    reference: list[int]
    beta: torch.Tensor  # [R] float32
    top_p: torch.Tensor  # [R] float32


def plan_rows(plans: Sequence[CombinationPlan], rows: Sequence[int], roles: Sequence[str]) -> RowCoefficients:
    """Coefficients for ``rows[j]`` consecutive rows of plan j, over ``roles`` (which must
    include every role the plans read)."""
    roles = tuple(roles)
    index = {r: i for i, r in enumerate(roles)}
    behaviour, knowledge, reference, beta, top_p = [], [], [], [], []
    for plan, n in zip(plans, rows):
        row = [0.0] * len(roles)
        for role, coef in plan.behaviour.items():
            row[index[role]] = coef
        w = plan.weight
        scaled = w is not None and w.beta != 0.0
        behaviour += [row] * n
        knowledge += [index[w.knowledge] if scaled else 0] * n
        reference += [index[w.reference] if scaled else 0] * n
        beta += [w.beta if scaled else 0.0] * n
        top_p += [w.top_p if scaled else 1.0] * n
    return RowCoefficients(roles, torch.tensor(behaviour), knowledge, reference, torch.tensor(beta), torch.tensor(top_p))


def combine_rows(logprobs: Sequence[torch.Tensor], coef: RowCoefficients) -> torch.Tensor:
    """Scores ``[R, V]`` from each role's log-probs ``[R, V]`` (role order ``coef.roles``;
    a role a row's plan does not read may hold anything finite, its coefficient is 0)."""
    scores = coef.behaviour[:, 0:1] * logprobs[0]
    for r in range(1, len(coef.roles)):
        scores = scores + coef.behaviour[:, r : r + 1] * logprobs[r]
    if not bool((coef.beta != 0).any()):
        return scores
    pairs = list(zip(coef.knowledge, coef.reference))
    up = None
    for knowledge, reference in dict.fromkeys(pairs):  # usually one: every row up-scales the same way
        term = logprobs[knowledge] - logprobs[reference]
        if up is None:
            up = term
        else:
            rows = torch.tensor([p == (knowledge, reference) for p in pairs]).unsqueeze(-1)
            up = torch.where(rows, term, up)
    if bool((coef.top_p < 1).any()):
        inside = nucleus_mask(torch.log_softmax(scores, dim=-1), coef.top_p)
        up = torch.where(inside, up, torch.zeros_like(up))
    return scores + coef.beta.unsqueeze(-1) * up


def combine(logprobs: Mapping[str, torch.Tensor], plan: CombinationPlan) -> torch.Tensor:
    """``s = sum_r c_r l_r + beta * mask * (l_knowledge - l_reference)`` (unnormalised) for
    one plan; ``logprobs`` maps each role of ``plan.roles`` to log-probs ``[..., V]``."""
    roles = plan.roles
    shape = logprobs[roles[0]].shape
    flat = [logprobs[r].reshape(-1, shape[-1]) for r in roles]
    return combine_rows(flat, plan_rows([plan], [flat[0].shape[0]], roles)).reshape(shape)
