"""Request-level specs: what to sample (the EFT combination) and how (sampling, speculation).

A spec is validated twice: its own fields when it is built (ranges, finiteness), and against
the roles an engine actually serves when it is resolved into a :class:`CombinationPlan`.
Every error is a :class:`SpecError` that names the offending field and what is allowed, so a
server can hand it to its client unchanged.

The ranges are those within which the float32 maths stays finite and normalised for any
model: log-probs are at least about -10^2 (log_softmax of float32 logits), so coefficients,
deltas and beta of magnitude up to :data:`MAX_COEFFICIENT` give scores far below float32's
3.4e38, and a temperature of at least :data:`MIN_TEMPERATURE` divides them into at most about
10^11; a nucleus always keeps its most likely token, so any top-p above 0 is safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Literal

BASE_LARGE = "base_large"
BASE_SMALL = "base_small"
FT_LARGE = "ft_large"
FT_SMALL = "ft_small"

Preset = Literal["upscale", "downscale", "interpolate", "linear"]
PRESETS: tuple[str, ...] = ("upscale", "downscale", "interpolate", "linear")
MAX_SPECULATIVE_K = 32
MAX_TREE_WIDTH = 8  # branches of a draft tree at most
MAX_NEW_TOKENS = 4096
MAX_COEFFICIENT = 1e4  # |beta|, |lambda|, |coefficient|: EFT's useful range is about [-3, 3]
MIN_TEMPERATURE = 1e-4  # below it (and above 0, greedy) scores / T overflow float32
MAX_TEMPERATURE = 1e4  # above it the distribution is uniform to float32 precision anyway


class SpecError(ValueError):
    """An invalid request field; ``field`` is its dotted path (e.g. ``eft.deltas.ft_x``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def is_small_finetune(role: str) -> bool:
    """Fine-tunes of ``base_small`` are the ``ft_*`` roles other than ``ft_large``."""
    return role.startswith("ft_") and role != FT_LARGE


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(name, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise SpecError(name, f"must be finite, got {value}")
    return float(value)


def _coefficient(name: str, value: float) -> float:
    value = _finite(name, value)
    if abs(value) > MAX_COEFFICIENT:
        raise SpecError(name, f"must be in [-{MAX_COEFFICIENT:g}, {MAX_COEFFICIENT:g}], got {value:g}")
    return value


def _int(name: str, value: int, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(name, f"must be an integer, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise SpecError(name, f"must be {allowed}, got {value}")
    return value


def _top_p(name: str, value: float) -> float:
    value = _finite(name, value)
    if not 0.0 < value <= 1.0:
        raise SpecError(name, f"must be in (0, 1], got {value}")
    return value


@dataclass(frozen=True)
class ScaleWeight:
    """The up-scaling weight term ``beta * mask * (l_knowledge - l_reference)``.

    ``top_p < 1`` keeps the weight only inside the top-p nucleus of the behaviour
    distribution (paper section 4.4); outside it the weight is 0 in log space (1 in
    probability space), so those tokens keep their behaviour-model probability.
    """

    knowledge: str
    reference: str
    beta: float
    top_p: float


@dataclass(frozen=True)
class CombinationPlan:
    """``s = sum_r behaviour[r] * l_r  (+ weight term)``: the resolved form of any spec."""

    behaviour: Mapping[str, float]
    weight: ScaleWeight | None = None

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role whose log-probs the combination reads, in a stable order."""
        names = dict.fromkeys(self.behaviour)
        if self.weight is not None:
            names.update(dict.fromkeys((self.weight.knowledge, self.weight.reference)))
        return tuple(names)


@dataclass(frozen=True)
class EFTSpec:
    """What distribution to sample from.

    Presets (``l_r`` is role r's log-softmax over the shared vocabulary):

    * ``upscale``: ``l_base_small + sum_i lambda_i (l_ft_i - l_base_small)
      + beta * (l_base_large - l_base_small)``; deltas default to ``{ft_small: 1}``.
      With one delta and lambda 1 this is ``l_base_large + (l_ft_small - l_base_small)``,
      and ``beta`` is the up-scaling amplification ``l_ft + beta (l_large - l_small)``.
    * ``downscale``: the same with the scales swapped: reference ``base_large``,
      knowledge ``base_small``, deltas default to ``{ft_large: 1}``.
    * ``interpolate``: reward interpolation at the fine-tunes' own scale, no scale change:
      ``l_base_small + sum_i lambda_i (l_ft_i - l_base_small)``. (Up-scaled interpolation is
      ``upscale`` with several deltas.)
    * ``linear``: ``sum_r coefficients[r] * l_r`` over any roles.

    ``weight_top_p`` < 1 filters the up-scaling weight to the nucleus of the behaviour
    distribution ``softmax(l_reference + sum_i lambda_i delta_i)``, i.e. of ``ft_small``
    for plain up-scaling.
    """

    preset: Preset = "upscale"
    deltas: Mapping[str, float] | None = None
    beta: float = 1.0
    weight_top_p: float = 1.0
    coefficients: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise SpecError("eft.preset", f"must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        _coefficient("eft.beta", self.beta)
        _top_p("eft.weight_top_p", self.weight_top_p)
        for name, table in (("eft.deltas", self.deltas), ("eft.coefficients", self.coefficients)):
            if table is not None and not isinstance(table, Mapping):
                raise SpecError(name, f"must map role names to numbers, got {type(table).__name__}")
            for role, value in (table or {}).items():
                if not isinstance(role, str) or not role:
                    raise SpecError(name, f"role names must be non-empty strings, got {role!r}")
                _coefficient(f"{name}.{role}", value)
        if self.preset == "linear":
            if not self.coefficients:
                raise SpecError("eft.coefficients", "preset 'linear' needs at least one role coefficient")
            for name, value, default in (
                ("eft.deltas", bool(self.deltas), False),
                ("eft.beta", self.beta, 1.0),
                ("eft.weight_top_p", self.weight_top_p, 1.0),
            ):
                if value != default:
                    raise SpecError(name, "is not used by preset 'linear'; put every role in eft.coefficients")
        elif self.coefficients:
            raise SpecError("eft.coefficients", f"is only for preset 'linear', not {self.preset!r}")
        if self.preset == "interpolate":
            for name, value in (("eft.beta", self.beta), ("eft.weight_top_p", self.weight_top_p)):
                if value != 1.0:
                    raise SpecError(name, "does not apply to preset 'interpolate', which has no scale change")

    def resolve(self, available: Sequence[str]) -> CombinationPlan:
        """Check the spec against the served roles and fill in the coefficients."""
        served = set(available)

        def need(role: str, field: str) -> None:
            if role not in served:
                raise SpecError(
                    field, f"{self.preset!r} needs role {role!r}, which is not served (served: {', '.join(sorted(served))})"
                )

        if self.preset == "linear":
            for role in self.coefficients or {}:
                need(role, f"eft.coefficients.{role}")
            return CombinationPlan(behaviour=dict(self.coefficients or {}))

        if self.preset == "downscale":
            reference, knowledge, default_delta = BASE_LARGE, BASE_SMALL, FT_LARGE
        else:
            reference, knowledge, default_delta = BASE_SMALL, BASE_LARGE, FT_SMALL
        deltas = dict(self.deltas) if self.deltas else {default_delta: 1.0}
        need(reference, "eft.preset")
        for role in deltas:
            path = f"eft.deltas.{role}"
            if self.preset == "downscale" and role != FT_LARGE:
                raise SpecError(path, f"down-scaling takes deltas of fine-tunes of base_large ({FT_LARGE!r}), got {role!r}")
            if self.preset != "downscale" and not is_small_finetune(role):
                raise SpecError(path, f"must be a fine-tune of base_small (an 'ft_*' role other than {FT_LARGE!r}), got {role!r}")
            need(role, path)

        behaviour = {reference: 1.0 - sum(deltas.values())}
        behaviour.update(deltas)
        if self.preset == "interpolate":
            return CombinationPlan(behaviour=behaviour)
        need(knowledge, "eft.preset")
        return CombinationPlan(behaviour, ScaleWeight(knowledge, reference, self.beta, self.weight_top_p))


@dataclass(frozen=True)
class SamplingParams:
    """How to sample from the combined scores.

    ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off. ``seed`` None draws a
    fresh seed. Generation stops at the tokenizer's EOS (unless ``ignore_eos``, for
    benchmarks), any of ``stop_token_ids``, any of the ``stop`` strings (excluded from the
    returned text), or ``max_new_tokens``.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        temperature = _finite("sampling.temperature", self.temperature)
        if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise SpecError(
                "sampling.temperature",
                f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {temperature:g}",
            )
        _int("sampling.top_k", self.top_k, 0)
        _top_p("sampling.top_p", self.top_p)
        if self.seed is not None:
            _int("sampling.seed", self.seed, 0, 2**63 - 1)
        _int("sampling.max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        for name in ("stop_token_ids", "stop"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise SpecError(f"sampling.{name}", f"must be a list, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        for i, token in enumerate(self.stop_token_ids):
            _int(f"sampling.stop_token_ids[{i}]", token, 0)
        if not isinstance(self.ignore_eos, bool):
            raise SpecError("sampling.ignore_eos", f"must be true or false, got {self.ignore_eos!r}")
        for i, text in enumerate(self.stop):
            if not isinstance(text, str) or not text:
                raise SpecError(f"sampling.stop[{i}]", "stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SpeculativeParams:
    """``k`` draft tokens per block (0 turns speculation off); ``drafter`` None uses the
    engine's default drafter (``ft_small``).

    ``confidence`` > 0 ends a block's drafting early, before a position where the drafter's
    own (temperature 1) probability of its most likely token is below it: a drafter that
    does not know the next token (a fact the large model knows) would mostly be rejected
    there, and the target samples that position itself. The choice depends only on the
    drafter's view of the prefix, so the output stays exactly EFT-distributed; whether it
    pays depends on how well the drafter's confidence tracks its acceptance.

    ``adaptive`` makes ``k`` a maximum: each block drafts the request's current block size,
    which starts at ``k``, grows by 2 after a block whose drafts were all accepted and
    shrinks by 1 (to at least 1) after one with a rejection (Hugging Face's
    ``num_assistant_tokens`` heuristic). A block's size depends only on earlier blocks, so the
    output stays exactly EFT-distributed.

    ``overlap`` drafts the next block while this one is verified (PEARL's post-verify,
    Liu et al. 2024): the drafter continues from this block's drafts, assuming they are all
    accepted, while the other roles score them. The continuation's first token is then
    verified at this block's bonus position (instead of sampling a bonus there), and when it
    is accepted the rest is the next block's drafts, already drafted: a step costs the
    *maximum* of drafting and verifying, not their sum, where the two run on different
    machines (Serve deployments). On a rejection the continuation is discarded (only drafter
    time is lost) and the next block drafts afresh. Every token is still accepted or resampled
    by the exact rule, so the output stays exactly EFT-distributed; in one process, where the
    roles take turns on one compute thread, it only adds the discarded drafts' cost.

    ``tree_width`` m >= 2 drafts a token tree where the drafter is unsure: at the first
    position below ``confidence`` (where a chain's drafting would end) the drafter branches
    into m tokens, the one it samples there and its m - 1 most likely others (so a tree is
    never accepted less often than the chain), and drafts on from each; the verifying roles score the
    whole tree in one forward pass (a tree attention mask and explicit positions), and
    SpecInfer's multi-step speculative sampling accepts at most one branch per position,
    trying them in turn against the residual, so the output stays exactly EFT-distributed.
    Only the accepted path stays in every role's KV cache. It needs ``confidence`` > 0 (where
    to branch); blocks that branch draft nothing ahead (``overlap``)."""

    k: int = 0
    drafter: str | None = None
    confidence: float = 0.0
    adaptive: bool = False
    overlap: bool = False
    tree_width: int = 0

    def __post_init__(self) -> None:
        _int("speculative.k", self.k, 0, MAX_SPECULATIVE_K)
        _int("speculative.tree_width", self.tree_width, 0, MAX_TREE_WIDTH)
        if not 0.0 <= _finite("speculative.confidence", self.confidence) <= 1.0:
            raise SpecError("speculative.confidence", f"must be in [0, 1], got {self.confidence}")
        if self.drafter is not None and (not isinstance(self.drafter, str) or not self.drafter):
            raise SpecError("speculative.drafter", f"must be a role name, got {self.drafter!r}")
        for name in ("adaptive", "overlap"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"speculative.{name}", f"must be true or false, got {getattr(self, name)!r}")
        if self.tree_width > 1 and self.k > 0 and self.confidence == 0:
            raise SpecError("speculative.tree_width", "a tree branches where the drafter is below speculative.confidence: set confidence > 0")
