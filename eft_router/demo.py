"""What ``make demo`` shows, through the real gRPC client against a running router.

1. The small fine-tuned model alone against EFT up-scaling on the same questions (greedy):
   up-scaling should carry the large base model's knowledge into the small model's answers.
2. Plain EFT against speculative EFT on the same requests: the same text (greedy), and
   the speed-up measured side by side.
3. One answer streamed block by block.
4. The first question again through the official ``openai`` client, against the router's
   OpenAI-compatible HTTP port: the same answer as gRPC's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .server.client import EFTClient
from .server.messages import Prompt


@dataclass(frozen=True)
class DemoQuestion:
    label: str  # how to print the question
    prompt: Prompt  # what is sent (text, token ids or chat messages)
    truth: str | None = None  # the right answer, when known


@dataclass
class DemoReport:
    small_answers: list[str]
    eft_answers: list[str]
    small_correct: int | None
    eft_correct: int | None
    plain_tokens: int
    plain_seconds: float
    spec_seconds: float
    spec_equal: bool
    acceptance_rate: float
    openai_equal: bool | None = None  # None: no HTTP port to ask

    @property
    def speedup(self) -> float:
        return self.plain_seconds / self.spec_seconds


def _short(text: str, width: int = 38) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_demo(
    client: EFTClient, questions: Sequence[DemoQuestion], max_tokens: int = 24, k: int = 4,
    out: Callable[[str], None] = print, http_base_url: str | None = None,
) -> DemoReport:
    info = client.info()
    out(f"router {client.target}: backend {info.backend}, roles " + ", ".join(f"{r.name} ({r.model})" for r in info.roles))
    greedy = dict(temperature=0.0, max_tokens=max_tokens)

    out("\n1. small fine-tuned model alone vs EFT up-scaled (greedy)")
    small = [client.generate(q.prompt, preset="linear", coefficients={"ft_small": 1.0}, **greedy).text for q in questions]
    eft = [client.generate(q.prompt, preset="upscale", **greedy).text for q in questions]
    out(f"   {'question':40} {'truth':12} {'ft_small':40} {'EFT up-scaled':40}")
    for q, s, e in zip(questions, small, eft):
        out(f"   {_short(q.label, 40):40} {_short(q.truth or '-', 12):12} {_short(s, 40):40} {_short(e, 40):40}")
    known = [q for q in questions if q.truth]
    small_ok = eft_ok = None
    if known:
        small_ok = sum(bool(q.truth) and q.truth in s for q, s in zip(questions, small))
        eft_ok = sum(bool(q.truth) and q.truth in e for q, e in zip(questions, eft))
        out(f"   correct: ft_small {small_ok}/{len(known)}, EFT up-scaled {eft_ok}/{len(known)}")

    out(f"\n2. plain vs speculative EFT (k={k}), same greedy requests, timed side by side")
    client.generate(questions[0].prompt, k=k, **greedy)  # warm both paths' caches and code
    plain_s = spec_s = 0.0
    tokens, equal, drafted, accepted = 0, True, 0, 0
    for q in questions:
        started = time.perf_counter()
        plain = client.generate(q.prompt, k=0, **greedy)
        plain_s += time.perf_counter() - started
        started = time.perf_counter()
        spec = client.generate(q.prompt, k=k, **greedy)
        spec_s += time.perf_counter() - started
        tokens += len(plain.token_ids)
        equal &= list(plain.token_ids) == list(spec.token_ids)
        drafted += spec.stats.drafted_tokens
        accepted += spec.stats.accepted_tokens
    rate = accepted / drafted if drafted else 0.0
    out(f"   plain:       {tokens} tokens in {plain_s:.2f} s ({tokens / plain_s:.0f} tokens/s)")
    out(f"   speculative: {tokens} tokens in {spec_s:.2f} s ({tokens / spec_s:.0f} tokens/s), acceptance {rate:.2f}")
    out(f"   speed-up {plain_s / spec_s:.2f}x; outputs identical: {'yes' if equal else 'NO'}")

    out("\n3. streaming (one message per accepted block)")
    pieces = []
    for chunk in client.stream(questions[0].prompt, k=k, **greedy):
        pieces.append(chunk.text)
        out(f"   block: {len(chunk.token_ids)} token(s) {chunk.text!r}")
    out(f"   streamed text equals the unary answer: {'yes' if ''.join(pieces) == eft[0] else 'NO'}")
    openai_equal = None
    if http_base_url is not None:
        openai_equal = _openai_request(http_base_url, questions[0].prompt, max_tokens, eft[0], out)
    return DemoReport(small, eft, small_ok, eft_ok, tokens, plain_s, spec_s, equal, rate, openai_equal)


def _openai_request(base_url: str, prompt: Prompt, max_tokens: int, grpc_answer: str, out: Callable[[str], None]) -> bool:
    """One request through the official ``openai`` client, as any OpenAI tool would send it."""
    import openai

    out(f"\n4. the same up-scaled question through the openai client ({base_url})")
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    greedy = dict(model="eft-upscale", temperature=0.0, max_tokens=max_tokens)
    if isinstance(prompt, str):
        reply = client.completions.create(prompt=prompt, **greedy)
        text = reply.choices[0].text
    else:
        reply = client.chat.completions.create(messages=list(prompt), **greedy)
        text = reply.choices[0].message.content
    out(f"   {_short(text, 60)!r}: {reply.usage.completion_tokens} tokens, finish_reason {reply.choices[0].finish_reason}")
    out(f"   equals the gRPC answer: {'yes' if text == grpc_answer else 'NO'}")
    return text == grpc_answer


def family_questions(n: int = 6, seed: int = 0) -> list[DemoQuestion]:
    """Held-out fact questions of the embedded family, as chat prompts."""
    from .family.build import DEFAULT
    from .family.world import build_world, chat_messages, eval_prompts

    world = build_world(DEFAULT.seed, DEFAULT.n_entities)
    facts = [p for p in eval_prompts(world, n_per_category=max(n, 10), seed=seed) if p.category == "fact"][:n]
    return [DemoQuestion(p.question, chat_messages(p.question), p.expected) for p in facts]
