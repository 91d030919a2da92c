"""KV caches in preallocated slots, updated in place by batched forward passes.

Each layer's keys and values live in one buffer ``[slots, kv_heads, slot_length + 1, head_dim]``
(gpt-fast's static cache, with one slot per session and per-row lengths). A forward pass over
a batch of sessions writes every new token's key and value straight into its session's slot
(:meth:`SlotKVCache.update`), and attention reads each slot in place: rows whose slots are
consecutive form a *run*, and a run is one ``scaled_dot_product_attention`` over a view of the
buffer (:func:`slot_attention`). Nothing is copied per step, so a step's cost does not grow
with the context of the sessions it does not touch, and rows of different lengths share a
pass (positions beyond a row's length are masked). Padding tokens (rows with fewer new tokens
than the widest) write to a trash position past the slot's end that attention never reads.

:class:`SessionTable` maps sessions to slots: rollback to an accepted prefix moves a length;
a new session copies the longest matching prefix of a live session into its slot once; the
least recently used session not in the current call is evicted when every slot is taken.

A session may end in a draft *tree* (:class:`Tree`: speculative branches scored in one pass,
SpecInfer's token-tree verification): its nodes follow the context in the slot in the order
they were fed, each at the position id of its depth, each query seeing the context and its
own ancestors only. The session's next call names the path that was accepted (its token ids
continue the context); that path's keys and values are moved into place after the context
and the rest of the tree is dropped, so the cache then holds exactly the accepted path.

Slots are allocated lazily (the buffers when the first forward pass shows the shard's head
count, dtype and device) and zeroed on first use, so memory that is never used is never
touched, and attention never reads memory that no forward pass wrote.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "eft_slots"  # the attention implementation name models are loaded with
MAX_GAP = 8  # free or idle slots a run may span between two rows (their attention is wasted)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(frozen=True)
class Tree:
    """Draft-tree nodes at the end of a session's slot: node i at slot position ``start + i``,
    a child of node ``parents[i]`` (-1: of the context's last token, at ``start - 1``);
    parents come before their children."""

    start: int
    parents: tuple[int, ...]

    def ancestry(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, n]`` bool: node j is node i's ancestor or i itself; and each node's depth
        (0: a child of the root)."""
        n = len(self.parents)
        sees = torch.eye(n, dtype=torch.bool)
        depth = [0] * n
        for i, p in enumerate(self.parents):
            if p >= 0:
                sees[i] |= sees[p]
                depth[i] = depth[p] + 1
        return sees, torch.tensor(depth, dtype=torch.long)

    def extend(self, parents: Sequence[int]) -> "Tree":
        return Tree(self.start, self.parents + tuple(parents))

    def follow(self, node_tokens: Sequence[int], ids: Sequence[int]) -> list[int]:
        """The longest chain of nodes, from the root, whose tokens are ``ids``' first ones."""
        path, at = [], -1
        for token in ids:
            child = next((i for i, (p, t) in enumerate(zip(self.parents, node_tokens)) if p == at and t == token), None)
            if child is None:
                break
            path.append(child)
            at = child
        return path


@dataclass(frozen=True)
class Run:
    """Batch rows ``rows`` (consecutive, in slot order) whose slots lie in ``slots``: one
    attention call over the first ``length`` positions of that span of slots, with ``mask``
    (additive, ``[span, 1, width, length]``; None when every row attends to all of them).
    ``offsets``: each row's place in the span, when the span also holds other slots (a gap of
    free or idle slots, computed and thrown away: cheaper than a call per piece)."""

    rows: slice
    slots: slice
    length: int
    mask: torch.Tensor | None
    offsets: torch.Tensor | None


@dataclass(frozen=True)
class SlotBatch:
    """Where one forward pass reads and writes: row b holds ``cached[b]`` tokens in slot
    ``slots[b]`` and feeds ``new[b]`` tokens (right-padded to the batch width)."""

    slot_index: torch.Tensor  # [B, W]: the slot of each new token
    write_index: torch.Tensor  # [B, W]: its position (the trash position for pads)
    positions: torch.Tensor  # [B, W]: position ids of the new tokens
    runs: tuple[Run, ...]

    @classmethod
    def build(
        cls, slots: Sequence[int], cached: Sequence[int], new: Sequence[int], slot_length: int, device: torch.device,
        trees: Sequence[Tree | None] | None = None,
    ) -> "SlotBatch":
        """``slots`` must be increasing (the caller orders the rows by slot). ``trees[b]``:
        row b's draft tree once this pass has fed it (its new tokens from ``start`` on are
        nodes), or None."""
        width = max(new)
        cached_t = torch.tensor(cached, dtype=torch.long)
        new_t = torch.tensor(new, dtype=torch.long)
        j = torch.arange(width)
        positions = cached_t.unsqueeze(-1) + j
        write = torch.where(j < new_t.unsqueeze(-1), positions, slot_length)
        # query j of row b sees positions 0..cached+j (pads: as the row's last real token)
        sees = cached_t.unsqueeze(-1) + torch.minimum(j, new_t.unsqueeze(-1) - 1)
        # row -> (its first query in the tree, the first node it feeds, the tree's ancestry)
        hidden: dict[int, tuple[int, int, torch.Tensor, int]] = {}
        for b, tree in enumerate(trees or ()):
            if tree is not None:
                first = max(0, tree.start - cached[b])  # the first new token that is a node
                node = cached[b] + first - tree.start
                ancestry, depth = tree.ancestry()
                positions[b, first : new[b]] = tree.start + depth[node:]
                hidden[b] = (first, node, ancestry, tree.start)
        bounds = [0] + [b for b in range(1, len(slots)) if slots[b] - slots[b - 1] > MAX_GAP + 1] + [len(slots)]
        runs = [cls._run(slots, sees, start, end, width, device, hidden) for start, end in zip(bounds, bounds[1:])]
        slot_index = torch.tensor(slots, dtype=torch.long).unsqueeze(-1).expand(-1, width)
        return cls(slot_index.to(device), write.to(device), positions.to(device), tuple(runs))

    @staticmethod
    def _run(
        slots: Sequence[int], sees: torch.Tensor, start: int, end: int, width: int, device: torch.device,
        hidden: dict[int, tuple[int, int, torch.Tensor, int]],
    ) -> Run:
        first, span = slots[start], slots[end - 1] - slots[start] + 1
        mine = sees[start:end]
        length = int(mine.max()) + 1
        offsets = None
        if span > end - start:  # a gap: its rows see position 0 only (their output is dropped)
            offsets = torch.tensor(slots[start:end], dtype=torch.long) - first
            mine = torch.zeros(span, width, dtype=torch.long).index_copy_(0, offsets, mine)
        mask = None
        trees = [b for b in range(start, end) if b in hidden]
        if width > 1 or offsets is not None or trees or bool((mine != length - 1).any()):
            visible = torch.arange(length) <= mine.unsqueeze(-1)
            for b in trees:  # a tree node sees the context and its own ancestors
                row = b - start if offsets is None else int(offsets[b - start])
                q0, node, ancestry, tree_start = hidden[b]
                fed = ancestry[node:, :]  # the nodes this pass feeds, over every node of the tree
                visible[row, q0 : q0 + len(fed), tree_start : tree_start + ancestry.shape[1]] = fed
            mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")).unsqueeze(1).to(device)
        return Run(slice(start, end), slice(first, first + span), length, mask, None if offsets is None else offsets.to(device))


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    slot_batch: SlotBatch | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` ``[B, heads, W, D]`` over the slot buffers ``key``/``value``
    (what :meth:`SlotKVCache.update` returns), one call per run. Returns ``[B, W, heads, D]``.
    Without a slot batch (the model called directly, no slot cache) it is plain causal SDPA."""
    if slot_batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for run in slot_batch.runs:
        q = query[run.rows]
        if run.offsets is not None:
            q = q.new_zeros(run.slots.stop - run.slots.start, *q.shape[1:]).index_copy_(0, run.offsets, q)
        out = F.scaled_dot_product_attention(
            q, key[run.slots, :, : run.length], value[run.slots, :, : run.length],
            attn_mask=run.mask, scale=scaling, enable_gqa=gqa,
        )
        if run.offsets is not None:
            out = out.index_select(0, run.offsets)
        outs.append(out.transpose(1, 2))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), None


AttentionInterface.register(ATTENTION, slot_attention)


class SlotKVCache:
    """The per-layer slot buffers, used as the model's ``past_key_values`` (the only cache
    method a decoder calls when given explicit position ids is ``update``)."""

    def __init__(self, num_slots: int, slot_length: int) -> None:
        self.num_slots = num_slots
        self.slot_length = slot_length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.batch: SlotBatch | None = None
        self._unwritten = set(range(num_slots))  # slots whose memory no forward pass touched

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def begin(self, batch: SlotBatch, slots: Sequence[int]) -> None:
        """Make ``batch`` the current forward pass; zero the slots used for the first time."""
        self.batch = batch
        fresh = [s for s in slots if s in self._unwritten]
        for s in fresh:
            self._unwritten.discard(s)
            for buf in self.keys + self.values:
                buf[s].zero_()
        self._fresh_in_batch = fresh  # layers allocated during this pass zero them too

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            shape = (self.num_slots, key_states.shape[1], self.slot_length + 1, key_states.shape[3])
            for bufs in (self.keys, self.values):
                buf = key_states.new_empty(shape)
                for s in self._fresh_in_batch:
                    buf[s].zero_()
                bufs.append(buf)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        b = self.batch
        k[b.slot_index, :, b.write_index] = key_states.transpose(1, 2)
        v[b.slot_index, :, b.write_index] = value_states.transpose(1, 2)
        return k, v

    def move(self, slot: int, moves: Sequence[tuple[int, int]]) -> None:
        """Within ``slot``, position ``target`` takes the keys and values of ``source``, for
        each ``(source, target)`` (all read before any is written)."""
        sources = torch.tensor([m[0] for m in moves], dtype=torch.long)
        targets = torch.tensor([m[1] for m in moves], dtype=torch.long)
        for buf in self.keys + self.values:
            buf[slot, :, targets] = buf[slot, :, sources]

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Slot ``target`` starts as a copy of the first ``length`` positions of ``source``."""
        fresh = target in self._unwritten
        self._unwritten.discard(target)
        for buf in self.keys + self.values:
            if fresh:
                buf[target].zero_()
            buf[target, :, :length] = buf[source, :, :length]


@dataclass
class Session:
    slot: int
    tokens: list[int] = field(default_factory=list)  # the tokens whose keys/values the slot holds
    last_used: float = 0.0
    tree: Tree | None = None  # the draft tree ``tokens`` end in (from ``tree.start`` on)

    @property
    def linear(self) -> list[int]:
        """The tokens that form a sequence (the context before a draft tree)."""
        return self.tokens if self.tree is None else self.tokens[: self.tree.start]

    def settle_tree(self, token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Keep only the tree's nodes that ``token_ids`` follow, moved into place after the
        context: the ``(source, target)`` slot positions to move."""
        if self.tree is None:
            return []
        start = self.tree.start
        path = self.tree.follow(self.tokens[start:], token_ids[start:])
        self.tokens = self.tokens[:start] + [self.tokens[start + i] for i in path]
        self.tree = None
        return [(start + i, start + j) for j, i in enumerate(path) if i != j]


class CacheFull(RuntimeError):
    """A call has more sessions than the cache has slots."""


class SessionTable:
    """Sessions and their slots, least recently used first; ``idle_s`` frees sessions unused
    for that long (checked whenever the table is touched)."""

    def __init__(self, num_slots: int, idle_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if num_slots < 1:
            raise ValueError(f"the KV cache needs at least one slot, got {num_slots}")
        if idle_s is not None and not idle_s > 0:
            raise ValueError(f"session_idle_s must be > 0 or None, got {idle_s}")
        self.num_slots = num_slots
        self.idle_s = idle_s
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._free = list(range(num_slots))  # a heap: new sessions take the lowest slot

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def ids(self) -> list[str]:
        """Cached session ids, least recently used first."""
        return list(self._sessions)

    def tokens_of(self, session_id: str) -> list[int]:
        return list(self._sessions[session_id].tokens)

    @property
    def cached_tokens(self) -> int:
        return sum(len(s.tokens) for s in self._sessions.values())

    def expire(self) -> list[str]:
        """Free the sessions idle for longer than ``idle_s``; returns their ids."""
        if self.idle_s is None:
            return []
        deadline = self.clock() - self.idle_s
        gone = []
        while self._sessions:
            session_id, session = next(iter(self._sessions.items()))
            if session.last_used >= deadline:
                break
            self.release(session_id)
            gone.append(session_id)
        return gone

    def acquire(
        self, session_id: str, token_ids: Sequence[int], keep: int, protected: set[str]
    ) -> tuple[Session, tuple[int, int] | None, list[tuple[int, int]]]:
        """The session's entry holding at most the first ``keep`` tokens of ``token_ids``
        (its cache rolled back to their common prefix); for a new session, ``(source slot,
        length)`` of a live session's prefix to copy into its slot, or None; and the moves
        within its slot that keep the accepted path of its draft tree (:meth:`Session.settle_tree`).
        Sessions in ``protected`` (the rest of the call) are never evicted."""
        session = self._sessions.get(session_id)
        copy, moves = None, []
        if session is None:
            session = Session(self._take_slot(protected | {session_id}))
            source, best = None, 0
            for other in self._sessions.values():
                n = min(common_prefix_len(other.linear, token_ids), keep)
                if n > best:
                    source, best = other, n
                    if best == keep:  # none can give more
                        break
            if source is not None:
                session.tokens = list(token_ids[:best])
                copy = (source.slot, best)
            self._sessions[session_id] = session
        else:
            moves = session.settle_tree(token_ids)
            del session.tokens[min(common_prefix_len(session.tokens, token_ids), keep) :]
        session.last_used = self.clock()
        self._sessions.move_to_end(session_id)
        return session, copy, moves

    def _take_slot(self, protected: set[str]) -> int:
        if self._free:
            return heapq.heappop(self._free)
        for session_id, session in self._sessions.items():  # least recently used first
            if session_id not in protected:
                del self._sessions[session_id]
                return session.slot
        raise CacheFull(f"all {self.num_slots} KV cache slots hold sessions of this call")

    def release(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            heapq.heappush(self._free, session.slot)
