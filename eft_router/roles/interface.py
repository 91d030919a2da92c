"""The one interface between the engine and a role model, whatever runs it.

It is batch-first: each call carries one item per request of the engine's step, so a step
costs one call per role however many requests share it. The in-process backend
(:mod:`eft_router.roles.local`) and the Ray Serve backend (:mod:`eft_router.roles.serve`)
implement it; the engine sees nothing else, so both give identical results.

A backend may serve several roles (a co-served group: a base model and its LoRA adapters,
:mod:`eft_router.roles.adapters`): its ``infos`` has one entry per role, and each item
names its role in ``role`` ("" is the backend's own, ``info``). :class:`Member` shows one
role of a group as a plain :class:`Role`; the engine merges the calls of members that share
a backend into one call.

Every item carries the session id and the *full* token ids of its context: a worker that
never saw the session (or evicted it) recomputes the prefix, so correctness never depends
on routing or cache state; a cached session only makes it fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from ..core.spec import SamplingParams, SpeculativeParams


@dataclass(frozen=True)
class RoleInfo:
    """What the engine must know about a role before it sends work.

    ``kv_slots``: how many sessions one replica caches at once (its KV cache holds one slot
    per session); ``slot_length``: the most tokens one session can hold."""

    name: str
    model: str
    vocab_size: int  # the shared tokenizer's length, after trimming padded embedding rows
    context_length: int
    kv_slots: int
    slot_length: int


@dataclass(frozen=True)
class DraftParams:
    """How one request drafts: its sampling distribution (the same temperature, top-k and
    top-p as its target, so that acceptance compares what both sides sampled from) and where
    a draft ends early: after a token in ``stop_ids`` (nothing after a stop is ever emitted),
    or before a position whose most likely token has probability below ``confidence``.

    ``tree_width`` m >= 2 drafts a token tree: at the first position where the drafter is
    below its confidence (where a chain would end) it branches into m tokens, the one it
    samples there (as a chain would) and its m - 1 most likely others, and drafts on from
    each, all branches in the same passes, to depth k; a branch ends where the drafter is
    unsure again. Branch b's token at depth d uses uniform ``d * m + b`` (the sampled branch
    is branch 0)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: frozenset[int] = frozenset()
    confidence: float = 0.0
    tree_width: int = 0

    @classmethod
    def of(cls, sampling: SamplingParams, speculative: SpeculativeParams, stop_ids: frozenset[int]) -> "DraftParams":
        return cls(sampling.temperature, sampling.top_k, sampling.top_p, stop_ids, speculative.confidence, speculative.tree_width)

    @property
    def lanes(self) -> int:
        """Tokens drafted per depth at most (the uniforms needed per depth)."""
        return max(1, self.tree_width)

    @property
    def log_confidence(self) -> float:
        return math.log(self.confidence) if self.confidence > 0 else float("-inf")


@dataclass(frozen=True)
class ScoreItem:
    """Feed ``token_ids`` (the session's whole context) and return the log-probs of its last
    ``rows`` positions: row i is the distribution of the token at position
    ``len(token_ids) - rows + 1 + i`` given the tokens before it. ``rows`` 0 only fills the
    cache (a prefill chunk).

    ``tree``: the last ``len(tree)`` tokens are a draft tree, not a sequence: token i of it
    is a child of token ``tree[i]`` of it (-1: of the token before the tree), and its row is
    the distribution after it given the context and its ancestors only; ``rows`` must then
    cover the tree and the token before it. The session's next call keeps only the path its
    token ids follow."""

    session_id: str
    token_ids: Sequence[int]
    rows: int = 1
    role: str = ""
    tree: tuple[int, ...] = ()


@dataclass(frozen=True)
class DraftItem:
    """Sample up to ``k`` tokens after ``token_ids``, one per step, the i-th by inverse CDF
    on ``uniforms[i]``. ``also``: other roles of the drafter's group whose rows at the same
    positions the same forward passes compute (:attr:`Draft.others`). A tree
    (``params.tree_width``) needs ``params.lanes`` uniforms per depth."""

    session_id: str
    token_ids: Sequence[int]
    k: int
    params: DraftParams
    uniforms: Sequence[float]
    role: str = ""
    also: tuple[str, ...] = ()


@dataclass(frozen=True)
class Draft:
    """``tokens``: up to k tokens sampled from the drafter's own sampling distribution;
    ``logprobs``: its raw log-softmax rows for the positions after each of them and the one
    before, ``[len(tokens) + 1, V]``; ``others``: the same rows of each role of the item's
    ``also``.

    A draft that branched is a tree: ``parents[i]`` is token i's parent (-1: the root, the
    position after the context), ``sampled[i]`` whether it was sampled from the drafter's
    distribution there (else it is one of the top tokens a branch starts with); a chain has
    ``parents`` None."""

    tokens: list[int]
    logprobs: torch.Tensor
    others: dict[str, torch.Tensor] = field(default_factory=dict)
    parents: tuple[int, ...] | None = None
    sampled: tuple[bool, ...] = ()


@runtime_checkable
class Role(Protocol):
    info: RoleInfo  # the backend's own role
    infos: dict[str, RoleInfo]  # every role it serves (one entry, unless it is a group)

    async def score(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        """One log-prob tensor ``[item.rows, V]`` per item, in order."""
        ...

    async def draft(self, items: Sequence[DraftItem]) -> list[Draft]:
        """One draft per item, in order."""
        ...

    async def release(self, session_ids: Sequence[str]) -> None:
        """Drop these sessions' caches; unknown sessions are ignored."""
        ...

    async def probe(self, timeout_s: float) -> None:
        """Return when the role can answer calls (every replica, when it has several);
        raise :class:`RoleUnavailable` naming what does not answer within ``timeout_s``."""
        ...


class Member:
    """One role of a co-served group, as a :class:`Role` of its own: its calls go to the
    group tagged with its name. ``group`` is the shared backend: the engine sends one call
    per group and step, carrying every member's items."""

    def __init__(self, group: Role, name: str) -> None:
        self.group = group
        self.info = group.infos[name]
        self.infos = {name: self.info}

    async def score(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        return await self.group.score([replace(it, role=self.info.name) for it in items])

    async def draft(self, items: Sequence[DraftItem]) -> list[Draft]:
        return await self.group.draft([replace(it, role=self.info.name) for it in items])

    async def release(self, session_ids: Sequence[str]) -> None:
        """Frees the sessions on every member of the group (a session id is one request's)."""
        await self.group.release(session_ids)

    async def probe(self, timeout_s: float) -> None:
        await self.group.probe(timeout_s)


def members(backend: Role) -> dict[str, Role]:
    """The roles a backend serves: itself, or a :class:`Member` per role of a group."""
    if len(backend.infos) == 1:
        return {backend.info.name: backend}
    return {name: Member(backend, name) for name in backend.infos}


def backend_name(backend: Role) -> str:
    """A backend's name in call counts and metrics: its role, or its group's roles joined
    with ``+``."""
    return "+".join(backend.infos)


def backends(roles: Mapping[str, Role]) -> list[Role]:
    """The distinct backends behind ``roles`` (a group's members share one)."""
    return list({id(b): b for b in (getattr(r, "group", r) for r in roles.values())}.values())


def wrap_backends(roles: Mapping[str, Role], wrap: Callable[[Role], Role]) -> dict[str, Role]:
    """``roles`` with each backend wrapped once (``wrap`` keeps its ``infos``), and the
    members of a group rebuilt over their wrapped group."""
    wrapped = {id(b): wrap(b) for b in backends(roles)}
    out: dict[str, Role] = {}
    for name, role in roles.items():
        group = getattr(role, "group", None)
        out[name] = Member(wrapped[id(group)], name) if group is not None else wrapped[id(role)]
    return out


class RoleError(RuntimeError):
    """A call to a role failed; ``role`` names it, ``cause`` is the underlying error."""

    def __init__(self, role: str, cause: BaseException, what: str, where: str = "") -> None:
        where = f" ({where})" if where else ""
        super().__init__(f"role {role!r}{where} {what}: {type(cause).__name__}: {cause}")
        self.role = role
        self.cause = cause


class RoleUnavailable(RoleError):
    """The role could not be reached: not deployed, replicas dead or overloaded, timed out."""

    def __init__(self, role: str, cause: BaseException, where: str = "") -> None:
        super().__init__(role, cause, "is unavailable", where)


class RoleFailed(RoleError):
    """The role raised while handling the call (``cause`` is its exception)."""

    def __init__(self, role: str, cause: BaseException, where: str = "") -> None:
        super().__init__(role, cause, "failed", where)


class PartialFailure(RoleError):
    """Some items of a call failed (the replica that owns them died) and the others have
    results: ``results[i]`` for the items not in ``errors`` (item index -> its error), so
    that a fault costs only the requests it touches."""

    def __init__(self, role: str, results: list, errors: dict[int, RoleError]) -> None:
        first = next(iter(errors.values()))
        super().__init__(role, first.cause, f"failed for {len(errors)} of {len(results)} items")
        self.results = results
        self.errors = errors
