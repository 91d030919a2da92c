"""Greedy speculative EFT is token-for-token greedy plain EFT, whatever the block size,
cache state or where in a block generation stops; and a drafter that ends its block at a
stop token changes no seed's output."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from eft_router.engine import Engine, GenerationRequest
from eft_router.roles.local import LocalRole
from eft_router.core.spec import EFTSpec, SamplingParams, SpeculativeParams

PROMPTS = ["w1 w2 w3", "w7", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12", "w30 w31 w30 w31"]
SPECS = {
    "upscale": EFTSpec(),
    "interpolate2": EFTSpec(deltas={"ft_small": 0.6, "ft_safe": 0.4}),
    "filtered_beta": EFTSpec(beta=1.5, weight_top_p=0.9),
}
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=40)


def run(engine, prompt, sampling=GREEDY, k=0, eft=EFTSpec(), confidence=0.0, **kwargs):
    ids = prompt if isinstance(prompt, list) else engine.tokenizer(prompt)["input_ids"]
    speculative = SpeculativeParams(k=k, confidence=confidence)
    return asyncio.run(engine.generate(GenerationRequest(ids, eft=eft, sampling=sampling, speculative=speculative, **kwargs)))


@pytest.mark.parametrize("spec", list(SPECS), ids=list(SPECS))
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_equals_plain(engine, prompt, spec):
    """Plain and every speculative variant of one request, all at once (they share steps)."""
    ids = engine.tokenizer(prompt)["input_ids"]
    variants = [(0, 0.0, False), (1, 0.0, False), (2, 0.0, False), (4, 0.0, False), (8, 0.0, False), (4, 0.2, False),
                (8, 0.3, False), (4, 0.0, True), (8, 0.3, True)]

    async def all_at_once():
        requests = [
            GenerationRequest(ids, eft=SPECS[spec], sampling=GREEDY, speculative=SpeculativeParams(k=k, confidence=c, adaptive=a))
            for k, c, a in variants
        ]
        return await asyncio.gather(*map(engine.generate, requests))

    plain, *fast = asyncio.run(all_at_once())
    assert plain.stats.blocks == len(plain.token_ids)  # plain: one token per step
    for (k, confidence, adaptive), out in zip(variants[1:], fast):
        assert out.token_ids == plain.token_ids, f"k={k}, confidence={confidence}, adaptive={adaptive}"
        assert out.text == plain.text and out.finish_reason == plain.finish_reason
        assert out.stats.blocks <= plain.stats.blocks


def test_adaptive_block_size_follows_acceptance(engine):
    """The block size starts at k, grows by 2 after a fully accepted block and shrinks by 1
    after a rejection, within [1, k]: replayed from the blocks' acceptance, the drafts it
    implies are exactly the drafts made (EOS ignored, so no draft ends early), and fewer
    than fixed k makes."""
    sampling = replace(GREEDY, ignore_eos=True)
    adaptive_drafts = fixed_drafts = 0
    for prompt in PROMPTS:
        ids = engine.tokenizer(prompt)["input_ids"]
        request = GenerationRequest(ids, sampling=sampling, speculative=SpeculativeParams(k=6, adaptive=True))
        stats = asyncio.run(engine.generate(request)).stats
        size, produced, drafted_total = 6, 0, 0
        for accepted in stats.accepted_per_block:
            drafted = min(size, sampling.max_new_tokens - produced - 1)
            assert accepted <= drafted
            drafted_total += drafted
            produced += accepted + 1
            if drafted:
                size = min(6, size + 2) if accepted == drafted else max(1, size - 1)
        assert drafted_total == stats.drafted_tokens and produced == sampling.max_new_tokens
        adaptive_drafts += stats.drafted_tokens
        fixed_drafts += run(engine, prompt, sampling=sampling, k=6).stats.drafted_tokens
    assert adaptive_drafts < fixed_drafts  # it did shrink


def test_speculation_accepts_and_rejects(engine):
    """The test models must exercise both acceptance and rejection, and confidence must end
    some drafts early but not all, or the equality above would prove little."""
    stats = [run(engine, p, k=4).stats for p in PROMPTS]
    assert sum(s.accepted_tokens for s in stats) > 0
    for confidence in (0.2, 0.3):
        unsure = [run(engine, p, k=4, confidence=confidence).stats for p in PROMPTS]
        assert 0 < sum(s.drafted_tokens for s in unsure) < 4 * sum(s.blocks for s in unsure), confidence
    assert sum(s.drafted_tokens - s.accepted_tokens for s in stats) > 0


def test_shared_prefix_with_a_live_session_and_multi_turn(engine):
    """A new session whose prompt shares a prefix with a cached session starts from a copy of
    that cache; a follow-up turn in the same session extends its own cache. Both must give
    exactly what a cold start gives."""
    first = engine.tokenizer("w1 w2 w3 w4 w5 w6")["input_ids"]
    cold = {k: run(engine, first + [20, 21], k=k) for k in (0, 3)}
    run(engine, first, k=3, session_id="turn", keep_session=True)  # leaves session "turn" cached
    worker = engine.roles["base_large"].worker
    assert "turn" in worker.sessions
    for k in (0, 3):
        assert run(engine, first + [20, 21], k=k).token_ids == cold[k].token_ids
    one = run(engine, first, k=3, session_id="turn", keep_session=True)
    follow = first + one.token_ids + [22, 23]
    cold_follow = run(engine, follow, k=3)
    assert run(engine, follow, k=3, session_id="turn").token_ids == cold_follow.token_ids
    assert "turn" not in worker.sessions  # released at the end of the last turn


def test_stop_token_in_the_middle_of_a_block(engine):
    """Stopping at a token that speculation reaches mid-block cuts the block exactly there."""
    plain = run(engine, PROMPTS[0])
    stop_at = plain.token_ids[5]
    first = plain.token_ids.index(stop_at)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=40, stop_token_ids=(stop_at,))
    expected = plain.token_ids[: first + 1]
    for k in (0, 2, 4, 8):
        out = run(engine, PROMPTS[0], sampling=sampling, k=k)
        assert out.token_ids == expected, f"k={k}"
        assert out.finish_reason == "stop"


class DraftsPastStops(LocalRole):
    """The drafter as it was before drafts ended at stop tokens: always k drafts."""

    async def draft(self, items):
        return self.worker.draft([replace(it, params=replace(it.params, stop_ids=frozenset())) for it in items])


def test_drafts_end_at_a_stop_token_and_the_output_is_the_same(engine):
    """Drafting past a stop is wasted work: nothing after the stop is emitted, and the
    uniforms are drawn for k drafts either way, so every seed gives the same tokens."""
    past = Engine({**engine.roles, "ft_small": DraftsPastStops(engine.roles["ft_small"].worker)}, engine.tokenizer)
    common = run(engine, PROMPTS[1], SamplingParams(temperature=1.0, max_new_tokens=30, seed=0)).token_ids
    stop = max(set(common), key=common.count)  # a token these models sample often
    drafted = {}
    for name, eng in (("early", engine), ("past", past)):
        outs = [
            run(eng, PROMPTS[1], SamplingParams(temperature=1.0, max_new_tokens=30, seed=s, stop_token_ids=(stop,)), k=6)
            for s in range(12)
        ]
        drafted[name] = sum(o.stats.drafted_tokens for o in outs)
        if name == "early":
            early = [o.token_ids for o in outs]
            assert sum(o.finish_reason == "stop" for o in outs) >= 6
        else:
            assert [o.token_ids for o in outs] == early
    assert drafted["early"] < drafted["past"]


def test_stop_string_and_max_tokens_in_the_middle_of_a_block(engine):
    plain = run(engine, PROMPTS[0])
    words = plain.text.split()
    stop = f"{words[3]} {words[4]}"
    cut = plain.text.index(stop)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=40, stop=(stop,))
    for k in (0, 3, 8):
        out = run(engine, PROMPTS[0], sampling=sampling, k=k)
        assert out.text == plain.text[:cut], f"k={k}"
        assert out.finish_reason == "stop"
    short = SamplingParams(temperature=0.0, max_new_tokens=7)
    for k in (0, 3, 8):
        out = run(engine, PROMPTS[0], sampling=short, k=k)
        assert out.token_ids == plain.token_ids[:7] and out.finish_reason == "length"


def test_stream_yields_blocks_that_add_up(engine):
    async def collect():
        ids = engine.tokenizer(PROMPTS[0])["input_ids"]
        return [c async for c in engine.stream(GenerationRequest(ids, sampling=GREEDY, speculative=SpeculativeParams(k=4)))]

    chunks = asyncio.run(collect())
    whole = run(engine, PROMPTS[0], k=4)
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason == whole.finish_reason
    assert len(chunks) == whole.stats.blocks
    assert all(1 <= len(c.token_ids) <= 5 for c in chunks)
