"""The EFT decoder: plain and speculative sampling over any :class:`Role` backend.

Both modes are one loop over blocks. A block of k draft tokens is drafted by the drafter
role, verified by every other role in one forward pass each, combined into the target p,
and settled by the exact acceptance rule. Plain EFT is the block with k = 0: every role
scores one position and the "bonus" token is a plain sample from p. Randomness comes from
one seeded generator per request, drawn in a fixed order, so a seed fixes the output.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Coroutine, Iterable, Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .combine import combine
from .roles import Role
from .sampling import sampling_probs
from .spec import BASE_LARGE, BASE_SMALL, FT_LARGE, FT_SMALL, CombinationPlan, EFTSpec, SamplingParams, SpecError, SpeculativeParams
from .speculative import accept_block
from .stopping import StopChecker


@dataclass(frozen=True)
class TokenDiagnostics:
    """Why a token came out: its log-prob under the sampled EFT distribution, under each
    role, each fine-tune's implicit reward ``l_ft - l_base``, and the total-variation distance
    between the drafter's sampling distribution and the EFT one at that position."""

    token_id: int
    logprob: float
    role_logprobs: dict[str, float]
    rewards: dict[str, float]
    drafter_tv: float | None


@dataclass
class GenerationStats:
    seed: int
    prompt_tokens: int
    generated_tokens: int = 0
    blocks: int = 0
    drafted_tokens: int = 0
    accepted_per_block: list[int] = field(default_factory=list)

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted_per_block)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_block(self) -> float:
        return self.generated_tokens / self.blocks if self.blocks else 0.0


@dataclass
class StreamChunk:
    """Tokens accepted in one block (text may lag behind tokens while a stop string or an
    incomplete character is undecided). The last chunk carries ``finish_reason`` and stats."""

    token_ids: list[int]
    text: str
    diagnostics: list[TokenDiagnostics] = field(default_factory=list)
    finish_reason: str | None = None
    stats: GenerationStats | None = None


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: GenerationStats
    diagnostics: list[TokenDiagnostics]


@dataclass
class ScoreResult:
    """Per-token log-probs of a continuation: under the EFT distribution softmax(s) and
    under each role it reads."""

    token_ids: list[int]
    logprobs: list[float]
    role_logprobs: dict[str, list[float]]


log = logging.getLogger(__name__)
_REFERENCE = {FT_LARGE: BASE_LARGE}  # other fine-tunes are fine-tunes of base_small
_RELEASING: set[asyncio.Future] = set()  # releases still running after their caller was cancelled


async def _gather(calls: Sequence[Coroutine[Any, Any, torch.Tensor]], concurrent: bool = True) -> list[torch.Tensor]:
    """The calls' results; a failure is raised only once every call has ended. Raising at the
    first failure would let the caller release the session while the other calls still run:
    a served role would store their caches after the release, and keep them.

    ``concurrent=False`` awaits the calls one after another: for roles whose calls never
    suspend (in-process), tasks would run them in turn anyway and cost about 5% of plain
    EFT's throughput on the embedded family."""
    if not concurrent or len(calls) == 1:
        results: list[torch.Tensor] = []
        try:
            for call in calls:
                results.append(await call)
        finally:
            for call in calls[len(results) :]:  # after a failure: never started, never to run
                call.close()
        return results
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)


class Engine:
    """Runs EFT requests against a set of roles sharing one tokenizer."""

    def __init__(self, roles: Mapping[str, Role], tokenizer: PreTrainedTokenizerBase, drafter: str | None = FT_SMALL) -> None:
        if not roles:
            raise ValueError("roles: at least one role is needed")
        sizes = {name: role.info.vocab_size for name, role in roles.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"roles disagree on the vocabulary size: {sizes}")
        self.roles = dict(roles)
        self.tokenizer = tokenizer
        self.vocab_size = next(iter(sizes.values()))
        self.context_length = min(role.info.context_length for role in roles.values())
        self.default_drafter = drafter if drafter in self.roles else None
        self.eos_ids = frozenset(i for i in [tokenizer.eos_token_id] if i is not None)
        # roles that compute inline (in-process) gain nothing from concurrent calls
        self.concurrent = not all(getattr(role, "inline", False) for role in roles.values())

    @classmethod
    def local(cls, models: Mapping[str, str], **kwargs) -> "Engine":
        """An engine over in-process role workers: ``models`` maps role -> path or hub id."""
        from .local import load_local_roles

        drafter = kwargs.pop("drafter", FT_SMALL)
        roles, tokenizer = load_local_roles(models, **kwargs)
        return cls(roles, tokenizer, drafter)

    # -- validation -------------------------------------------------------------------

    def _check_ids(self, name: str, ids: Sequence[int], allow_empty: bool = False) -> list[int]:
        ids = list(ids)
        if not ids and not allow_empty:
            raise SpecError(name, "must hold at least one token")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise SpecError(f"{name}[{i}]", f"token ids must be integers in [0, {self.vocab_size}), got {t!r}")
        return ids

    def _drafter(self, speculative: SpeculativeParams) -> str | None:
        if speculative.k == 0:
            return None
        name = speculative.drafter or self.default_drafter
        if name is None or name not in self.roles:
            raise SpecError("speculative.drafter", f"must be a served role ({', '.join(self.roles)}), got {name!r}")
        return name

    # -- generation ---------------------------------------------------------------------

    async def stream(
        self,
        prompt_ids: Sequence[int],
        eft: EFTSpec = EFTSpec(),
        sampling: SamplingParams = SamplingParams(),
        speculative: SpeculativeParams = SpeculativeParams(),
        diagnostics: bool = False,
        session_id: str | None = None,
        release: bool = True,
    ) -> AsyncIterator[StreamChunk]:
        """Yield accepted tokens block by block. With ``release=False`` the roles keep the
        session's cache for a follow-up request that extends this one (multi-turn)."""
        ids = self._check_ids("prompt_ids", prompt_ids)
        plan = eft.resolve(list(self.roles))
        drafter = self._drafter(speculative)
        if len(ids) + sampling.max_new_tokens > self.context_length:
            raise SpecError(
                "sampling.max_new_tokens",
                f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) must fit the "
                f"context length {self.context_length}",
            )
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        gen = torch.Generator().manual_seed(seed)
        session = session_id or uuid.uuid4().hex
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else self.eos_ids)
        stops = StopChecker(self.tokenizer, stop_ids, sampling.stop, sampling.max_new_tokens)
        stats = GenerationStats(seed=seed, prompt_tokens=len(ids))
        tv_role = drafter or (self.default_drafter if self.default_drafter in plan.roles else None)
        try:
            while stops.finish_reason is None:
                k = min(speculative.k, sampling.max_new_tokens - len(stops.token_ids) - 1) if drafter else 0
                tokens, drafted, accepted, rows, target = await self._block(
                    session, ids, plan, drafter, k, speculative.confidence, sampling, stop_ids, gen
                )
                stats.blocks += 1
                stats.drafted_tokens += drafted
                stats.accepted_per_block.append(accepted)
                chunk = StreamChunk(token_ids=[], text="")
                for t, token in enumerate(tokens):
                    chunk.token_ids.append(token)
                    chunk.text += stops.feed(token)
                    if diagnostics:
                        at_t = {r: lp[t] for r, lp in rows.items()}
                        chunk.diagnostics.append(self._diagnose(token, at_t, target[t], plan, tv_role, sampling))
                    if stops.finish_reason is not None:
                        break
                ids.extend(chunk.token_ids)
                stats.generated_tokens += len(chunk.token_ids)
                if stops.finish_reason is not None:
                    chunk.finish_reason, chunk.stats = stops.finish_reason, stats
                yield chunk
        finally:
            if release:
                await self.release(session, [*plan.roles, *([drafter] if drafter else [])])

    async def _block(
        self,
        session: str,
        ids: list[int],
        plan: CombinationPlan,
        drafter: str | None,
        k: int,
        confidence: float,
        sampling: SamplingParams,
        stop_ids: set[int],
        gen: torch.Generator,
    ) -> tuple[list[int], int, int, dict[str, torch.Tensor], torch.Tensor]:
        """Draft up to k tokens (the drafter ends a block at a stop token, since nothing after
        it would be emitted, and before a token it is less than ``confidence`` sure of) and
        verify them: the emitted tokens, how many were drafted and accepted, each role's
        log-prob rows ``[n+1, V]`` and the target distributions ``[n+1, V]`` for n drafts.
        The uniforms are drawn for k drafts whatever n is, so a seed gives the same tokens
        as drafting past the stop would."""
        uniforms = torch.rand(2 * k + 1, generator=gen, dtype=torch.float64).tolist()
        scorers = [r for r in plan.roles if r != drafter]
        if drafter is not None:
            draft = await self.roles[drafter].draft(session, ids, k, sampling, uniforms[:k], stop_ids, confidence)
            block, draft_tokens = ids + draft.tokens, draft.tokens
        else:
            block, draft_tokens = ids, []
        n = len(draft_tokens)
        scores = [self.roles[r].score(session, block, len(ids)) for r in scorers]
        rows = dict(zip(scorers, await _gather(scores, self.concurrent)))
        if drafter is not None:
            rows[drafter] = draft.logprobs
        target = sampling_probs(combine(rows, plan), sampling.temperature, sampling.top_k, sampling.top_p)
        if draft_tokens:
            q = sampling_probs(rows[drafter][:n], sampling.temperature, sampling.top_k, sampling.top_p)
        else:
            q = target[:0]
        outcome = accept_block(target, q, draft_tokens, uniforms[k : k + n], uniforms[2 * k])
        return outcome.tokens, n, outcome.accepted, rows, target

    def _diagnose(
        self,
        token: int,
        rows: dict[str, torch.Tensor],
        target: torch.Tensor,
        plan: CombinationPlan,
        tv_role: str | None,
        sampling: SamplingParams,
    ) -> TokenDiagnostics:
        role_lp = {r: float(lp[token]) for r, lp in rows.items()}
        rewards = {
            r: role_lp[r] - role_lp[ref]
            for r in plan.behaviour
            if r.startswith("ft_") and (ref := _REFERENCE.get(r, BASE_SMALL)) in role_lp
        }
        tv = None
        if tv_role is not None and tv_role in rows:
            q = sampling_probs(rows[tv_role], sampling.temperature, sampling.top_k, sampling.top_p)
            tv = 0.5 * float((q - target).abs().sum())
        return TokenDiagnostics(token, float(torch.log(target[token])), role_lp, rewards, tv)

    async def generate(self, prompt_ids: Sequence[int], **kwargs) -> Generation:
        """Run :meth:`stream` to the end and collect the result."""
        tokens: list[int] = []
        text, diags, last = "", [], None
        async for chunk in self.stream(prompt_ids, **kwargs):
            tokens += chunk.token_ids
            text += chunk.text
            diags += chunk.diagnostics
            last = chunk
        assert last is not None and last.finish_reason is not None and last.stats is not None
        return Generation(tokens, text, last.finish_reason, last.stats, diags)

    async def release(self, session_id: str, roles: Iterable[str] | None = None) -> None:
        """Free the session's caches on ``roles`` (default: every role).

        Best effort: a role that cannot be reached keeps the cache until its LRU bound or
        idle timeout frees it; that is logged, not raised, because the request it belongs to
        has its answer already. Runs to the end even when the caller is cancelled meanwhile:
        a cancelled generation releases in its ``finally``, and a second cancellation there
        (a timeout around it, a server shutting down) must not leave the caches behind."""
        names = list(self.roles) if roles is None else list(dict.fromkeys(roles))
        releasing = asyncio.gather(*(self.roles[r].release(session_id) for r in names), return_exceptions=True)
        _RELEASING.add(releasing)  # the loop keeps only weak references to running tasks
        releasing.add_done_callback(_RELEASING.discard)
        for name, result in zip(names, await asyncio.shield(releasing)):
            if isinstance(result, Exception):
                log.warning("could not release session %s on role %s: %s", session_id, name, result)

    # -- scoring ------------------------------------------------------------------------

    async def score(self, prompt_ids: Sequence[int], continuation_ids: Sequence[int], eft: EFTSpec = EFTSpec()) -> ScoreResult:
        """Log-probs of ``continuation_ids`` after ``prompt_ids``, one forward pass per role."""
        prompt = self._check_ids("prompt_ids", prompt_ids)
        cont = self._check_ids("continuation_ids", continuation_ids)
        if len(prompt) + len(cont) > self.context_length:
            raise SpecError("continuation_ids", f"prompt + continuation must fit the context length {self.context_length}")
        plan = eft.resolve(list(self.roles))
        session = uuid.uuid4().hex
        try:
            outs = await _gather([self.roles[r].score(session, prompt + cont, len(prompt)) for r in plan.roles], self.concurrent)
        finally:
            await self.release(session, plan.roles)
        rows = {r: lp[:-1] for r, lp in zip(plan.roles, outs)}
        index = torch.tensor(cont).unsqueeze(-1)
        eft_lp = torch.log_softmax(combine(rows, plan), dim=-1).gather(-1, index).squeeze(-1)
        return ScoreResult(
            token_ids=cont,
            logprobs=eft_lp.tolist(),
            role_logprobs={r: lp.gather(-1, index).squeeze(-1).tolist() for r, lp in rows.items()},
        )
