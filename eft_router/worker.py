"""A role worker: one Hugging Face causal LM with per-session KV caches.

The same class runs in-process (:mod:`eft_router.local`) and inside a Ray Serve replica. It
is synchronous and single-threaded by design: the caller (an event loop or a Serve replica)
owns concurrency; a worker only turns token ids into log-probs as cheaply as the cache allows.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM

from .kv_cache import CacheEntry, SessionCaches
from .roles import Draft, RoleInfo
from .sampling import sample_from, sampling_probs
from .spec import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_CACHED_TOKENS = 1 << 16


class RoleWorker:
    """Holds one model; log-probs are computed in float32 over the shared vocabulary.

    ``vocab_size`` is the shared tokenizer's length: a model whose embedding has more rows
    (padding to a multiple of 64, say) has its extra logits trimmed before the softmax.
    ``session_idle_s`` frees a session's cache after that long unused (None: only the
    ``max_cached_tokens`` LRU bound and releases free caches).
    """

    def __init__(
        self,
        name: str,
        model: str,
        vocab_size: int,
        dtype: str = "float32",
        device: str = "cpu",
        max_cached_tokens: int = DEFAULT_MAX_CACHED_TOKENS,
        session_idle_s: float | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype]).to(device).eval()
        rows = self.model.get_output_embeddings().weight.shape[0]
        if rows < vocab_size:
            raise ValueError(
                f"role {name!r}: model {model!r} has {rows} output rows, fewer than the shared vocabulary's {vocab_size} tokens"
            )
        context = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self.info = RoleInfo(name=name, model=str(model), vocab_size=vocab_size, context_length=int(context))
        self.device = torch.device(device)
        self.caches = SessionCaches(max_cached_tokens, session_idle_s)
        self.computed_tokens = 0  # tokens run through the model: what cache reuse saves
        self.forward_seconds = 0.0  # wall time inside the model's forward: the compute bound

    @torch.inference_mode()
    def _forward(self, entry: CacheEntry, new_ids: Sequence[int], rows: int) -> torch.Tensor:
        """Run ``new_ids`` after the entry's cached tokens; log-probs of the last ``rows``."""
        ids = torch.tensor([list(new_ids)], dtype=torch.long, device=self.device)
        started = time.perf_counter()
        out = self.model(input_ids=ids, past_key_values=entry.kv, use_cache=True, logits_to_keep=rows)
        self.forward_seconds += time.perf_counter() - started
        entry.kv = out.past_key_values
        entry.tokens.extend(new_ids)
        self.computed_tokens += len(new_ids)
        logits = out.logits[0, :, : self.info.vocab_size].float()
        return torch.log_softmax(logits, dim=-1).cpu()

    def _check(self, token_ids: Sequence[int], start: int, extra: int = 0) -> None:
        if not 1 <= start <= len(token_ids):
            raise ValueError(f"start: must be in [1, {len(token_ids)}] (a non-empty context), got {start}")
        if len(token_ids) + extra > self.info.context_length:
            raise ValueError(
                f"token_ids: {len(token_ids) + extra} positions exceed role {self.info.name!r}'s "
                f"context length {self.info.context_length}"
            )

    def score(self, session_id: str, token_ids: Sequence[int], start: int) -> torch.Tensor:
        """Log-probs ``[len(token_ids) - start + 1, V]`` for positions start..len(token_ids)."""
        self._check(token_ids, start)
        entry = self.caches.acquire(session_id, token_ids)
        entry.crop(min(len(entry.tokens), start - 1))  # the row for `start` needs token start-1 fed
        rows = self._forward(entry, token_ids[len(entry.tokens) :], len(token_ids) - start + 1)
        self.caches.store(session_id, entry)
        return rows

    def draft(
        self, session_id: str, token_ids: Sequence[int], k: int, sampling: SamplingParams, uniforms: Sequence[float]
    ) -> Draft:
        """k tokens from the model's own sampling distribution, and its rows 1..k+1."""
        self._check(token_ids, len(token_ids), extra=k)
        if len(uniforms) < k:
            raise ValueError(f"uniforms: need {k}, got {len(uniforms)}")
        entry = self.caches.acquire(session_id, token_ids)
        entry.crop(min(len(entry.tokens), len(token_ids) - 1))
        row = self._forward(entry, token_ids[len(entry.tokens) :], 1)
        rows, tokens = [row], []
        for u in uniforms[:k]:
            probs = sampling_probs(row[0], sampling.temperature, sampling.top_k, sampling.top_p)
            tokens.append(sample_from(probs, u))
            row = self._forward(entry, tokens[-1:], 1)
            rows.append(row)
        self.caches.store(session_id, entry)
        return Draft(tokens=tokens, logprobs=torch.cat(rows))

    def release(self, session_id: str) -> None:
        self.caches.release(session_id)
