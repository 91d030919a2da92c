"""Exact speculative acceptance (Leviathan et al. 2023; Chen et al. 2023). Pure function.

Draft token x_t ~ q_t is accepted with probability min(1, p_t(x_t) / q_t(x_t)); at the first
rejection the replacement is drawn from normalize(max(0, p_t - q_t)) and the block ends; if
every draft token is accepted a bonus token is drawn from p_{k+1}. The emitted tokens are then
distributed exactly as sampling from p token by token. With one-hot (greedy) p and q the rule
reduces to "accept while the draft equals argmax p, then emit argmax p".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .sampling import sample_from


@dataclass(frozen=True)
class BlockOutcome:
    """``tokens``: the accepted draft prefix plus one corrected or bonus token."""

    tokens: list[int]
    accepted: int


def accept_block(
    target: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: Sequence[int],
    accept_uniforms: Sequence[float],
    final_uniform: float,
) -> BlockOutcome:
    """Verify one block.

    ``target`` is p for positions 1..k+1 ``[k+1, V]``; ``draft_probs`` is q for positions
    1..k ``[k, V]``; ``draft_tokens`` the k tokens sampled from q; one uniform per draft
    token for its acceptance test and one for the replacement or bonus sample.
    """
    k = len(draft_tokens)
    for t, token in enumerate(draft_tokens):
        p, q = float(target[t, token]), float(draft_probs[t, token])
        if accept_uniforms[t] * q < p:  # u < p/q, with q > 0 since x_t was drawn from q
            continue
        residual = torch.clamp(target[t] - draft_probs[t], min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection had probability 0
            residual = target[t]
        return BlockOutcome(list(draft_tokens[:t]) + [sample_from(residual, final_uniform)], t)
    return BlockOutcome(list(draft_tokens) + [sample_from(target[k], final_uniform)], k)
