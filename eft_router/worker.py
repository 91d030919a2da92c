"""A role worker: one Hugging Face causal LM with per-session KV caches.

The same class runs in-process (:mod:`eft_router.local`) and inside a Ray Serve replica. It
is synchronous and single-threaded by design: the caller (an event loop or a Serve replica)
owns concurrency; a worker only turns token ids into log-probs as cheaply as the cache allows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from .kv_cache import CacheEntry, SessionCaches
from .roles import Draft, RoleInfo
from .sampling import sample_from, sampling_probs
from .spec import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_CACHED_TOKENS = 1 << 16


@dataclass(frozen=True)
class ScoreRequest:
    """The arguments of one :meth:`RoleWorker.score` call, as an item of a batch."""

    session_id: str
    token_ids: Sequence[int]
    start: int


@dataclass(frozen=True)
class DraftRequest:
    """The arguments of one :meth:`RoleWorker.draft` call, as an item of a batch."""

    session_id: str
    token_ids: Sequence[int]
    k: int
    sampling: SamplingParams
    uniforms: Sequence[float]
    stop_ids: frozenset[int] = frozenset()
    confidence: float = 0.0


def _waves(requests: Sequence[ScoreRequest | DraftRequest]) -> list[list[int]]:
    """Request indices split into waves with each session at most once per wave, a
    session's requests in their order: a session's second step needs its first one's cache."""
    waves: list[list[int]] = []
    seen: dict[str, int] = {}
    for i, request in enumerate(requests):
        wave = seen[request.session_id] = seen.get(request.session_id, -1) + 1
        if wave == len(waves):
            waves.append([])
        waves[wave].append(i)
    return waves


def _stack_caches(caches: list[DynamicCache], lengths: list[int], past: int) -> DynamicCache:
    """One batch cache holding each session's keys/values left-padded to ``past`` positions.
    A batch of one uses its cache as is: the unbatched pass, exactly."""
    if len(caches) == 1:
        return caches[0]
    if past == 0:
        return DynamicCache()
    ref = next(c for c, n in zip(caches, lengths) if n)
    stacked = []
    for layer in range(len(ref.layers)):
        pair = []
        for name in ("keys", "values"):
            like = getattr(ref.layers[layer], name)
            out = like.new_zeros(len(caches), like.shape[1], past, like.shape[3])
            for i, (cache, n) in enumerate(zip(caches, lengths)):
                if n:
                    out[i, :, past - n :] = getattr(cache.layers[layer], name)[0]
            pair.append(out)
        stacked.append(tuple(pair))
    return DynamicCache(stacked)


def _row_cache(cache: DynamicCache, row: int, begin: int, end: int) -> DynamicCache:
    """Row ``row``'s keys/values at positions ``begin:end`` of a batch cache, copied (the
    cache's update concatenates), so a session never holds on to the batch's tensors."""
    cut = (slice(row, row + 1), slice(None), slice(begin, end))
    return DynamicCache([(layer.keys[cut], layer.values[cut]) for layer in cache.layers])


class RoleWorker:
    """Holds one model; log-probs are computed in float32 over the shared vocabulary.

    ``vocab_size`` is the shared tokenizer's length: a model whose embedding has more rows
    (padding to a multiple of 64, say) has its extra logits trimmed before the softmax.
    ``session_idle_s`` frees a session's cache after that long unused (None: only the
    ``max_cached_tokens`` LRU bound and releases free caches).
    ``prepare`` transforms the loaded model before it moves to ``device``: a tensor-parallel
    rank (``services.tensor_parallel``) swaps in its DeepSpeed shard there, so that the rest
    of the worker runs unchanged on the shard.
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
        prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype])
        self.model = (prepare(loaded) if prepare else loaded).to(device).eval()
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
        self.batches = 0  # forward passes that ran several sessions at once
        self.batched_calls = 0  # the session rows of those passes

    @torch.inference_mode()
    def _forward_many(self, entries: list[CacheEntry], new_ids: list[Sequence[int]], rows: list[int]) -> list[torch.Tensor]:
        """One forward pass running ``new_ids[i]`` after entry i's cached tokens (distinct
        sessions); per entry, the log-probs of its last ``rows[i]`` new positions.

        Layout of row i, ``past`` the longest cache and ``width`` the most new tokens: its
        cache left-padded to ``past``, then its new tokens right-padded to ``width``. Pads
        get zero attention weight (2-D mask) and the real tokens their own positions
        (explicit ``position_ids``), so each row computes what it would alone, up to float
        summation order. Afterwards each entry gets back its own keys/values, pads cut.
        """
        cached = [len(e.tokens) for e in entries]
        past, width = max(cached), max(map(len, new_ids))
        ids = torch.tensor([list(n) + [0] * (width - len(n)) for n in new_ids], dtype=torch.long, device=self.device)
        mask = positions = None  # all rows aligned: the model's own causal mask and positions
        if len(set(cached)) > 1 or any(len(n) < width for n in new_ids):
            positions = torch.tensor([range(c, c + width) for c in cached], dtype=torch.long, device=self.device)
            mask = torch.tensor(
                [[0] * (past - c) + [1] * (c + len(n)) + [0] * (width - len(n)) for c, n in zip(cached, new_ids)],
                dtype=torch.long,
                device=self.device,
            )
        keep = max(width - len(n) + r for n, r in zip(new_ids, rows))  # kept tail covers every row's rows
        started = time.perf_counter()
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            past_key_values=_stack_caches([e.kv for e in entries], cached, past),
            use_cache=True,
            logits_to_keep=keep,
        )
        self.forward_seconds += time.perf_counter() - started
        if len(entries) > 1:
            self.batches += 1
            self.batched_calls += len(entries)
        results = []
        for i, (entry, n, r) in enumerate(zip(entries, new_ids, rows)):
            kv = out.past_key_values  # a batch of one: the entry's own cache, updated in place
            entry.kv = kv if len(entries) == 1 else _row_cache(kv, i, past - cached[i], past + len(n))
            entry.tokens.extend(n)
            self.computed_tokens += len(n)
            end = keep - (width - len(n))
            # log_softmax per row: a fresh [r, V] tensor, never a view of the batch's logits
            # (pickling a view would ship the whole batch: see serve_backend.block_bytes)
            logits = out.logits[i, end - r : end, : self.info.vocab_size].float()
            results.append(torch.log_softmax(logits, dim=-1).cpu())
        return results

    def validate(self, request: ScoreRequest | DraftRequest) -> None:
        """Raise ``ValueError`` naming the bad argument. A Serve replica calls it before a
        request joins a batch, so that a bad request fails alone, not with its batch."""
        ids = request.token_ids
        if isinstance(request, DraftRequest):
            if len(request.uniforms) < request.k:
                raise ValueError(f"uniforms: need {request.k}, got {len(request.uniforms)}")
            if not 0.0 <= request.confidence <= 1.0:
                raise ValueError(f"confidence: must be in [0, 1], got {request.confidence}")
            start, extra = len(ids), request.k
        else:
            start, extra = request.start, 0
        if not 1 <= start <= len(ids):
            raise ValueError(f"start: must be in [1, {len(ids)}] (a non-empty context), got {start}")
        if len(ids) + extra > self.info.context_length:
            raise ValueError(
                f"token_ids: {len(ids) + extra} positions exceed role {self.info.name!r}'s "
                f"context length {self.info.context_length}"
            )

    def _acquire(self, session_id: str, token_ids: Sequence[int], fed: int) -> CacheEntry:
        """The session's entry holding at most the first ``fed`` tokens (a row is computed
        only by feeding the token before it, so at least one token is always new)."""
        entry = self.caches.acquire(session_id, token_ids)
        entry.crop(min(len(entry.tokens), fed))
        return entry

    def score_many(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
        """:meth:`score` for many requests, one forward pass per wave of distinct sessions."""
        for request in requests:
            self.validate(request)
        results: dict[int, torch.Tensor] = {}
        for wave in _waves(requests):
            batch = [requests[i] for i in wave]
            entries = [self._acquire(r.session_id, r.token_ids, r.start - 1) for r in batch]
            new = [r.token_ids[len(e.tokens) :] for r, e in zip(batch, entries)]
            rows = self._forward_many(entries, new, [len(r.token_ids) - r.start + 1 for r in batch])
            for i, r, entry, row in zip(wave, batch, entries, rows):
                self.caches.store(r.session_id, entry)
                results[i] = row
        return [results[i] for i in range(len(requests))]

    def draft_many(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        """:meth:`draft` for many requests: per wave of distinct sessions, one forward pass
        per draft step, every session still drafting advancing one token in it. A session
        stops after its k-th token, after a stop token (whose row is still computed: the
        decoder's target after the stop needs the drafter's row there), or before a token
        whose most likely value has a probability below the request's ``confidence``."""
        for request in requests:
            self.validate(request)
        results: dict[int, Draft] = {}
        for wave in _waves(requests):
            batch = [requests[i] for i in wave]
            entries = [self._acquire(r.session_id, r.token_ids, len(r.token_ids) - 1) for r in batch]
            new = [r.token_ids[len(e.tokens) :] for r, e in zip(batch, entries)]
            rows = [[row] for row in self._forward_many(entries, new, [1] * len(batch))]
            tokens: list[list[int]] = [[] for _ in batch]
            floors = [math.log(r.confidence) if r.confidence > 0 else None for r in batch]
            for step in range(max(r.k for r in batch)):
                live = [
                    j
                    for j, r in enumerate(batch)
                    if step < r.k
                    and not (tokens[j] and tokens[j][-1] in r.stop_ids)
                    and (floors[j] is None or float(rows[j][-1][0].max()) >= floors[j])
                ]
                if not live:
                    break
                for j in live:
                    s = batch[j].sampling
                    probs = sampling_probs(rows[j][-1][0], s.temperature, s.top_k, s.top_p)
                    tokens[j].append(sample_from(probs, batch[j].uniforms[step]))
                nexts = self._forward_many([entries[j] for j in live], [tokens[j][-1:] for j in live], [1] * len(live))
                for j, row in zip(live, nexts):
                    rows[j].append(row)
            for j, (i, r) in enumerate(zip(wave, batch)):
                self.caches.store(r.session_id, entries[j])
                results[i] = Draft(tokens=tokens[j], logprobs=torch.cat(rows[j]))
        return [results[i] for i in range(len(requests))]

    def score(self, session_id: str, token_ids: Sequence[int], start: int) -> torch.Tensor:
        """Log-probs ``[len(token_ids) - start + 1, V]`` for positions start..len(token_ids)."""
        return self.score_many([ScoreRequest(session_id, token_ids, start)])[0]

    def draft(
        self, session_id: str, token_ids: Sequence[int], k: int, sampling: SamplingParams, uniforms: Sequence[float],
        stop_ids: Collection[int] = (), confidence: float = 0.0,
    ) -> Draft:
        """Up to k tokens from the model's own sampling distribution (ending after a token in
        ``stop_ids`` or before one it is less than ``confidence`` sure of), and its rows for
        the positions after each and the one before."""
        return self.draft_many([DraftRequest(session_id, token_ids, k, sampling, uniforms, frozenset(stop_ids), confidence)])[0]

    def release(self, session_id: str) -> None:
        self.caches.release(session_id)

    def expire_idle_sessions(self) -> None:
        """Free the sessions idle for longer than ``session_idle_s``. The caches check only
        when a call touches them; a served replica calls this periodically so that idle
        sessions go even when no further call comes."""
        self.caches.expire()
