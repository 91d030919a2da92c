"""From scores to a sampling distribution, and from a distribution plus a uniform to a token.

One function turns any scores (a role's log-probs for the drafter's q, the EFT combination
for the target p) into the distribution that is actually sampled, so that the speculative
acceptance compares exactly the distributions the two sides sampled from. Every parameter
may be a number or one value per row, so one call serves every request of a step with its
own temperature, top-k and top-p; each row is computed from its own parameters only.
Sampling is inverse-CDF on caller-supplied uniforms: the caller owns the randomness (one
seeded generator per request), which keeps remote drafters reproducible and the maths explicit.
"""

from __future__ import annotations

import torch

from .combine import nucleus_mask

Param = float | int | torch.Tensor


def _per_row(value: Param, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype).expand(like.shape[:-1])


def sampling_probs(scores: torch.Tensor, temperature: Param, top_k: Param = 0, top_p: Param = 1.0) -> torch.Tensor:
    """Probabilities over ``[..., V]`` after temperature, then top-k, then top-p.

    Temperature 0 is greedy: a one-hot distribution on the argmax (first index on ties),
    which makes greedy decoding and greedy speculative acceptance the same code as sampling.
    ``top_k`` 0 and ``top_p`` 1 are off.
    """
    temperature = _per_row(temperature, scores, scores.dtype)
    greedy = temperature == 0.0
    one_hot = torch.zeros_like(scores).scatter_(-1, scores.argmax(dim=-1, keepdim=True), 1.0)
    if bool(greedy.all()):
        return one_hot
    logits = scores / torch.where(greedy, 1.0, temperature).unsqueeze(-1)
    top_k = _per_row(top_k, scores, torch.long)
    vocab = logits.shape[-1]
    filtered = (top_k > 0) & (top_k < vocab)
    if bool(filtered.any()):
        ordered = torch.sort(logits, dim=-1, descending=True).values
        kth = ordered.gather(-1, (torch.where(filtered, top_k, vocab) - 1).unsqueeze(-1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logprobs = torch.log_softmax(logits, dim=-1)
    top_p = _per_row(top_p, scores, scores.dtype)
    if bool((top_p < 1.0).any()):
        logprobs = logprobs.masked_fill(~nucleus_mask(logprobs, top_p), float("-inf"))
    probs = torch.softmax(logprobs, dim=-1)
    return torch.where(greedy.unsqueeze(-1), one_hot, probs)


def sample_from(probs: torch.Tensor, uniforms: float | torch.Tensor) -> torch.Tensor:
    """Inverse-CDF samples from distributions ``[..., V]`` with one uniform in [0, 1) per
    distribution; never a zero-probability token. Returns token ids of shape ``[...]``."""
    cdf = probs.cumsum(dim=-1)
    u = torch.as_tensor(uniforms, dtype=probs.dtype).expand(probs.shape[:-1])
    index = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    vocab = probs.shape[-1]
    last_support = vocab - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)
    return torch.minimum(index, last_support)
