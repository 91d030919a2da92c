"""Exact speculative acceptance (Leviathan et al. 2023; Chen et al. 2023). Pure function.

Draft token x_t ~ q_t is accepted with probability min(1, p_t(x_t) / q_t(x_t)); at the first
rejection the replacement is drawn from normalize(max(0, p_t - q_t)) and the block ends; if
every draft token is accepted a bonus token is drawn from p_{k+1}. The emitted tokens are then
distributed exactly as sampling from p token by token. A block may also end at its last
accepted draft, with no bonus (the overlapped pipeline verifies the next block's first draft
at the bonus position instead): each emitted token is still p-distributed given the ones
before it, and stopping after any of them keeps that. With one-hot (greedy) p and q the rule
reduces to "accept while the draft equals argmax p, then emit argmax p".

:func:`accept_blocks` settles the blocks of every request of a step at once. Blocks have
different lengths (a plain request's block has no draft at all): they are padded to the
longest, and each row only reads its own first ``num_drafts`` positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import sample_from


@dataclass(frozen=True)
class BlockOutcome:
    """``tokens``: the accepted draft prefix plus one corrected or bonus token."""

    tokens: list[int]
    accepted: int


def accept_blocks(
    target: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    accept_uniforms: torch.Tensor,
    final_uniforms: torch.Tensor,
    bonus: torch.Tensor | None = None,
) -> list[BlockOutcome]:
    """Verify B blocks of up to K drafts.

    ``target``: p at positions 1..K+1 ``[B, K+1, V]``; ``draft_probs``: q at positions 1..K
    ``[B, K, V]``; ``draft_tokens`` ``[B, K]`` (long) sampled from q; ``num_drafts`` ``[B]``:
    how many of them row b has (the rest is padding); ``accept_uniforms`` ``[B, K]`` (one per
    draft, for its acceptance test) and ``final_uniforms`` ``[B]`` (the replacement or bonus);
    ``bonus`` ``[B]`` (bool, default all true): whether a block whose drafts are all accepted
    draws a bonus token (``target`` needs row ``num_drafts`` only where it does).
    """
    batch, k = draft_tokens.shape
    rows = torch.arange(batch)
    if k:
        p_x = target[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1).double()
        q_x = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1).double()
        # u < p/q, with q > 0 since x_t was drawn from q
        rejected = ~(accept_uniforms.double() * q_x < p_x) & (torch.arange(k) < num_drafts.unsqueeze(-1))
        first = torch.where(rejected.any(-1), rejected.to(torch.int8).argmax(-1), num_drafts)
    else:
        first = torch.zeros(batch, dtype=torch.long)
    final = target[rows, first]
    was_rejected = first < num_drafts
    if bool(was_rejected.any()):
        residual = torch.clamp(final - draft_probs[rows, first.clamp(max=max(k - 1, 0))], min=0.0) if k else final
        # p == q up to rounding: rejection had probability 0, the residual is empty
        usable = was_rejected & (residual.sum(-1) > 0)
        final = torch.where(usable.unsqueeze(-1), residual, final)
    ends = ~was_rejected & ~(torch.ones(batch, dtype=torch.bool) if bonus is None else bonus)
    final = torch.where(ends.unsqueeze(-1), 1.0, final)  # no bonus drawn: any valid row, its sample unused
    last = sample_from(final, final_uniforms).tolist()
    drafts, firsts, no_bonus = draft_tokens.tolist(), first.tolist(), ends.tolist()
    return [BlockOutcome(drafts[b][: firsts[b]] + ([] if no_bonus[b] else [last[b]]), firsts[b]) for b in range(batch)]


@dataclass(frozen=True)
class TreeOutcome:
    """``tokens``: the accepted path's tokens plus one corrected or bonus token; ``rows``:
    the target row of each of them (0: the root's, i + 1: the row after node i)."""

    tokens: list[int]
    accepted: int
    rows: list[int]


def accept_tree(
    target: torch.Tensor,
    draft_probs: torch.Tensor,
    tokens: list[int],
    parents: list[int],
    sampled: list[bool],
    accept_uniforms: list[float],
    final_uniform: float,
) -> TreeOutcome:
    """Verify one draft tree by SpecInfer's multi-step speculative sampling (Miao et al. 2024).

    Node i holds ``tokens[i]``, a child of ``parents[i]`` (-1: the root, the block's first
    position). ``target`` and ``draft_probs`` ``[n + 1, V]``: p and the drafter's q at the
    root (row 0) and after each node (row i + 1). A ``sampled`` node was drawn from q at its
    parent; the others are the drafter's top tokens, drawn from nothing: their q is a point
    mass on themselves. From the root, the children of the current node are tried in turn:
    child x is accepted with probability min(1, p(x) / q_x(x)); a rejection replaces p by
    normalize(max(0, p - q_x)), the residual, for the next child. The first accepted child
    becomes the current node; when none is, a token is drawn from the residual and the block
    ends; at a leaf, a bonus token from its p. Each emitted token is then p-distributed given
    the ones before it, as with one draft (a point mass is a draft drawn independently of
    the target's randomness). Which point masses follow a sampled sibling may depend on it
    (the drafter's top tokens other than it): whatever it was, its rejection leaves the
    residual, and each point mass keeps that exact. Greedy p accepts the child that is its
    argmax.
    """
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    path, node = [], -1
    while True:
        p = target[node + 1].double()
        accepted = None
        for child in children.get(node, []):
            x = tokens[child]
            if sampled[child]:
                q = draft_probs[node + 1].double()
                if accept_uniforms[child] * float(q[x]) < float(p[x]):
                    accepted = child
                    break
                residual = torch.clamp(p - q, min=0.0)
            else:  # a point mass on x: accepted with probability p(x), else p without x
                if accept_uniforms[child] < float(p[x]):
                    accepted = child
                    break
                residual = p.clone()
                residual[x] = 0.0
            total = float(residual.sum())
            if total > 0:  # else p == q up to rounding: the rejection had probability 0
                p = residual / total
        if accepted is None:
            last = int(sample_from(p, final_uniform))
            rows = [0] + [i + 1 for i in path]
            return TreeOutcome([tokens[i] for i in path] + [last], len(path), rows)
        path.append(accepted)
        node = accepted
