"""Greedy speculative EFT is token-for-token greedy plain EFT, whatever the block size,
cache state or where in a block generation stops; and a drafter that ends its block at a
stop token changes no seed's output."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from conftest import Recording
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


def run(engine, prompt, sampling=GREEDY, k=0, eft=EFTSpec(), confidence=0.0, overlap=False, tree_width=0, **kwargs):
    ids = prompt if isinstance(prompt, list) else engine.tokenizer(prompt)["input_ids"]
    speculative = SpeculativeParams(k=k, confidence=confidence, overlap=overlap, tree_width=tree_width)
    return asyncio.run(engine.generate(GenerationRequest(ids, eft=eft, sampling=sampling, speculative=speculative, **kwargs)))


@pytest.mark.parametrize("spec", list(SPECS), ids=list(SPECS))
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_equals_plain(engine, prompt, spec):
    """Plain and every speculative variant of one request, all at once (they share steps)."""
    ids = engine.tokenizer(prompt)["input_ids"]
    # (k, confidence, adaptive, overlap, tree width)
    variants = [(0, 0.0, False, False, 0), (1, 0.0, False, False, 0), (2, 0.0, False, False, 0), (4, 0.0, False, False, 0),
                (8, 0.0, False, False, 0), (4, 0.2, False, False, 0), (8, 0.3, False, False, 0), (4, 0.0, True, False, 0),
                (8, 0.3, True, False, 0), (1, 0.0, False, True, 0), (4, 0.0, False, True, 0), (8, 0.3, False, True, 0),
                (4, 0.0, True, True, 0), (8, 0.3, True, True, 0), (1, 0.3, False, False, 2), (4, 0.3, False, False, 2),
                (4, 0.5, False, False, 4), (8, 0.3, False, False, 4), (4, 0.3, True, False, 2), (8, 0.3, False, True, 2),
                (8, 0.5, True, True, 4)]

    async def all_at_once():
        requests = [
            GenerationRequest(ids, eft=SPECS[spec], sampling=GREEDY,
                              speculative=SpeculativeParams(k=k, confidence=c, adaptive=a, overlap=o, tree_width=m))
            for k, c, a, o, m in variants
        ]
        return await asyncio.gather(*map(engine.generate, requests))

    plain, *fast = asyncio.run(all_at_once())
    assert plain.stats.blocks == len(plain.token_ids)  # plain: one token per step
    for variant, out in zip(variants[1:], fast):
        assert out.token_ids == plain.token_ids, f"(k, confidence, adaptive, overlap, tree width) = {variant}"
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


@pytest.mark.parametrize("overlap, tree", [(False, 0), (True, 0), (False, 4)], ids=["chain", "overlap", "tree"])
def test_shared_prefix_with_a_live_session_and_multi_turn(engine, overlap, tree):
    """A new session whose prompt shares a prefix with a cached session starts from a copy of
    that cache; a follow-up turn in the same session extends its own cache (whose drafter
    side, with overlap, holds drafts past the turn's end; with trees, the last block's tree,
    until the next call keeps its accepted path). Both must give exactly what a cold start
    gives."""
    spec = dict(overlap=overlap, tree_width=tree, confidence=0.5 if tree else 0.0)
    first = engine.tokenizer("w1 w2 w3 w4 w5 w6")["input_ids"]
    cold = {k: run(engine, first + [20, 21], k=k) for k in (0, 3)}
    run(engine, first, k=3, session_id="turn", keep_session=True, **spec)  # leaves session "turn" cached
    worker = engine.roles["base_large"].worker
    assert "turn" in worker.sessions
    for k in (0, 3):
        assert run(engine, first + [20, 21], k=k, **spec).token_ids == cold[k].token_ids
    one = run(engine, first, k=3, session_id="turn", keep_session=True, **spec)
    follow = first + one.token_ids + [22, 23]
    cold_follow = run(engine, follow, k=3)
    assert run(engine, follow, k=3, session_id="turn", **spec).token_ids == cold_follow.token_ids
    assert "turn" not in worker.sessions  # released at the end of the last turn


def test_stop_token_in_the_middle_of_a_block(engine):
    """Stopping at a token that speculation reaches mid-block cuts the block exactly there."""
    plain = run(engine, PROMPTS[0])
    stop_at = plain.token_ids[5]
    first = plain.token_ids.index(stop_at)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=40, stop_token_ids=(stop_at,))
    expected = plain.token_ids[: first + 1]
    for k, overlap, tree in ((0, False, 0), (2, False, 0), (4, False, 0), (8, False, 0), (2, True, 0), (4, True, 0),
                             (8, True, 0), (4, False, 2), (8, False, 4)):
        out = run(engine, PROMPTS[0], sampling=sampling, k=k, overlap=overlap, tree_width=tree, confidence=0.5 if tree else 0.0)
        assert out.token_ids == expected, f"k={k}, overlap={overlap}, tree width {tree}"
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
    for k, overlap, tree in ((0, False, 0), (3, False, 0), (8, False, 0), (3, True, 0), (8, True, 0), (4, False, 4)):
        out = run(engine, PROMPTS[0], sampling=sampling, k=k, overlap=overlap, tree_width=tree, confidence=0.5 if tree else 0.0)
        assert out.text == plain.text[:cut], f"k={k}, overlap={overlap}, tree width {tree}"
        assert out.finish_reason == "stop"
    short = SamplingParams(temperature=0.0, max_new_tokens=7)
    for k, overlap in ((0, False), (3, False), (8, False), (1, True), (3, True), (8, True)):
        out = run(engine, PROMPTS[0], sampling=short, k=k, overlap=overlap)
        assert out.token_ids == plain.token_ids[:7] and out.finish_reason == "length", f"k={k}, overlap={overlap}"


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


def test_overlap_drafts_the_next_block_while_this_one_is_verified(engine):
    """With a drafter that is always right (the target is its own distribution), every block
    after the first has its drafts already: each step's only draft call runs while the
    verifying roles score, where the chain drafts first and scores after, every step."""
    perfect = EFTSpec(preset="linear", coefficients={"ft_small": 1.0, "base_large": 0.0, "base_small": 0.0})
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    sampling = SamplingParams(temperature=1.0, seed=1, max_new_tokens=30, ignore_eos=True)
    seen = {}
    for overlap in (False, True):
        log: list = []
        recorded = Engine({r: Recording(role, log) for r, role in engine.roles.items()}, engine.tokenizer)
        request = GenerationRequest(ids, eft=perfect, sampling=sampling, speculative=SpeculativeParams(k=4, overlap=overlap))
        out = asyncio.run(recorded.generate(request))
        assert out.stats.accepted_tokens == out.stats.drafted_tokens  # all accepted
        scoring, alone, alongside = 0, 0, 0
        for event, call, _ in log:
            if event == "start" and call == "draft":
                alongside += scoring > 0
                alone += scoring == 0
            if call == "score":
                scoring += 1 if event == "start" else -1
        seen[overlap] = (out.token_ids, out.stats.blocks, alone, alongside)
    chain, overlapped = seen[False], seen[True]
    assert chain[2] == chain[1] and chain[3] == 0  # chain: every block drafts, then scores
    # overlap: one draft before the first block's scores; every later draft alongside them
    assert overlapped[2] == 1 and overlapped[3] == overlapped[1] - 1, overlapped
    # the same number of blocks: the continuation's first token stands in for the bonus
    assert overlapped[1] == chain[1]
