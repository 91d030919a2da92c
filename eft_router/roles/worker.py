"""A role worker: one Hugging Face causal LM with its sessions' KV caches in slots.

The same class runs in-process (:mod:`eft_router.roles.local`) and inside a Ray Serve
replica. It is synchronous and single-threaded by design: the caller owns concurrency; a
worker only turns a batch of items into log-probs as cheaply as the cache allows. A call's
items become as few forward passes as padding allows (:func:`width_groups`): one for a step
of decodes, a separate one for a long prefill, whose width would otherwise pad every row.

With ``adapters`` it serves a co-served group: the model's own role and one role per PEFT
LoRA adapter of it, every member's rows of a call in the same forward passes (a mixed-batch
forward, one adapter per row), each member with its own share of the KV slots (an adapter
changes the keys and values, so members never share a cache). Members' slots are contiguous
ranges and a pass's rows are sorted by slot, so each member's rows of a pass are
contiguous: one segment per adapter (:class:`~.adapters.LoRARows`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from transformers import AutoModelForCausalLM

from ..core.sampling import sample_from, sampling_probs
from ..core.spec import MAX_TREE_WIDTH
from .adapters import LoRARows, attach_adapters
from .interface import Draft, DraftItem, RoleInfo, ScoreItem
from .kv_cache import ATTENTION, Session, SessionTable, SlotBatch, SlotKVCache, Tree

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
    log-probs of the last ``rows`` positions. ``role``: the group member the row is for;
    ``slot``: the session's slot in the worker's KV cache (its member's share, offset);
    ``tree``: the parents of the draft-tree nodes ``new`` ends in (:class:`~.kv_cache.Tree`
    numbering, the session's tree as this pass extends it)."""

    session: Session
    new: Sequence[int]
    rows: int
    role: str
    slot: int
    tree: tuple[int, ...] = ()

    def tree_after(self) -> Tree | None:
        """The session's draft tree once this row is fed."""
        if not self.tree:
            return self.session.tree
        if self.session.tree is not None:
            return self.session.tree.extend(self.tree)
        return Tree(len(self.session.tokens) + len(self.new) - len(self.tree), self.tree)


@dataclass
class _Drafting:
    """One item's draft as it grows: node i is ``tokens[i]``, a child of ``parents[i]`` (-1:
    the root); ``frontier``: the live branch tips, ``(branch, node)``; ``trunk``: the nodes
    before the tree branched (None: a chain so far). The session's cache holds the trunk as a
    sequence and the nodes after it as its draft tree."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    frontier: list[tuple[int, int]] = field(default_factory=lambda: [(0, -1)])
    trunk: int | None = None

    def add(self, token: int, parent: int, sampled: bool) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.sampled.append(sampled)
        return len(self.tokens) - 1

    def session_parents(self, nodes: Sequence[int]) -> tuple[int, ...]:
        """The nodes' parents in the session's draft tree (the nodes after the trunk)."""
        if self.trunk is None:
            return ()
        return tuple(self.parents[i] - self.trunk if self.parents[i] >= self.trunk else -1 for i in nodes)


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

    ``adapters`` (role -> PEFT LoRA directory) makes the worker a co-served group: members
    are ``name`` (the model itself) and each adapter role; ``infos`` has one entry per member,
    ``info`` is ``name``'s. Items name their member in ``role`` ("" is ``name``); every member
    gets ``kv_cache_bytes // slot // members`` slots.
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
        adapters: Mapping[str, str] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
        adapters = dict(adapters or {})
        if adapters and prepare is not None:
            raise ValueError(f"role {name!r}: adapter roles ({', '.join(adapters)}) cannot be co-served with a tensor-parallel shard")
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], attn_implementation=ATTENTION)
        self._lora_rows: LoRARows | None = None  # a group's: which rows of a pass are whose
        if adapters:
            loaded, self._lora_rows = attach_adapters(name, model, loaded, adapters)
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
        members = {name: str(model), **adapters}
        slots = kv_cache_bytes // per_slot // len(members)
        if slots < 1:
            each = f" for each of its {len(members)} members" if adapters else ""
            raise ValueError(
                f"role {name!r}: kv_cache_bytes {kv_cache_bytes} holds no KV slot{each} ({per_slot} bytes per session "
                f"at max_seq_len {length}); raise kv_cache_bytes or lower max_seq_len"
            )
        self.infos = {m: RoleInfo(m, path, vocab_size, int(context or length), int(slots), int(length)) for m, path in members.items()}
        self.info = self.infos[name]
        self.device = torch.device(device)
        self.kv = SlotKVCache(slots * len(members), self.info.slot_length)
        self.tables = {m: SessionTable(slots, session_idle_s, clock) for m in members}
        self.sessions = self.tables[name]  # the model's own role's sessions
        self._offsets = {m: i * slots for i, m in enumerate(members)}  # each member's share of the slots
        self.computed_tokens = 0  # tokens run through the model: what cache reuse saves
        self.forward_seconds = 0.0  # wall time inside the model's forward: the compute bound
        self.forward_passes = 0
        self.forward_rows = 0  # session rows over all passes (rows / passes: the batch size)

    # -- checks ------------------------------------------------------------------------------

    def validate(self, items: Sequence[ScoreItem | DraftItem]) -> None:
        """Raise ``ValueError`` naming the bad item and field; nothing has run yet then."""
        seen: set[tuple[str, str]] = set()
        for i, item in enumerate(items):
            n = len(item.token_ids)
            role = item.role or self.info.name
            if role not in self.infos:
                raise ValueError(f"items[{i}].role: must be one of the roles this worker serves ({', '.join(self.infos)}), got {role!r}")
            if (role, item.session_id) in seen:
                raise ValueError(f"items[{i}].session_id: {item.session_id!r} appears twice in one call")
            seen.add((role, item.session_id))
            if n < 1:
                raise ValueError(f"items[{i}].token_ids: must hold at least one token")
            extra = 0
            if isinstance(item, DraftItem):
                extra = item.k
                if not 0 <= item.params.tree_width <= MAX_TREE_WIDTH:
                    raise ValueError(f"items[{i}].params.tree_width: must be in [0, {MAX_TREE_WIDTH}], got {item.params.tree_width}")
                if item.params.tree_width > 1:  # the branches' nodes take slot positions too
                    extra = item.k * item.params.tree_width
                if item.k < 0 or len(item.uniforms) < item.k * item.params.lanes:
                    each = "one per draft" if item.params.lanes == 1 else f"{item.params.lanes} per draft position (one per branch)"
                    raise ValueError(f"items[{i}].uniforms: need {each} (k={item.k}), got {len(item.uniforms)}")
                if not 0.0 <= item.params.confidence <= 1.0:
                    raise ValueError(f"items[{i}].params.confidence: must be in [0, 1], got {item.params.confidence}")
                for other in item.also:
                    if other not in self.infos or other == role or (other, item.session_id) in seen:
                        raise ValueError(
                            f"items[{i}].also: {other!r} must be another role this worker serves "
                            f"({', '.join(self.infos)}), once per session, not the drafter {role!r}"
                        )
                    seen.add((other, item.session_id))
            elif not 0 <= item.rows <= n:
                raise ValueError(f"items[{i}].rows: must be in [0, {n}] (a row needs the token before it), got {item.rows}")
            elif item.tree and (len(item.tree) >= item.rows or any(not -1 <= p < t for t, p in enumerate(item.tree))):
                raise ValueError(
                    f"items[{i}].tree: parents must come before their children (-1: the token before the tree), "
                    f"and rows ({item.rows}) must cover the tree's {len(item.tree)} tokens and the one before"
                )
            if n + extra > self.info.slot_length:
                raise ValueError(
                    f"items[{i}].token_ids: {n + extra} positions exceed role {self.info.name!r}'s "
                    f"KV slot length {self.info.slot_length}"
                )

    # -- the forward pass ----------------------------------------------------------------------

    def _acquire(self, items: Sequence[tuple[str, str, Sequence[int]]], keeps: Sequence[int]) -> list[Session]:
        """Each ``(role, session id, token ids)``'s session, rolled back to what may stay
        cached (``keeps``)."""
        for table in self.tables.values():
            table.expire()
        protected: dict[str, set[str]] = {}
        for role, session_id, _ in items:
            protected.setdefault(role, set()).add(session_id)
        sessions = []
        for (role, session_id, token_ids), keep in zip(items, keeps):
            session, copy, moves = self.tables[role].acquire(session_id, token_ids, keep, protected[role])
            if copy is not None:
                self.kv.copy_prefix(self._offsets[role] + copy[0], self._offsets[role] + session.slot, copy[1])
            if moves:  # the accepted path of its last draft tree, into place
                self.kv.move(self._offsets[role] + session.slot, moves)
            sessions.append(session)
        return sessions

    def _row(self, role: str, session: Session, new: Sequence[int], rows: int, tree: Sequence[int] = ()) -> _Row:
        return _Row(session, new, rows, role, self._offsets[role] + session.slot, tuple(tree))

    def _forward(self, work: Sequence[_Row]) -> list[torch.Tensor]:
        """Run every row's new tokens in as few passes as :func:`width_groups` allows; per row,
        the log-probs ``[rows, V]`` of its last ``rows`` new positions."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(work)
        for group in width_groups([len(w.new) for w in work]):
            group.sort(key=lambda i: work[i].slot)  # consecutive slots: one attention call
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
        slots = [r.slot for r in rows]
        trees = [r.tree_after() for r in rows]
        batch = SlotBatch.build(slots, [len(r.session.tokens) for r in rows], widths, self.kv.slot_length, self.device, trees)
        keep = max(1, max(width - w + r.rows for w, r in zip(widths, rows)))
        self.kv.begin(batch, slots)
        if self._lora_rows is not None:  # a group's pass: the base once, each adapter's update on its rows
            self._lora_rows.segments = LoRARows.of([r.role for r in rows], base=self.info.name).segments
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
        for b, (w, r, tree) in enumerate(zip(widths, rows, trees)):
            r.session.tokens.extend(r.new)
            r.session.tree = tree
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
        roles = [it.role or self.info.name for it in items]
        sessions = self._acquire([(r, it.session_id, it.token_ids) for r, it in zip(roles, items)], [len(it.token_ids) - it.rows for it in items])
        work, where = [], []
        results = [torch.empty(0, self.info.vocab_size)] * len(items)
        for i, (role, item, session) in enumerate(zip(roles, items, sessions)):
            new = item.token_ids[len(session.tokens) :]
            if new:  # everything cached and no rows asked for: nothing to run
                work.append(self._row(role, session, new, item.rows, item.tree))
                where.append(i)
        for i, rows in zip(where, self._forward(work)):
            results[i] = rows
        return results

    @torch.inference_mode()
    def draft(self, items: Sequence[DraftItem]) -> list[Draft]:
        """Per item, up to k tokens from the model's own sampling distribution and its rows
        for the positions after each and the one before: one forward pass per draft step,
        every session still drafting advancing one token in it (one per branch of a tree). A
        session stops after its k-th token, after a stop token (whose row is still computed:
        the engine's target after the stop needs the drafter's row there), or before a token
        whose most likely value has a probability below its ``confidence``; with a
        ``tree_width`` it branches there instead, the first time (:class:`~.interface.DraftParams`).

        Each role in an item's ``also`` (another member of this group) is fed the same tokens
        in the same passes, and its rows at the same positions come back in ``others``: the
        engine then needs no score call for it."""
        self.validate(items)
        lanes: list[tuple[int, str]] = []  # (item, member): the item's drafter first, then its ``also``
        drafter: list[int] = []  # per item, its drafter's lane
        for j, it in enumerate(items):
            drafter.append(len(lanes))
            lanes += [(j, role) for role in (it.role or self.info.name, *it.also)]
        sessions = self._acquire([(role, items[j].session_id, items[j].token_ids) for j, role in lanes], [len(items[j].token_ids) - 1 for j, _ in lanes])
        first = self._forward([self._row(role, s, items[j].token_ids[len(s.tokens) :], 1) for (j, role), s in zip(lanes, sessions)])
        rows: list[list[torch.Tensor]] = [[r] for r in first]  # per lane: the root's row, then one after each node
        trees = [_Drafting() for _ in items]
        temperature = torch.tensor([it.params.temperature for it in items])
        top_k = torch.tensor([it.params.top_k for it in items])
        top_p = torch.tensor([it.params.top_p for it in items])
        floors = torch.tensor([it.params.log_confidence for it in items])
        for depth in range(max((it.k for it in items), default=0)):
            # every live branch tip of every item still drafting: (item, branch, node; -1 the root)
            tips = [(j, b, node) for j, it in enumerate(items) if depth < it.k for b, node in trees[j].frontier]
            if not tips:
                break
            last = torch.cat([rows[drafter[j]][node + 1].reshape(1, -1) for j, _, node in tips])
            index = torch.tensor([j for j, _, _ in tips])
            sure = last.max(dim=-1).values >= floors[index]
            probs = sampling_probs(last, temperature[index], top_k[index], top_p[index])
            uniforms = torch.tensor([items[j].uniforms[depth * items[j].params.lanes + b] for j, b, _ in tips], dtype=torch.float64)
            samples = sample_from(probs, uniforms).tolist()
            grown: dict[int, list[int]] = {}  # item -> its nodes added at this depth
            for j, _, _ in tips:
                trees[j].frontier = []
            for (j, b, node), ok, token, row in zip(tips, sure.tolist(), samples, last):
                tree, width = trees[j], items[j].params.tree_width
                if ok:
                    children = [(b, token, True)]
                elif width > 1 and tree.trunk is None:
                    # the first unsure position: branch into the token a chain would sample
                    # there, then the drafter's most likely others (tried after it, never
                    # accepted less often than the chain's one draft)
                    tree.trunk = len(tree.tokens)
                    tops = [t for t in torch.topk(row, width).indices.tolist() if t != token][: width - 1]
                    children = [(b, token, True)] + [(b2, top, False) for b2, top in enumerate(tops, start=1)]
                else:
                    children = []  # unsure: this branch ends
                for branch, t, was_sampled in children:
                    child = tree.add(t, node, was_sampled)
                    grown.setdefault(j, []).append(child)
                    if t not in items[j].params.stop_ids:  # a branch ends after a stop token
                        tree.frontier.append((branch, child))
            if not grown:
                break
            work, fed = [], []
            for lane, (j, role) in enumerate(lanes):
                if j in grown:
                    nodes = grown[j]
                    work.append(self._row(role, sessions[lane], [trees[j].tokens[i] for i in nodes], len(nodes), trees[j].session_parents(nodes)))
                    fed.append(lane)
            for lane, out in zip(fed, self._forward(work)):
                rows[lane].extend(out.split(1))
        drafts = []
        for j, tree in enumerate(trees):
            others = {role: torch.cat(rows[lane]) for lane, (i, role) in enumerate(lanes) if i == j and lane != drafter[j]}
            parents, sampled = (tuple(tree.parents), tuple(tree.sampled)) if tree.trunk is not None else (None, ())
            drafts.append(Draft(tree.tokens, torch.cat(rows[drafter[j]]), others, parents, sampled))
        return drafts

    def release(self, session_ids: Sequence[str]) -> None:
        """Drop these sessions on every member of the group."""
        for table in self.tables.values():
            for session_id in session_ids:
                table.release(session_id)

    def expire_idle_sessions(self) -> list[str]:
        """Free the sessions idle for longer than ``session_idle_s`` (the table checks only
        when a call touches it; a served replica calls this periodically)."""
        return [sid for table in self.tables.values() for sid in table.expire()]

    def session_ids(self) -> list[str]:
        """The cached sessions of every member, least recently used first per member (a
        session two members cache appears twice)."""
        return [sid for table in self.tables.values() for sid in table.ids()]

    @property
    def cached_tokens(self) -> int:
        return sum(table.cached_tokens for table in self.tables.values())
