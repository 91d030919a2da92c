"""Speculative EFT is exact, end to end: a goodness-of-fit test through the real engine.

With an 8-token vocabulary and 3 new tokens, the law of the whole output is small enough
to enumerate: for every prefix, the target p is computed from full, cache-free forward
passes of the three Hugging Face models (no engine code but ``combine`` and
``sampling_probs``, which are checked against brute force elsewhere), and the law of
the output is the product of p along the path. EOS ends generation, so an output that ends
at EOS is a cell of its own (length < 3). The engine's samples (``engine.generate`` with
seed i, speculative k = 2: block one drafts 2 tokens, and the blocks after it draft
what is left) must pass a G-test against that law; so must drafts ended early by the
drafter's confidence, and plain EFT (k = 0); and two deliberately wrong acceptance rules,
patched into the engine, must fail it, which shows that the sample sizes have power.
Every sample shares the engine's steps with dozens of others (:data:`CONCURRENT` in
flight), so the test also shows that a request's law does not depend on what it is batched
with.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import pytest
import torch
from scipy.stats import power_divergence
from transformers import AutoModelForCausalLM

import eft_router.engine.engine as engine_module
from conftest import first_positive_branch
from eft_router.core.acceptance import BlockOutcome
from eft_router.core.combine import combine
from eft_router.core.sampling import sample_from, sampling_probs
from eft_router.core.spec import EFTSpec, SamplingParams, SpeculativeParams
from eft_router.engine import GenerationRequest

MAX_NEW = 3
ADAPTIVE_NEW = 5  # room for a shrunk block size to show within one output (k = 3)
CONCURRENT = 48  # requests in flight at once: every sample shares its steps with others
N_PLAIN = 5_000  # plain EFT is checked with fewer samples: it is the reference behaviour
N_WRONG = 5_000  # the wrong rules are far enough off that 5000 samples reject them
N_CONFIDENCE = 10_000
# name -> (sampling fields, speculative samples, least cells with expected count >= 5).
# The tiny EFT law is peaked (p(first token = 'c') = 0.95 at T = 1), so T = 1 has 15 such
# cells and T = 0.7 / top-p 0.8 only 3; T = 2 with top-k 6 (10000 samples, to save time)
# spreads it to ~40 cells and exercises top-k.
CONFIGS = {
    "T1": (dict(temperature=1.0), 20_000, 80),
    "T1.5_top_k6_top_p0.9": (dict(temperature=1.5, top_k=6, top_p=0.9), 20_000, 50),
}




# -- the analytic side -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_models(tiny_vocab_paths) -> dict[str, torch.nn.Module]:
    return {role: AutoModelForCausalLM.from_pretrained(path).eval() for role, path in tiny_vocab_paths.items()}


@torch.inference_mode()
def target_probs(models: dict, prompt: Sequence[int], prefix: Sequence[int], vocab: int, sampling: dict) -> torch.Tensor:
    """p for the next token after prompt + prefix, from full forward passes (no cache)."""
    ids = torch.tensor([list(prompt) + list(prefix)])
    rows = {role: torch.log_softmax(m(input_ids=ids).logits[0, -1, :vocab].float(), dim=-1) for role, m in models.items()}
    plan = EFTSpec().resolve(list(models))
    return sampling_probs(
        combine(rows, plan), sampling.get("temperature", 1.0), sampling.get("top_k", 0), sampling.get("top_p", 1.0)
    )


def analytic_law(
    models: dict, prompt: Sequence[int], vocab: int, eos: int, sampling: dict, max_new: int = MAX_NEW
) -> dict[tuple[int, ...], float]:
    """P(output = cell) for every cell: full max_new-token outputs and EOS-ended shorter ones."""
    law: dict[tuple[int, ...], float] = {}

    def rec(prefix: tuple[int, ...], weight: float) -> None:
        if len(prefix) == max_new or (prefix and prefix[-1] == eos):
            law[prefix] = weight
            return
        probs = target_probs(models, prompt, prefix, vocab, sampling).double()
        for y in torch.nonzero(probs > 0).flatten().tolist():
            rec(prefix + (y,), weight * float(probs[y]))

    rec((), 1.0)
    total = sum(law.values())
    assert abs(total - 1.0) < 1e-6, total
    return law


def g_test(counts: Counter, law: dict, min_expected: float = 5.0) -> float:
    """G-test p-value of the observed cells against the law. Cells with expected count
    below ``min_expected`` are merged into one; an observed cell outside the law's support
    gives 0 (impossible output)."""
    n = sum(counts.values())
    if any(law.get(cell, 0.0) <= 0.0 for cell in counts):
        return 0.0
    big = sorted(cell for cell, w in law.items() if w * n >= min_expected)
    obs = [counts.get(cell, 0) for cell in big]
    exp = [law[cell] * n for cell in big]
    if n - sum(exp) > 1e-9 * n:
        obs.append(n - sum(obs))
        exp.append(n - sum(exp))
    exp = np.asarray(exp) * (n / sum(exp))
    return float(power_divergence(obs, exp, lambda_="log-likelihood").pvalue)


# -- the engine side ---------------------------------------------------------------------


def engine_samples(
    engine, prompt: Sequence[int], n: int, speculative: SpeculativeParams, sampling: dict, max_new: int = MAX_NEW
) -> tuple[Counter, float, float, float]:
    """Outputs of ``engine.generate`` for seeds 0..n-1, :data:`CONCURRENT` requests at a time
    sharing the engine's steps (one event loop for all): counts per output, the
    drafted-token acceptance rate, drafts per block, and seconds per sample."""

    async def run() -> tuple[Counter, int, int, int]:
        in_flight = asyncio.Semaphore(CONCURRENT)

        async def one(seed: int):
            async with in_flight:
                out = await engine.generate(GenerationRequest(
                    prompt,
                    sampling=SamplingParams(seed=seed, max_new_tokens=max_new, stop_token_ids=(), **sampling),
                    speculative=speculative,
                ))
            assert out.stats.seed == seed
            return out

        counts: Counter = Counter()
        accepted = drafted = blocks = 0
        for out in await asyncio.gather(*map(one, range(n))):
            counts[tuple(out.token_ids)] += 1
            accepted += out.stats.accepted_tokens
            drafted += out.stats.drafted_tokens
            blocks += out.stats.blocks
        return counts, accepted, drafted, blocks

    start = time.perf_counter()
    counts, accepted, drafted, blocks = asyncio.run(run())
    per_sample = (time.perf_counter() - start) / n
    return counts, (accepted / drafted if drafted else float("nan")), drafted / blocks, per_sample


@pytest.fixture(scope="module")
def setup(tiny_vocab_engine, hf_models):
    tok = tiny_vocab_engine.tokenizer
    prompt = tok("a b")["input_ids"]
    assert tiny_vocab_engine.eos_ids == {tok.eos_token_id}
    laws = {name: analytic_law(hf_models, prompt, len(tok), tok.eos_token_id, s) for name, (s, _, _) in CONFIGS.items()}
    laws.update({(name, ADAPTIVE_NEW): analytic_law(hf_models, prompt, len(tok), tok.eos_token_id, s, ADAPTIVE_NEW) for name, (s, _, _) in CONFIGS.items()})
    return tiny_vocab_engine, prompt, laws


def check(
    setup, config: str, n: int, k: int, confidence: float = 0.0, adaptive: bool = False, max_new: int = MAX_NEW,
    overlap: bool = False, tree_width: int = 0,
) -> tuple[float, float, float]:
    """G-test p-value, acceptance rate and drafts per block of n samples of ``max_new`` tokens."""
    engine, prompt, laws = setup
    speculative = SpeculativeParams(k=k, confidence=confidence, adaptive=adaptive, overlap=overlap, tree_width=tree_width)
    counts, rate, drafts, per_sample = engine_samples(engine, prompt, n, speculative, CONFIGS[config][0], max_new)
    pvalue = g_test(counts, laws[config] if max_new == MAX_NEW else laws[(config, max_new)])
    print(f"{config} {speculative} n={n}: G-test p = {pvalue:.3g}, acceptance rate {rate:.3f}, "
          f"{drafts:.2f} drafts per block, {1000 * per_sample:.1f} ms/sample")
    return pvalue, rate, drafts


# -- exactness -----------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_speculative_output_law_is_the_eft_law(setup, config: str) -> None:
    pvalue, rate, _ = check(setup, config, CONFIGS[config][1], k=2)
    # the test only means something if blocks both accept and reject drafts
    assert 0.1 < rate < 0.9, rate
    assert pvalue > 1e-3


def test_drafts_ended_by_confidence_keep_the_law(setup) -> None:
    """Ending a block's drafting where the drafter is unsure depends only on the drafter's
    view of the prefix, so the output law is unchanged. At confidence 0.3 this drafter
    drafts about a third as much as without (1.28 per block of k = 2), and its drafts are
    still both accepted and rejected."""
    pvalue, rate, drafts = check(setup, "T1", N_CONFIDENCE, k=2, confidence=0.3)
    assert 0.1 < rate < 0.9 and 0.1 < drafts < 1.0, (rate, drafts)
    assert pvalue > 1e-3


@pytest.mark.parametrize("config", list(CONFIGS))
def test_adaptive_block_size_keeps_the_law(setup, config: str) -> None:
    """A block's size chosen from earlier blocks' acceptance (k = 3 at most, over 5 new
    tokens, so that a shrunk block size shows: fewer drafts per block than fixed k = 3)
    keeps the output law."""
    pvalue, rate, drafts = check(setup, config, CONFIGS[config][1], k=3, adaptive=True, max_new=ADAPTIVE_NEW)
    assert 0.1 < rate < 0.9, rate
    fixed = check(setup, config, 2_000, k=3, max_new=ADAPTIVE_NEW)[2]
    assert drafts < fixed, (drafts, fixed)  # the size really adapted
    assert pvalue > 1e-3


@pytest.mark.parametrize("config", list(CONFIGS))
def test_overlapped_drafting_keeps_the_law(setup, config: str) -> None:
    """Drafting the next block while this one is verified (k = 2 over 5 new tokens: the
    first block verifies its 2 drafts and the continuation's first token, whose other
    token, when all 3 are accepted, is the next block's draft) keeps the output law. More
    drafts per block than the plain chain's shows the continuations were verified."""
    pvalue, rate, drafts = check(setup, config, CONFIGS[config][1], k=2, max_new=ADAPTIVE_NEW, overlap=True)
    assert 0.1 < rate < 0.9, rate
    chain = check(setup, config, 2_000, k=2, max_new=ADAPTIVE_NEW)[2]
    assert drafts > chain, (drafts, chain)
    assert pvalue > 1e-3


TREE_CONFIDENCE = 0.5  # this drafter is below it at most positions: most blocks branch


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("width", [2, 4])
def test_token_trees_keep_the_law(setup, config: str, width: int) -> None:
    """Blocks that branch where the drafter is unsure (into the token it samples and its
    most likely others, ``width`` in all), scored as one tree and accepted by the multi-step
    rule, keep the output law. More accepted drafts per block than the chain at the same
    confidence (which ends its drafts there) shows the branches were verified and taken."""
    pvalue, rate, drafts = check(setup, config, CONFIGS[config][1], k=2, confidence=TREE_CONFIDENCE, tree_width=width)
    _, chain_rate, chain_drafts = check(setup, config, 2_000, k=2, confidence=TREE_CONFIDENCE)
    chain_accepted = chain_rate * chain_drafts if chain_drafts else 0.0  # per block
    assert drafts > chain_drafts + width / 2, (drafts, chain_drafts)  # most blocks branched
    assert rate * drafts > 2 * chain_accepted, (rate * drafts, chain_accepted)
    assert pvalue > 1e-3


@pytest.mark.parametrize("config", list(CONFIGS))
def test_plain_eft_output_law_is_the_eft_law(setup, config: str) -> None:
    pvalue, _, _ = check(setup, config, N_PLAIN, k=0)
    assert pvalue > 1e-3


def test_the_law_has_enough_cells(setup) -> None:
    """Not a degenerate law: enough cells with real mass, EOS-ended ones among them, and
    the filters really remove tokens."""
    _, _, laws = setup
    for name, (_, n, least_cells) in CONFIGS.items():
        law = laws[name]
        assert sum(1 for w in law.values() if w * n >= 5) >= least_cells, name
        assert any(len(cell) < MAX_NEW for cell, w in law.items() if w * n >= 5), name
        assert max(law.values()) < 0.5, name
    # at T = 1 with no filter every cell has mass: 7 * 7 * 8 full outputs, 7 + 1 EOS-ended
    assert len(laws["T1"]) == 7 * 7 * 8 + 7 + 1
    assert len(laws["T1.5_top_k6_top_p0.9"]) < len(laws["T1"])


# -- power: wrong acceptance rules must fail the same test -----------------------------------


def per_block(rule: Callable) -> Callable:
    """A rule for one block as a drop-in for ``accept_blocks`` (each row in turn)."""

    def batched(target, draft_probs, draft_tokens, num_drafts, accept_uniforms, final_uniforms, bonus=None) -> list[BlockOutcome]:
        out = []
        for b, n in enumerate(num_drafts.tolist()):
            o = rule(target[b], draft_probs[b], draft_tokens[b, :n].tolist(), accept_uniforms[b].tolist(), float(final_uniforms[b]))
            if bonus is not None and not bool(bonus[b]) and o.accepted == n:  # a block that ends at its last draft
                o = BlockOutcome(o.tokens[:n], n)
            out.append(o)
        return out

    return batched


def accept_everything(target, draft_probs, draft_tokens, accept_uniforms, final_uniform) -> BlockOutcome:
    """Wrong: every draft is accepted, then a bonus from the last target row."""
    k = len(draft_tokens)
    return BlockOutcome(list(draft_tokens) + [int(sample_from(target[k], final_uniform))], k)


def residual_is_target(target, draft_probs, draft_tokens, accept_uniforms, final_uniform) -> BlockOutcome:
    """Wrong (subtly): the right acceptance test, but a rejection resamples from p instead
    of normalize(max(0, p - q)), which over-weights tokens the drafter already proposes."""
    for t, token in enumerate(draft_tokens):
        if accept_uniforms[t] * float(draft_probs[t, token]) < float(target[t, token]):
            continue
        return BlockOutcome(list(draft_tokens[:t]) + [int(sample_from(target[t], final_uniform))], t)
    k = len(draft_tokens)
    return BlockOutcome(list(draft_tokens) + [int(sample_from(target[k], final_uniform))], k)


@pytest.mark.parametrize("rule", [accept_everything, residual_is_target], ids=lambda r: r.__name__)
def test_wrong_acceptance_rules_are_detected(setup, monkeypatch, rule: Callable) -> None:
    monkeypatch.setattr(engine_module, "accept_blocks", per_block(rule))
    pvalue, _, _ = check(setup, "T1", N_WRONG, k=2)
    assert pvalue < 1e-6


def test_the_tree_test_has_power(setup, monkeypatch) -> None:
    """The tree test rejects a wrong multi-draft rule: taking the first branch whose token
    has p > 0 instead of trying the branches in turn against the residual."""
    monkeypatch.setattr(engine_module, "accept_tree", first_positive_branch)
    pvalue, _, _ = check(setup, "T1", N_WRONG, k=2, confidence=TREE_CONFIDENCE, tree_width=2)
    assert pvalue < 1e-6


@pytest.mark.parametrize("speculative", [dict(k=3, adaptive=True), dict(k=2, overlap=True)], ids=["adaptive", "overlap"])
def test_the_5_token_tests_have_power(setup, monkeypatch, speculative: dict) -> None:
    """The 5-token law of the adaptive and overlapped tests rejects the subtly wrong rule too."""
    monkeypatch.setattr(engine_module, "accept_blocks", per_block(residual_is_target))
    pvalue, _, _ = check(setup, "T1", N_WRONG, max_new=ADAPTIVE_NEW, **speculative)
    assert pvalue < 1e-6
