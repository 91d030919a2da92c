"""What crosses the engine's boundary: typed requests in, typed results out.

A :class:`GenerationRequest` or :class:`ScoreRequest` is one object from the network front
to the scheduler; its fields are checked when it is built (the specs validate themselves)
and against the served roles when the engine admits it. Results are plain dataclasses the
fronts turn into their wire formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..core.spec import EFTSpec, SamplingParams, SpecError, SpeculativeParams

MAX_LOGPROBS = 20  # alternatives per token a request may ask for


def _ids(name: str, ids: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)):
        raise SpecError(name, "must be a list of token ids")
    out = tuple(ids)
    for i, t in enumerate(out):
        if isinstance(t, bool) or not isinstance(t, int):
            raise SpecError(f"{name}[{i}]", f"token ids must be integers, got {t!r}")
    return out


@dataclass(frozen=True)
class GenerationRequest:
    """Generate from ``prompt_ids``: sample from the EFT distribution ``eft`` with
    ``sampling``, speculatively with ``speculative``. ``diagnostics`` adds per-token
    diagnostics. ``logprobs`` (0 to :data:`MAX_LOGPROBS`) adds each token's log-prob under
    the EFT distribution ``softmax(s)`` (temperature 1, before top-k and top-p: the values
    ``score`` gives) and that many most likely alternatives. ``session_id`` names the
    request's session on every role (default: a fresh one); with ``keep_session`` the roles
    keep its cache after the request, for a follow-up turn that extends it (multi-turn)."""

    prompt_ids: Sequence[int]
    eft: EFTSpec = field(default_factory=EFTSpec)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    speculative: SpeculativeParams = field(default_factory=SpeculativeParams)
    diagnostics: bool = False
    logprobs: int | None = None
    session_id: str | None = None
    keep_session: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", _ids("prompt_ids", self.prompt_ids))
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise SpecError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")


@dataclass(frozen=True)
class ScoreRequest:
    """Per-token log-probs of ``continuation_ids`` after ``prompt_ids``, under the EFT
    distribution ``eft`` (temperature 1, no filters) and under each role it reads."""

    prompt_ids: Sequence[int]
    continuation_ids: Sequence[int]
    eft: EFTSpec = field(default_factory=EFTSpec)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", _ids("prompt_ids", self.prompt_ids))
        object.__setattr__(self, "continuation_ids", _ids("continuation_ids", self.continuation_ids))


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


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-prob under the EFT distribution ``softmax(s)``, and the most likely
    tokens there with theirs (as many as the request asked for)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


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
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stats: GenerationStats | None = None


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: GenerationStats
    diagnostics: list[TokenDiagnostics]
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass
class ScoreResult:
    """Per-token log-probs of a continuation: under the EFT distribution softmax(s) and
    under each role it reads."""

    token_ids: list[int]
    logprobs: list[float]
    role_logprobs: dict[str, list[float]]
