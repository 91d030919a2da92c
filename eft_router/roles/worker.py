"""A role worker: one Hugging Face causal LM with its sessions' KV caches in slots.

The same class runs in-process (:mod:`eft_router.roles.local`) and inside a Ray Serve
replica. It is synchronous and single-threaded by design: the caller owns concurrency; a
worker only turns a batch of items into log-probs as cheaply as the cache allows. A call's
items become as few forward passes as padding allows (:func:`width_groups`): one for a step
of decodes, a separate one for a long prefill, whose width would otherwise pad every row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM

from ..core.sampling import sample_from, sampling_probs
from .interface import Draft, DraftItem, RoleInfo, ScoreItem
from .kv_cache import ATTENTION, Session, SessionTable, SlotBatch, SlotKVCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_KV_CACHE_BYTES = 1 << 30
PAD_SLACK = 16  # padded tokens a forward pass may waste beyond twice its real ones


def width_groups(widths: Sequence[int]) -> list[list[int]]:
    """Row indices split into forward passes: rows are padded to their pass's widest, and a
    pass's padded tokens stay within twice its real tokens plus :data:`PAD_SLACK`."""
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * widths[groups[-1][0]] <= 2 * (real + widths[i]) + PAD_SLACK:
            groups[-1].append(i)
            real += widths[i]
        else:
            groups.append([i])
            real = widths[i]
    return groups


def slot_bytes(config, slot_length: int, dtype: torch.dtype) -> int:
    """Bytes of one session's keys and values at ``slot_length`` tokens (plus the trash
    position), over every layer of an (unsharded) model with this config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * (slot_length + 1) * torch.finfo(dtype).bits // 8


@dataclass
class _Row:
    """One session's part of a forward pass: feed ``new`` after its cached tokens, keep the
    log-probs of the last ``rows`` positions."""

    session: Session
    new: Sequence[int]
    rows: int


class RoleWorker:
    """Holds one model; log-probs are computed in float32 over the shared vocabulary.

    ``vocab_size`` is the shared tokenizer's length: a model whose embedding has more rows
    (padding to a multiple of 64, say) has its extra logits trimmed before the softmax.
    ``kv_cache_bytes`` bounds the KV cache: it holds ``kv_cache_bytes // slot_bytes`` sessions
    of up to ``max_seq_len`` tokens each (default: the model's context length); the least
    recently used session makes room for a new one. ``session_idle_s`` frees a session after
    that long unused. ``prepare`` transforms the loaded model before it moves to ``device``:
    a tensor-parallel rank (``services.tensor_parallel``) swaps in its DeepSpeed shard there,
    so that the rest of the worker runs unchanged on the shard.
    """

    def __init__(
        self,
        name: str,
        model: str,
        vocab_size: int,
        dtype: str = "float32",
        device: str = "cpu",
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        max_seq_len: int | None = None,
        session_idle_s: float | None = None,
        prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], attn_implementation=ATTENTION)
        self.model = (prepare(loaded) if prepare else loaded).to(device).eval()
        rows = self.model.get_output_embeddings().weight.shape[0]
        if rows < vocab_size:
            raise ValueError(
                f"role {name!r}: model {model!r} has {rows} output rows, fewer than the shared vocabulary's {vocab_size} tokens"
            )
        config = self.model.config
        context = getattr(config, "max_position_embeddings", None)
        length = max_seq_len or context
        if not length:
            raise ValueError(f"role {name!r}: model {model!r} declares no context length; set max_seq_len")
        if context and length > context:
            raise ValueError(f"role {name!r}: max_seq_len {length} exceeds the model's context length {context}")
        per_slot = slot_bytes(config, length, DTYPES[dtype])
        slots = kv_cache_bytes // per_slot
        if slots < 1:
            raise ValueError(
                f"role {name!r}: kv_cache_bytes {kv_cache_bytes} holds no KV slot ({per_slot} bytes per session "
                f"at max_seq_len {length}); raise kv_cache_bytes or lower max_seq_len"
            )
        self.info = RoleInfo(name, str(model), vocab_size, int(context or length), int(slots), int(length))
        self.device = torch.device(device)
        self.kv = SlotKVCache(self.info.kv_slots, self.info.slot_length)
        self.sessions = SessionTable(self.info.kv_slots, session_idle_s, clock)
        self.computed_tokens = 0  # tokens run through the model: what cache reuse saves
        self.forward_seconds = 0.0  # wall time inside the model's forward: the compute bound
        self.forward_passes = 0
        self.forward_rows = 0  # session rows over all passes (rows / passes: the batch size)

    # -- checks ------------------------------------------------------------------------------

    def validate(self, items: Sequence[ScoreItem | DraftItem]) -> None:
        """Raise ``ValueError`` naming the bad item and field; nothing has run yet then."""
        seen: set[str] = set()
        for i, item in enumerate(items):
            n = len(item.token_ids)
            if item.session_id in seen:
                raise ValueError(f"items[{i}].session_id: {item.session_id!r} appears twice in one call")
            seen.add(item.session_id)
            if n < 1:
                raise ValueError(f"items[{i}].token_ids: must hold at least one token")
            extra = 0
            if isinstance(item, DraftItem):
                extra = item.k
                if item.k < 0 or len(item.uniforms) < item.k:
                    raise ValueError(f"items[{i}].uniforms: need one per draft (k={item.k}), got {len(item.uniforms)}")
                if not 0.0 <= item.params.confidence <= 1.0:
                    raise ValueError(f"items[{i}].params.confidence: must be in [0, 1], got {item.params.confidence}")
            elif not 0 <= item.rows <= n:
                raise ValueError(f"items[{i}].rows: must be in [0, {n}] (a row needs the token before it), got {item.rows}")
            if n + extra > self.info.slot_length:
                raise ValueError(
                    f"items[{i}].token_ids: {n + extra} positions exceed role {self.info.name!r}'s "
                    f"KV slot length {self.info.slot_length}"
                )

    # -- the forward pass ----------------------------------------------------------------------

    def _acquire(self, items: Sequence[ScoreItem | DraftItem], keeps: Sequence[int]) -> list[Session]:
        """Each item's session, rolled back to what may stay cached (``keeps``)."""
        self.sessions.expire()
        protected = {item.session_id for item in items}
        sessions = []
        for item, keep in zip(items, keeps):
            session, copy = self.sessions.acquire(item.session_id, item.token_ids, keep, protected)
            if copy is not None:
                self.kv.copy_prefix(copy[0], session.slot, copy[1])
            sessions.append(session)
        return sessions

    def _forward(self, work: Sequence[_Row]) -> list[torch.Tensor]:
        """Run every row's new tokens in as few passes as :func:`width_groups` allows; per row,
        the log-probs ``[rows, V]`` of its last ``rows`` new positions."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(work)
        for group in width_groups([len(w.new) for w in work]):
            group.sort(key=lambda i: work[i].session.slot)  # consecutive slots: one attention call
            rows = [work[i] for i in group]
            for i, result in zip(group, self._pass(rows)):
                out[i] = result
        return out

    def _pass(self, rows: Sequence[_Row]) -> list[torch.Tensor]:
        widths = [len(r.new) for r in rows]
        width = max(widths)
        ids = torch.tensor([list(r.new) + [0] * (width - len(r.new)) for r in rows], dtype=torch.long)
        if int(ids.max()) >= self.info.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"token ids must be in [0, {self.info.vocab_size}) for role {self.info.name!r}")
        slots = [r.session.slot for r in rows]
        batch = SlotBatch.build(slots, [len(r.session.tokens) for r in rows], widths, self.kv.slot_length, self.device)
        keep = max(1, max(width - w + r.rows for w, r in zip(widths, rows)))
        self.kv.begin(batch, slots)
        started = time.perf_counter()
        logits = self.model(
            input_ids=ids.to(self.device),
            position_ids=batch.positions,
            past_key_values=self.kv,
            use_cache=True,
            logits_to_keep=keep,
            slot_batch=batch,
        ).logits
        self.forward_seconds += time.perf_counter() - started
        self.forward_passes += 1
        self.forward_rows += len(rows)
        pieces = []
        for b, (w, r) in enumerate(zip(widths, rows)):
            r.session.tokens.extend(r.new)
            self.computed_tokens += w
            end = keep - (width - w)
            pieces.append(logits[b, end - r.rows : end, : self.info.vocab_size])
        # log_softmax of fresh float32 rows: a view of the batch's logits would pickle all of it
        logprobs = torch.log_softmax(torch.cat(pieces).float(), dim=-1).cpu()
        return list(torch.split(logprobs, [r.rows for r in rows]))

    # -- the role calls ------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        """Per item, the log-probs of its last ``rows`` positions ``[rows, V]``."""
        self.validate(items)
        sessions = self._acquire(items, [len(it.token_ids) - it.rows for it in items])
        work, where = [], []
        results = [torch.empty(0, self.info.vocab_size)] * len(items)
        for i, (item, session) in enumerate(zip(items, sessions)):
            new = item.token_ids[len(session.tokens) :]
            if new:  # everything cached and no rows asked for: nothing to run
                work.append(_Row(session, new, item.rows))
                where.append(i)
        for i, rows in zip(where, self._forward(work)):
            results[i] = rows
        return results

    @torch.inference_mode()
    def draft(self, items: Sequence[DraftItem]) -> list[Draft]:
        """Per item, up to k tokens from the model's own sampling distribution and its rows
        for the positions after each and the one before: one forward pass per draft step,
        every session still drafting advancing one token in it. A session stops after its
        k-th token, after a stop token (whose row is still computed: the engine's target after
        the stop needs the drafter's row there), or before a token whose most likely value has
        a probability below its ``confidence``."""
        self.validate(items)
        sessions = self._acquire(items, [len(it.token_ids) - 1 for it in items])
        first = self._forward([_Row(s, it.token_ids[len(s.tokens) :], 1) for it, s in zip(items, sessions)])
        rows: list[list[torch.Tensor]] = [[r] for r in first]
        tokens: list[list[int]] = [[] for _ in items]
        temperature = torch.tensor([it.params.temperature for it in items])
        top_k = torch.tensor([it.params.top_k for it in items])
        top_p = torch.tensor([it.params.top_p for it in items])
        floors = torch.tensor([it.params.log_confidence for it in items])
        for step in range(max((it.k for it in items), default=0)):
            live = [
                j
                for j, it in enumerate(items)
                if step < it.k and not (tokens[j] and tokens[j][-1] in it.params.stop_ids)
            ]
            if live:
                last = torch.cat([rows[j][-1] for j in live])
                sure = last.max(dim=-1).values >= floors[live]
                live = [j for j, ok in zip(live, sure.tolist()) if ok]
            if not live:
                break
            index = torch.tensor(live)
            probs = sampling_probs(last[sure], temperature[index], top_k[index], top_p[index])
            uniforms = torch.tensor([items[j].uniforms[step] for j in live], dtype=torch.float64)
            for j, token in zip(live, sample_from(probs, uniforms).tolist()):
                tokens[j].append(token)
            for j, row in zip(live, self._forward([_Row(sessions[j], tokens[j][-1:], 1) for j in live])):
                rows[j].append(row)
        return [Draft(t, torch.cat(r)) for t, r in zip(tokens, rows)]

    def release(self, session_ids: Sequence[str]) -> None:
        for session_id in session_ids:
            self.sessions.release(session_id)

    def expire_idle_sessions(self) -> list[str]:
        """Free the sessions idle for longer than ``session_idle_s`` (the table checks only
        when a call touches it; a served replica calls this periodically)."""
        return self.sessions.expire()
