"""The EFT engine: one loop that advances every live request by one block per step.

A step is three stages, as in vLLM's ``EngineCore.step``:

1. **schedule** (:class:`Scheduler`): who runs, and what each request does: a prefill chunk,
   or its next block (the rest of its prompt, then k drafts, verified).
2. **execute**: one ``draft`` call per drafter with every speculative request's block, then
   one ``score`` call per verifying role, all roles at once, each carrying every request's
   positions. The number of role calls does not depend on the number of requests. Roles
   co-served by one backend (a base and its LoRA adapters) share each call, and the
   drafter's group returns its other members' rows with the draft: a speculative up-scaling
   block then calls two backends, not three.
3. **update**: the EFT combination and the exact acceptance rule for every request as batched
   tensor operations (each request with its own spec, temperature, top-k and top-p), then
   each request's accepted tokens go to its stream, and finished requests leave.

Plain EFT is the block with k = 0: every role scores one position and the "bonus" token is
a plain sample from p. Randomness comes from one seeded generator per request, drawn in a
fixed order, so a request's output never depends on what shares its steps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ..core.acceptance import accept_blocks, accept_tree
from ..core.combine import combine, combine_rows, plan_rows
from ..core.sampling import sampling_probs
from ..core.spec import BASE_LARGE, BASE_SMALL, FT_LARGE, FT_SMALL, SpecError
from ..core.stopping import StopChecker
from ..roles.interface import Draft, DraftItem, DraftParams, PartialFailure, Role, ScoreItem, backend_name
from .request import (
    Generation, GenerationRequest, GenerationStats, ScoreRequest, ScoreResult, StreamChunk, TokenDiagnostics, TokenLogprobs,
)
from .scheduler import Scheduler, SchedulerConfig, StepPlan, Work
from .state import END, GenerationState, RequestState, ScoreState

log = logging.getLogger(__name__)
_REFERENCE = {FT_LARGE: BASE_LARGE}  # other fine-tunes are fine-tunes of base_small
# Event-loop turns the step loop yields between steps. A step's role calls may compute on
# the loop itself (in-process roles), so whatever a step's output woke (a stream's consumer,
# then the front door's writer: a few tasks deep) gets this many turns to send it before
# the next step blocks the loop; else each chunk reached the socket one step late.
HANDOFF_HOPS = 4


class EngineStopped(RuntimeError):
    """The engine's loop ended (its event loop shut down) before the request finished."""


@dataclass(frozen=True)
class StepStats:
    """What one step did, for metrics: its duration, the requests it advanced (prefill
    chunks included), and how many requests were still waiting for admission after it."""

    seconds: float
    requests: int
    waiting: int


@dataclass
class _Block:
    """A generation's block in this step: its drafts, every role's rows ``[n + 1, V]`` at the
    block's positions, and the uniforms drawn for it. With overlapped speculation, ``ahead``
    tokens are drafted past the block while it is verified (``next``): the first of them is
    verified at the block's bonus position, the rest become the next block's drafts. A draft
    that branched (``tree``) has a row per node instead, until its accepted path is known."""

    request: GenerationState
    k: int
    uniforms: list[float]
    draft: Draft | None = None
    rows: dict[str, torch.Tensor] | None = None
    also: tuple[str, ...] = ()  # roles whose rows come with the draft (the drafter's group)
    fresh: bool = True  # drafted in this step (else drafted ahead in the last one)
    ahead: int = 0
    next: Draft | None = None
    drafted_at: int = 0  # where the continuation's uniforms start (after the drafts')
    accept_at: int = 0  # where the acceptance tests' uniforms start

    @classmethod
    def of(cls, request: GenerationState) -> "_Block":
        """The request's next block, with its uniforms drawn in a fixed order from its own
        generator: the drafts' (when drafted now; one per branch and depth for a tree), the
        continuation's, one acceptance test per draft (and for the continuation's first
        token), then the replacement or bonus."""
        ahead = request.ahead
        request.ahead = None
        k = len(ahead.tokens) if ahead is not None else request.next_k()
        m = request.ahead_k(k) if ahead is None or request.ahead_full else 0
        drafts = k * request.draft.lanes
        drafted_at = drafts if ahead is None else 0
        accept_at = drafted_at + m
        n = accept_at + drafts + (1 if request.request.speculative.overlap else 0) + 1
        u = torch.rand(n, generator=request.generator, dtype=torch.float64).tolist()
        return cls(request, k, u, draft=ahead, fresh=ahead is None, ahead=m, drafted_at=drafted_at, accept_at=accept_at)

    @property
    def tokens(self) -> list[int]:
        return self.draft.tokens if self.draft is not None else []

    @property
    def tree(self) -> bool:
        return self.draft is not None and self.draft.parents is not None

    @property
    def depth(self) -> int:
        """The drafts along the block's longest path (a chain's: all it verifies)."""
        if not self.tree:
            return len(self.verified)
        depths: list[int] = []
        for parent in self.draft.parents:
            depths.append(1 + (depths[parent] if parent >= 0 else 0))
        return max(depths)

    @property
    def verified(self) -> list[int]:
        """The tokens this block verifies: its drafts, and the continuation's first token."""
        return self.tokens + (self.next.tokens[:1] if self.next is not None else [])

    def draft_uniforms(self) -> list[float]:
        return self.uniforms[: self.drafted_at]

    def ahead_uniforms(self) -> list[float]:
        return self.uniforms[self.drafted_at : self.drafted_at + self.ahead]

    def accept_uniforms(self) -> list[float]:
        return self.uniforms[self.accept_at : self.accept_at + len(self.verified)]

    def final_uniform(self) -> float:
        return self.uniforms[-1]


class Engine:
    """Runs EFT requests against a set of roles sharing one tokenizer.

    ``drafter``: the default drafting role (when a request does not name one); ``config``:
    the scheduler's limits. An engine serves one event loop at a time (its step loop is a
    task there, started by the first request)."""

    def __init__(
        self,
        roles: Mapping[str, Role],
        tokenizer: PreTrainedTokenizerBase,
        drafter: str | None = FT_SMALL,
        config: SchedulerConfig = SchedulerConfig(),
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        if not roles:
            raise ValueError("roles: at least one role is needed")
        sizes = {name: role.info.vocab_size for name, role in roles.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"roles disagree on the vocabulary size: {sizes}")
        self.roles = dict(roles)
        self.tokenizer = tokenizer
        self.vocab_size = next(iter(sizes.values()))
        self.context_length = min(role.info.context_length for role in roles.values())
        self.slot_length = min(role.info.slot_length for role in roles.values())
        self.default_drafter = drafter if drafter in self.roles else None
        self.eos_ids = frozenset(i for i in [tokenizer.eos_token_id] if i is not None)
        self.config = config
        self.scheduler = Scheduler(config, min(role.info.kv_slots for role in roles.values()))
        self.steps = 0
        self.role_calls: Counter[tuple[str, str]] = Counter()  # (role, call) -> calls made
        self.call_seconds: Counter[tuple[str, str]] = Counter()  # (role, call) -> seconds they took, all told
        self.on_step = on_step
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._leaving: list[RequestState] = []  # the current step's leavers, until their release is done

    @classmethod
    def local(cls, models: Mapping[str, str], drafter: str | None = FT_SMALL, config: SchedulerConfig = SchedulerConfig(), **worker_kwargs: Any) -> "Engine":
        """An engine over in-process role workers: ``models`` maps role -> path or hub id;
        ``worker_kwargs`` go to each :class:`~eft_router.roles.worker.RoleWorker`."""
        from ..roles.local import load_local_roles

        roles, tokenizer = load_local_roles(models, **worker_kwargs)
        return cls(roles, tokenizer, drafter, config)

    # -- admission -----------------------------------------------------------------------------

    def _check_ids(self, name: str, ids: Sequence[int]) -> list[int]:
        if not ids:
            raise SpecError(name, "must hold at least one token")
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise SpecError(f"{name}[{i}]", f"token ids must be integers in [0, {self.vocab_size}), got {t!r}")
        return list(ids)

    def _check_fits(self, field: str, what: str, length: int) -> None:
        if length > self.context_length:
            raise SpecError(field, f"{what} must fit the context length {self.context_length}")
        if length > self.slot_length:
            shortest = min(self.roles, key=lambda r: self.roles[r].info.slot_length)
            raise SpecError(field, f"{what} must fit the KV cache slot of {self.slot_length} tokens (role {shortest!r}'s max_seq_len)")

    def _generation(self, request: GenerationRequest) -> GenerationState:
        ids = self._check_ids("prompt_ids", request.prompt_ids)
        plan = request.eft.resolve(list(self.roles))
        sampling, speculative = request.sampling, request.speculative
        drafter = None
        if speculative.k > 0:
            drafter = speculative.drafter or self.default_drafter
            if drafter is None or drafter not in self.roles:
                raise SpecError("speculative.drafter", f"must be a served role ({', '.join(self.roles)}), got {drafter!r}")
        self._check_fits(
            "sampling.max_new_tokens", f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens})",
            len(ids) + sampling.max_new_tokens,
        )
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        stop_ids = frozenset(sampling.stop_token_ids) | (frozenset() if sampling.ignore_eos else self.eos_ids)
        roles = tuple(dict.fromkeys([*plan.roles, *([drafter] if drafter else [])]))
        return GenerationState(
            session_id=request.session_id or uuid.uuid4().hex,
            context=ids,
            plan=plan,
            roles=roles,
            prefill_end=len(ids),
            request=request,
            drafter=drafter,
            draft=DraftParams.of(sampling, speculative, stop_ids),
            generator=torch.Generator().manual_seed(seed),
            stops=StopChecker(self.tokenizer, stop_ids, sampling.stop, sampling.max_new_tokens),
            stats=GenerationStats(seed=seed, prompt_tokens=len(ids)),
            tv_role=drafter or (self.default_drafter if self.default_drafter in plan.roles else None),
        )

    def _submit(self, state: RequestState) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is not loop:
            raise RuntimeError("this Engine's step loop runs on another event loop; an Engine serves one loop at a time")
        self.scheduler.add(state)
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name="eft-engine-steps")
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # -- the public calls --------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Yield the accepted tokens block by block. A bad request raises
        :class:`SpecError` before anything runs, a full queue :class:`QueueFull`; closing the
        stream early cancels the request, which leaves the next step."""
        state = self._generation(request)
        self._submit(state)
        try:
            while True:
                item = await state.outbox.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not state.finished:
                state.cancelled = True
                self._wake()

    async def generate(self, request: GenerationRequest) -> Generation:
        """Run :meth:`stream` to the end and collect the result."""
        tokens: list[int] = []
        text, diags, logprobs, last = "", [], [], None
        async for chunk in self.stream(request):
            tokens += chunk.token_ids
            text += chunk.text
            diags += chunk.diagnostics
            logprobs += chunk.logprobs
            last = chunk
        assert last is not None and last.finish_reason is not None and last.stats is not None
        return Generation(tokens, text, last.finish_reason, last.stats, diags, logprobs)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Log-probs of the continuation after the prompt, in the steps' score calls."""
        prompt = self._check_ids("prompt_ids", request.prompt_ids)
        cont = self._check_ids("continuation_ids", request.continuation_ids)
        self._check_fits("continuation_ids", "prompt + continuation", len(prompt) + len(cont))
        plan = request.eft.resolve(list(self.roles))
        context = prompt + cont[:-1]  # the last token's distribution needs only the ones before it
        state = ScoreState(uuid.uuid4().hex, context, plan, plan.roles, len(context), request=request)
        self._submit(state)
        try:
            item = await state.outbox.get()
            if isinstance(item, BaseException):
                raise item
            return item
        finally:
            if not state.finished:
                state.cancelled = True
                self._wake()

    async def release(self, session_id: str, roles: Iterable[str] | None = None) -> None:
        """Free a kept session's caches on ``roles`` (default: every role)."""
        names = list(self.roles) if roles is None else list(dict.fromkeys(roles))
        await self._release({name: [session_id] for name in names})

    async def close(self) -> None:
        """Stop the step loop; requests still in it end with :class:`EngineStopped`."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                if not self.scheduler.has_work():
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self.step()
                for _ in range(HANDOFF_HOPS):
                    await asyncio.sleep(0)
        except BaseException as err:
            # Cancelled (the event loop shuts down, or close()) or a bug: every request ends
            # with it, and every session that a role may still hold is released (the roles
            # outlive this loop). New tasks run even while the loop cancels the old ones.
            stopped = err if isinstance(err, Exception) else EngineStopped("the engine's event loop shut down")
            touched = [*self._leaving, *self.scheduler.running]
            for request in list(self.scheduler):
                request.finish(stopped)
            self.scheduler.running.clear()
            self.scheduler.waiting.clear()
            await self._release(self._sessions_to_release(touched))
            if not isinstance(err, Exception):
                raise
            log.exception("the engine's step loop failed")

    async def step(self) -> None:
        """One step for every live request: schedule, execute, update."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        blocks = await self._execute(plan)
        self._update(plan.work, blocks)
        self.steps += 1
        if self.on_step is not None:
            self.on_step(StepStats(time.perf_counter() - started, len(plan.work), len(self.scheduler.waiting)))

    # -- execute: the role calls ---------------------------------------------------------------

    def _backend(self, role: str) -> tuple[str, Role, str]:
        """Where ``role``'s calls go: the call's name (in ``role_calls``), the backend, and the
        role its items name there ("" for a backend of one role). The members of a co-served
        group share one backend, named by its roles joined with ``+``."""
        r = self.roles[role]
        group = getattr(r, "group", None)
        if group is None:
            return role, r, ""
        return backend_name(group), group, role

    def _co_served(self, role: str, roles: Iterable[str]) -> tuple[str, ...]:
        """The other roles of ``roles`` that ``role``'s backend also serves."""
        name = self._backend(role)[0]
        return tuple(r for r in roles if r != role and self._backend(r)[0] == name)

    async def _call(self, name: str, backend: Role, call: str, items: list) -> Any:
        self.role_calls[(name, call)] += 1
        started = time.perf_counter()
        try:
            return await getattr(backend, call)(items)
        finally:
            self.call_seconds[(name, call)] += time.perf_counter() - started

    async def _release(self, sessions: Mapping[str, list[str]]) -> None:
        """Best effort: a role that cannot be reached keeps the caches until its LRU bound or
        idle timeout frees them; that is logged, not raised (their requests have ended). A
        group frees a session on all its members in one call."""
        calls: dict[str, tuple[Role, dict[str, None]]] = {}
        for role, ids in sessions.items():
            if ids:
                name, backend, _ = self._backend(role)
                calls.setdefault(name, (backend, {}))[1].update(dict.fromkeys(ids))
        results = await asyncio.gather(*(self._call(n, b, "release", list(ids)) for n, (b, ids) in calls.items()), return_exceptions=True)
        for name, result in zip(calls, results):
            if isinstance(result, Exception):
                log.warning("could not release %d session(s) on role %s: %s", len(calls[name][1]), name, result)

    async def _calls(self, calls: Mapping[str, list[tuple[RequestState, Any]]], method: str) -> dict[RequestState, dict[str, Any]]:
        """One ``method`` call per backend (the roles of a co-served group share one), all at
        once; per request, its results by role. A call that fails ends the requests in it
        (with that error) and no other."""
        batches: dict[str, tuple[Role, list[tuple[RequestState, str, Any]]]] = {}
        for role, items in calls.items():
            name, backend, tag = self._backend(role)
            batch = batches.setdefault(name, (backend, []))[1]
            batch += [(request, role, replace(item, role=tag) if tag else item) for request, item in items]
        names = [n for n, (_, batch) in batches.items() if batch]
        replies = await asyncio.gather(
            *(self._call(n, batches[n][0], method, [it for _, _, it in batches[n][1]]) for n in names), return_exceptions=True
        )
        out: dict[RequestState, dict[str, Any]] = {}
        for name, reply in zip(names, replies):
            batch = batches[name][1]
            errors: dict[int, BaseException] = {}
            if isinstance(reply, PartialFailure):  # one replica of several failed: its requests end
                errors, reply = reply.errors, reply.results
            elif isinstance(reply, BaseException):
                if not isinstance(reply, Exception):
                    raise reply
                errors, reply = dict.fromkeys(range(len(batch)), reply), [None] * len(batch)
            for i, ((request, role, _), result) in enumerate(zip(batch, reply)):
                if i in errors:
                    request.finish(errors[i])
                else:
                    out.setdefault(request, {})[role] = result
        return out

    @staticmethod
    def _sessions_to_release(requests: Iterable[RequestState]) -> dict[str, list[str]]:
        """Per role, the sessions of ``requests`` to free (all but kept multi-turn sessions
        of requests that finished normally)."""
        out: dict[str, list[str]] = {}
        for request in requests:
            kept = isinstance(request, GenerationState) and request.request.keep_session and not request.cancelled
            if not kept:
                for role in request.roles:
                    out.setdefault(role, []).append(request.session_id)
        return out

    async def _execute(self, plan: StepPlan) -> list[_Block]:
        """Drafts, then scores; the leavers' releases run alongside."""
        self._leaving = plan.leaving
        releasing = asyncio.ensure_future(self._release(self._sessions_to_release(plan.leaving)))
        try:
            blocks = [
                _Block.of(w.request) for w in plan.work if w.block and isinstance(w.request, GenerationState)
            ]
            drafting: dict[str, list] = {}
            for b in blocks:
                if b.k:
                    # the drafter's group also computes its co-served roles' rows while drafting
                    b.also = self._co_served(b.request.drafter, b.request.plan.roles)
                if b.k and b.fresh:
                    item = DraftItem(b.request.session_id, b.request.context, b.k, b.request.draft, b.draft_uniforms(), also=b.also)
                    drafting.setdefault(b.request.drafter, []).append((b.request, item))
            drafts = await self._calls(drafting, "draft")
            scoring: dict[str, list] = {}
            for w in plan.work:
                request = w.request
                if request.finished:
                    continue
                if isinstance(request, ScoreState):
                    rows = _score_rows(request, w)
                    for role in request.roles:
                        scoring.setdefault(role, []).append((request, ScoreItem(request.session_id, request.context[: w.end], rows)))
                elif not w.block:  # a prefill chunk: fill every role's cache, no rows
                    for role in request.roles:
                        scoring.setdefault(role, []).append((request, ScoreItem(request.session_id, request.context[: w.end], 0)))
            ahead: dict[str, list] = {}  # overlapped speculation: drafting past the blocks being verified
            for b in blocks:
                request = b.request
                if request.finished:
                    continue
                if b.fresh and b.k:
                    b.draft = drafts[request][request.drafter]
                    # the drafter stopped unsure or at a stop, or branched: nothing to draft ahead
                    if len(b.tokens) < b.k or b.tree:
                        b.ahead = 0
                block = request.context + b.tokens
                if b.tokens and b.tokens[-1] in request.draft.stop_ids:
                    b.ahead = 0
                if b.ahead:  # a chain: the continuation's first token is verified by the chain rule
                    params = replace(request.draft, tree_width=0)
                    item = DraftItem(request.session_id, block, b.ahead, params, b.ahead_uniforms(), also=b.also)
                    ahead.setdefault(request.drafter, []).append((request, item))
                tree = b.draft.parents if b.tree else ()
                for role in request.plan.roles:
                    if not b.k or (role != request.drafter and role not in b.also):
                        item = ScoreItem(request.session_id, block, len(b.tokens) + 1, tree=tree)
                        scoring.setdefault(role, []).append((request, item))
            # verifying and drafting ahead at once: on separate deployments a step then costs
            # the longer of the two, not their sum
            scores, drafted = await asyncio.gather(self._calls(scoring, "score"), self._calls(ahead, "draft"))
            for w in plan.work:
                if isinstance(w.request, ScoreState) and not w.request.finished:
                    for role, rows in scores[w.request].items():
                        w.request.rows.setdefault(role, []).append(rows)
            for b in blocks:
                if not b.request.finished:
                    b.rows = dict(scores.get(b.request, {}))
                    if b.draft is not None:
                        b.rows[b.request.drafter] = b.draft.logprobs
                        b.rows.update(b.draft.others)
                    if b.ahead:
                        b.next = drafted[b.request][b.request.drafter]
            return [b for b in blocks if not b.request.finished]
        finally:
            await releasing
            self._leaving = []

    # -- update: combine, accept, stream -------------------------------------------------------

    def _update(self, work: Sequence[Work], blocks: list[_Block]) -> None:
        for w in work:
            if w.block and isinstance(w.request, ScoreState) and not w.request.finished:
                self._finish_score(w.request)
        if not blocks:
            return
        try:
            outcomes, targets, scores = self._settle(blocks)
        except Exception as err:  # a bug in the batched maths: the requests of this step end with it
            log.exception("settling a step's blocks failed")
            for b in blocks:
                b.request.finish(err)
            return
        for b, (tokens, accepted), target, s in zip(blocks, outcomes, targets, scores):
            try:
                self._emit(b, tokens, accepted, target, s)
            except Exception as err:
                log.exception("emitting a block failed")
                b.request.finish(err)

    def _settle(self, blocks: list[_Block]) -> tuple[list[tuple[list[int], int]], list[torch.Tensor], list[torch.Tensor]]:
        """Every block's target p and the acceptance rule, batched over the blocks: rows of
        different lengths are padded and masked, each block with its own coefficients and
        sampling parameters (a tree, whose rows branch, is walked on its own). Returns the
        outcomes, and per block its targets and scores along what it emits."""
        sizes = [len(b.tokens) + 1 for b in blocks]  # target rows: each draft's position and the bonus
        # the target p at every position of every block
        roles = [r for r in self.roles if any(r in b.rows for b in blocks)]
        rows = [
            torch.cat([b.rows[r] if r in b.rows else torch.zeros(n, self.vocab_size) for b, n in zip(blocks, sizes)])
            for r in roles
        ]
        scores = combine_rows(rows, plan_rows([b.request.plan for b in blocks], sizes, roles))
        target = sampling_probs(scores, *_params(blocks, sizes))
        targets, scored = list(torch.split(target, sizes)), list(torch.split(scores, sizes))
        outcomes: list[tuple[list[int], int]] = [([], 0)] * len(blocks)
        chains = [i for i, b in enumerate(blocks) if not b.tree]
        if chains:
            for i, o in zip(chains, self._accept_chains([blocks[i] for i in chains], [targets[i] for i in chains])):
                outcomes[i] = (o.tokens, o.accepted)
        trees = [i for i, b in enumerate(blocks) if b.tree]
        if trees:  # the drafter's q at every node of every tree, at once
            q_rows = torch.cat([blocks[i].rows[blocks[i].request.drafter] for i in trees])
            tree_sizes = [sizes[i] for i in trees]
            qs = dict(zip(trees, torch.split(sampling_probs(q_rows, *_params([blocks[i] for i in trees], tree_sizes)), tree_sizes)))
        for i in trees:
            b = blocks[i]
            o = accept_tree(
                targets[i], qs[i], b.tokens, list(b.draft.parents), list(b.draft.sampled), b.accept_uniforms(), b.final_uniform()
            )
            outcomes[i] = (o.tokens, o.accepted)
            # from here on the block is its path: the rows of what it emits
            targets[i], scored[i] = targets[i][o.rows], scored[i][o.rows]
            b.rows = {r: lp[o.rows] for r, lp in b.rows.items()}
        return outcomes, targets, scored

    def _accept_chains(self, blocks: list[_Block], targets: list[torch.Tensor]) -> list:
        """The exact rule for chain blocks, all at once (:func:`accept_blocks`)."""
        sizes = [len(t) for t in targets]
        drafts = [len(b.verified) for b in blocks]  # the bonus position verifies a continuation's first token
        # the drafters' q at the drafted positions: what each verified token was sampled from
        k = max(drafts)
        q = targets[0].new_zeros(0, self.vocab_size)
        if k:
            q_rows = torch.cat([
                row for b, n in zip(blocks, drafts) if n
                for row in (b.rows[b.request.drafter][: len(b.tokens)], b.next.logprobs[: n - len(b.tokens)] if b.next else None)
                if row is not None
            ])
            q = sampling_probs(q_rows, *_params(blocks, drafts))
        return accept_blocks(
            _pad(torch.cat(targets), sizes, k + 1),
            _pad(q, drafts, k),
            torch.tensor([b.verified + [0] * (k - n) for b, n in zip(blocks, drafts)], dtype=torch.long).reshape(len(blocks), k),
            torch.tensor(drafts),
            torch.tensor([b.accept_uniforms() + [0.0] * (k - n) for b, n in zip(blocks, drafts)], dtype=torch.float64).reshape(len(blocks), k),
            torch.tensor([b.final_uniform() for b in blocks], dtype=torch.float64),
            bonus=torch.tensor([n == len(b.tokens) for b, n in zip(blocks, drafts)]),
        )

    def _emit(self, b: _Block, tokens: list[int], accepted: int, target: torch.Tensor, scores: torch.Tensor) -> None:
        request, stops, stats = b.request, b.request.stops, b.request.stats
        top = request.request.logprobs
        eft_lp = torch.log_softmax(scores[: len(tokens)], dim=-1) if top is not None else None
        stats.blocks += 1
        stats.drafted_tokens += len(b.verified)
        stats.accepted_per_block.append(accepted)
        request.adapt(b.depth, accepted)
        chunk = StreamChunk(token_ids=[], text="")
        for t, token in enumerate(tokens):
            chunk.token_ids.append(token)
            chunk.text += stops.feed(token)
            if request.request.diagnostics:
                chunk.diagnostics.append(self._diagnose(request, token, {r: lp[t] for r, lp in b.rows.items()}, target[t]))
            if eft_lp is not None:
                best = torch.topk(eft_lp[t], top) if top else None
                alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
                chunk.logprobs.append(TokenLogprobs(token, float(eft_lp[t, token]), alternatives))
            if stops.finish_reason is not None:
                break
        request.context.extend(chunk.token_ids)
        stats.generated_tokens += len(chunk.token_ids)
        if b.next is not None and accepted == len(b.verified) and stops.finish_reason is None and len(b.next.tokens) > 1:
            # the continuation's first token was accepted: the rest is the next block's drafts
            nxt = b.next
            request.ahead = Draft(nxt.tokens[1:], nxt.logprobs[1:], {r: lp[1:] for r, lp in nxt.others.items()})
            request.ahead_full = len(nxt.tokens) == b.ahead
        if stops.finish_reason is not None:
            chunk.finish_reason, chunk.stats = stops.finish_reason, stats
        if not request.cancelled:
            request.outbox.put_nowait(chunk)
        if stops.finish_reason is not None:
            request.finish()

    def _diagnose(self, request: GenerationState, token: int, rows: dict[str, torch.Tensor], target: torch.Tensor) -> TokenDiagnostics:
        role_lp = {r: float(lp[token]) for r, lp in rows.items()}
        rewards = {
            r: role_lp[r] - role_lp[ref]
            for r in request.plan.behaviour
            if r.startswith("ft_") and (ref := _REFERENCE.get(r, BASE_SMALL)) in role_lp
        }
        tv = None
        if request.tv_role is not None and request.tv_role in rows:
            s = request.request.sampling
            q = sampling_probs(rows[request.tv_role], s.temperature, s.top_k, s.top_p)
            tv = 0.5 * float((q - target).abs().sum())
        return TokenDiagnostics(token, float(torch.log(target[token])), role_lp, rewards, tv)

    def _finish_score(self, request: ScoreState) -> None:
        cont = list(request.request.continuation_ids)
        rows = {r: torch.cat(chunks) for r, chunks in request.rows.items()}
        index = torch.tensor(cont).unsqueeze(-1)
        eft_lp = torch.log_softmax(combine(rows, request.plan), dim=-1).gather(-1, index).squeeze(-1)
        result = ScoreResult(
            token_ids=cont,
            logprobs=eft_lp.tolist(),
            role_logprobs={r: lp.gather(-1, index).squeeze(-1).tolist() for r, lp in rows.items()},
        )
        request.outbox.put_nowait(result)
        request.finish()


def _rows(values: Sequence[float | int], counts: Sequence[int]) -> torch.Tensor:
    """One value per block, repeated for each of its ``counts`` rows."""
    return torch.tensor([v for v, n in zip(values, counts) for _ in range(n)])


def _params(blocks: Sequence[_Block], counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Temperature, top-k and top-p of each block's request, for each of its ``counts`` rows."""
    sampling = [b.request.request.sampling for b in blocks]
    return _rows([s.temperature for s in sampling], counts), _rows([s.top_k for s in sampling], counts), _rows([s.top_p for s in sampling], counts)


def _pad(rows: torch.Tensor, counts: Sequence[int], width: int) -> torch.Tensor:
    """Consecutive rows ``[sum(counts), V]`` as ``[len(counts), width, V]``, block b's
    ``counts[b]`` rows first and zeros after."""
    out = rows.new_zeros(len(counts), width, rows.shape[-1])
    out[torch.arange(width) < torch.tensor(counts).unsqueeze(-1)] = rows
    return out


def _score_rows(request: ScoreState, w: Work) -> int:
    """Rows a score request's chunk returns: feeding ``context[w.start:w.end]`` predicts
    positions ``w.start + 1 .. w.end``; those from the continuation's first on are needed."""
    first_needed = len(request.request.prompt_ids)
    return max(0, w.end - max(w.start + 1, first_needed) + 1)
