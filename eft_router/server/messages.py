"""Between the gRPC messages of ``eft.v1`` and the engine's types, both ways.

Requests become engine arguments here and nowhere else: the server and the client share
these functions, so a field means the same on both sides. Every problem is raised as a
:class:`SpecError` naming the field by its path in the request (``sampling.top_p``), which
the server answers as INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from ..api import eft_pb2 as pb
from ..core.spec import EFTSpec, SamplingParams, SpecError, SpeculativeParams
from ..engine.request import Generation, GenerationRequest, GenerationStats, ScoreRequest, ScoreResult, StreamChunk, TokenDiagnostics

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "user", "assistant")

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
"""Text, token ids, or chat messages ``[{"role": "user", "content": "..."}]``."""


@dataclass(frozen=True)
class RequestDefaults:
    """What an unset request field means on this server (the ensemble config's ``defaults``)."""

    eft: EFTSpec = field(default_factory=EFTSpec)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    speculative: SpeculativeParams = field(default_factory=SpeculativeParams)

    @classmethod
    def from_dicts(cls, eft: dict | None = None, sampling: dict | None = None, speculative: dict | None = None) -> "RequestDefaults":
        return cls(EFTSpec(**(eft or {})), SamplingParams(**(sampling or {})), SpeculativeParams(**(speculative or {})))


# -- requests: proto -> engine ---------------------------------------------------------------

_WIRE_NAMES = {"sampling.max_new_tokens": "sampling.max_tokens", "prompt_ids": "prompt", "continuation_ids": "continuation"}


def wire_error(err: SpecError) -> str:
    """``field: message`` with the engine's field names as the API spells them."""
    head, dot, rest = err.field.partition("[")
    name = _WIRE_NAMES.get(head, head)
    return f"{name}{dot and '[' + rest}: {err.message}"


def _check_ids(name: str, ids: Sequence[int], vocab_size: int) -> list[int]:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise SpecError(f"{name}[{i}]", f"token ids must be in [0, {vocab_size}), got {t}")
    return list(ids)


def prompt_ids(prompt: pb.Prompt, tokenizer: PreTrainedTokenizerBase, vocab_size: int, field_name: str = "prompt") -> list[int]:
    """Token ids of a prompt in any of its forms."""
    kind = prompt.WhichOneof("kind")
    if kind is None:
        raise SpecError(field_name, "set one of text, token_ids or chat")
    if kind == "text":
        if not prompt.text:
            raise SpecError(f"{field_name}.text", "must not be empty")
        return list(tokenizer(prompt.text)["input_ids"])
    if kind == "token_ids":
        if not prompt.token_ids.ids:
            raise SpecError(f"{field_name}.token_ids.ids", "must hold at least one token")
        return _check_ids(f"{field_name}.token_ids.ids", prompt.token_ids.ids, vocab_size)
    messages = prompt.chat.messages
    if not messages:
        raise SpecError(f"{field_name}.chat.messages", "must hold at least one message")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise SpecError(f"{field_name}.chat.messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
    if tokenizer.chat_template is None:
        raise SpecError(f"{field_name}.chat", "the served tokenizer has no chat template: send text or token_ids")
    try:
        ids = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True, tokenize=True
        )
    except Exception as err:  # the template refuses this sequence of roles (a jinja raise_exception)
        raise SpecError(f"{field_name}.chat.messages", f"the chat template refused them: {err}") from None
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def eft_spec(msg: pb.EFTSpec, default: EFTSpec) -> EFTSpec:
    """The request's spec. With ``preset`` set the request stands alone (unset fields take the
    documented defaults); with it empty, set fields override the server's default spec."""
    changes: dict[str, Any] = {"preset": msg.preset} if msg.preset else {}
    if msg.deltas:
        changes["deltas"] = dict(msg.deltas)
    if msg.coefficients:
        changes["coefficients"] = dict(msg.coefficients)
    if msg.HasField("beta"):
        changes["beta"] = msg.beta
    if msg.HasField("weight_top_p"):
        changes["weight_top_p"] = msg.weight_top_p
    return EFTSpec(**changes) if msg.preset else replace(default, **changes)


def sampling_params(msg: pb.SamplingParams, default: SamplingParams) -> SamplingParams:
    """Set fields override the server's defaults."""
    changes: dict[str, Any] = {}
    for name, target in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("seed", "seed"), ("max_tokens", "max_new_tokens")):
        if msg.HasField(name):
            changes[target] = getattr(msg, name)
    if len(msg.stop) > MAX_STOP_STRINGS:
        raise SpecError("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(msg.stop)}")
    if msg.stop:
        changes["stop"] = tuple(msg.stop)
    if msg.stop_token_ids:
        changes["stop_token_ids"] = tuple(msg.stop_token_ids)
    if msg.ignore_eos:
        changes["ignore_eos"] = True
    return replace(default, **changes)


def speculative_params(msg: pb.SpeculativeParams, default: SpeculativeParams) -> SpeculativeParams:
    changes: dict[str, Any] = {}
    if msg.HasField("k"):
        changes["k"] = msg.k
    if msg.drafter:
        changes["drafter"] = msg.drafter
    if msg.HasField("confidence"):
        changes["confidence"] = msg.confidence
    for name in ("adaptive", "overlap", "tree_width"):
        if msg.HasField(name):
            changes[name] = getattr(msg, name)
    return replace(default, **changes) if changes else default


def generation_request(
    request: pb.GenerateRequest, tokenizer: PreTrainedTokenizerBase, vocab_size: int, defaults: RequestDefaults
) -> GenerationRequest:
    """The engine's request for a Generate call, with the server's defaults filled in."""
    return GenerationRequest(
        prompt_ids=prompt_ids(request.prompt, tokenizer, vocab_size),
        eft=eft_spec(request.eft, defaults.eft),
        sampling=sampling_params(request.sampling, defaults.sampling),
        speculative=speculative_params(request.speculative, defaults.speculative),
        diagnostics=request.diagnostics,
    )


def score_request_of(request: pb.ScoreRequest, tokenizer: PreTrainedTokenizerBase, vocab_size: int, defaults: RequestDefaults) -> ScoreRequest:
    """The engine's request for a Score call."""
    return ScoreRequest(
        prompt_ids(request.prompt, tokenizer, vocab_size),
        continuation_ids(request, tokenizer, vocab_size),
        eft_spec(request.eft, defaults.eft),
    )


def continuation_ids(request: pb.ScoreRequest, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[int]:
    kind = request.WhichOneof("continuation")
    if kind is None:
        raise SpecError("continuation", "set continuation_text or continuation_ids")
    if kind == "continuation_text":
        if not request.continuation_text:
            raise SpecError("continuation_text", "must not be empty")
        return list(tokenizer(request.continuation_text, add_special_tokens=False)["input_ids"])
    if not request.continuation_ids.ids:
        raise SpecError("continuation_ids.ids", "must hold at least one token")
    return _check_ids("continuation_ids.ids", request.continuation_ids.ids, vocab_size)


# -- requests: Python values -> proto (the client) ------------------------------------------


def prompt_message(prompt: Prompt) -> pb.Prompt:
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    items = list(prompt)
    if items and all(isinstance(m, Mapping) for m in items):
        return pb.Prompt(chat=pb.Chat(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in items]))
    return pb.Prompt(token_ids=pb.TokenIds(ids=items))


def generate_request(
    prompt: Prompt,
    *,
    preset: str = "",
    deltas: Mapping[str, float] | None = None,
    beta: float | None = None,
    weight_top_p: float | None = None,
    coefficients: Mapping[str, float] | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    k: int | None = None,
    drafter: str = "",
    draft_confidence: float | None = None,
    adaptive: bool | None = None,
    overlap: bool | None = None,
    tree_width: int | None = None,
    diagnostics: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest; arguments left None take the server's defaults."""
    return pb.GenerateRequest(
        prompt=prompt_message(prompt),
        eft=eft_message(preset, deltas, beta, weight_top_p, coefficients),
        sampling=pb.SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_tokens=max_tokens,
            stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
        ),
        speculative=pb.SpeculativeParams(k=k, drafter=drafter, confidence=draft_confidence, adaptive=adaptive, overlap=overlap, tree_width=tree_width),
        diagnostics=diagnostics,
    )


def eft_message(
    preset: str = "",
    deltas: Mapping[str, float] | None = None,
    beta: float | None = None,
    weight_top_p: float | None = None,
    coefficients: Mapping[str, float] | None = None,
) -> pb.EFTSpec:
    return pb.EFTSpec(preset=preset, deltas=deltas or {}, beta=beta, weight_top_p=weight_top_p, coefficients=coefficients or {})


def score_request(prompt: Prompt, continuation: str | Sequence[int], **eft: Any) -> pb.ScoreRequest:
    request = pb.ScoreRequest(prompt=prompt_message(prompt), eft=eft_message(**eft))
    if isinstance(continuation, str):
        request.continuation_text = continuation
    else:
        request.continuation_ids.ids.extend(continuation)
    return request


# -- responses: engine -> proto --------------------------------------------------------------


def _stats(stats: GenerationStats) -> tuple[pb.Usage, pb.SpeculativeStats]:
    usage = pb.Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.generated_tokens)
    spec = pb.SpeculativeStats(
        blocks=stats.blocks,
        drafted_tokens=stats.drafted_tokens,
        accepted_tokens=stats.accepted_tokens,
        acceptance_rate=stats.acceptance_rate,
        tokens_per_block=stats.tokens_per_block,
        seed=stats.seed,
    )
    return usage, spec


def _diagnostics(diags: Sequence[TokenDiagnostics]) -> list[pb.TokenDiagnostics]:
    return [
        pb.TokenDiagnostics(
            token_id=d.token_id, logprob=d.logprob, role_logprobs=d.role_logprobs, rewards=d.rewards, drafter_tv=d.drafter_tv
        )
        for d in diags
    ]


def generate_response(g: Generation) -> pb.GenerateResponse:
    usage, stats = _stats(g.stats)
    return pb.GenerateResponse(
        text=g.text, token_ids=g.token_ids, finish_reason=FINISH_REASONS[g.finish_reason],
        usage=usage, stats=stats, diagnostics=_diagnostics(g.diagnostics),
    )


def stream_response(chunk: StreamChunk) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(text=chunk.text, token_ids=chunk.token_ids, diagnostics=_diagnostics(chunk.diagnostics))
    if chunk.finish_reason is not None and chunk.stats is not None:
        usage, stats = _stats(chunk.stats)
        msg.finish_reason = FINISH_REASONS[chunk.finish_reason]
        msg.usage.CopyFrom(usage)
        msg.stats.CopyFrom(stats)
    return msg


def score_response(result: ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        token_ids=result.token_ids,
        logprobs=result.logprobs,
        role_logprobs={r: pb.RoleLogprobs(logprobs=lp) for r, lp in result.role_logprobs.items()},
    )


def finish_reason_name(value: int) -> str:
    """``"stop"``, ``"length"`` (or ``""`` for unspecified), from the enum."""
    return {v: k for k, v in FINISH_REASONS.items()}.get(value, "")
