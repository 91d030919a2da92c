"""From scores to a sampling distribution, and from a distribution plus a uniform to a token.

One function turns any scores (a role's log-probs for the drafter's q, the EFT combination
for the target p) into the distribution that is actually sampled, so that the speculative
acceptance compares exactly the distributions the two sides sampled from. Sampling is
inverse-CDF on a caller-supplied uniform: the caller owns the randomness (one seeded
generator per request), which keeps remote drafters reproducible and the maths explicit.
"""

from __future__ import annotations

import torch

from .combine import nucleus_mask


def sampling_probs(scores: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities over ``[..., V]`` after temperature, then top-k, then top-p.

    Temperature 0 is greedy: a one-hot distribution on the argmax (first index on ties),
    which makes greedy decoding and greedy speculative acceptance the same code as sampling.
    """
    if temperature == 0.0:
        return torch.zeros_like(scores).scatter_(-1, scores.argmax(dim=-1, keepdim=True), 1.0)
    logits = scores / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logprobs = torch.log_softmax(logits, dim=-1)
    if top_p < 1.0:
        logprobs = logprobs.masked_fill(~nucleus_mask(logprobs, top_p), float("-inf"))
    return torch.softmax(logprobs, dim=-1)


def sample_from(probs: torch.Tensor, uniform: float) -> int:
    """Inverse-CDF sample from a 1-D distribution; never returns a zero-probability token."""
    cdf = probs.cumsum(dim=-1)
    index = int(torch.searchsorted(cdf, uniform * cdf[-1], right=True))
    support = torch.nonzero(probs > 0)
    return min(index, int(support[-1]))
