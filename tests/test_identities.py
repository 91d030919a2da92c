"""Identities of the EFT combination that must hold on the real tiny models.

Each identity is checked on ``Engine.score`` of a fixed continuation: the EFT log-probs
(``log_softmax(s)`` of the continuation's tokens) against either a single role's log-probs
or a combination computed here by hand from the roles' full log-prob rows. Each also comes
with a check that the two sides are not trivially equal (a different spec gives a
different answer), so every identity can fail.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
from transformers import AutoModelForCausalLM

from eft_router.roles.interface import ScoreItem
from eft_router.engine import Engine, GenerationRequest, ScoreRequest
from eft_router.core.spec import EFTSpec, SamplingParams
from eft_router.tiny import TinyModel, build_tiny_family

# Engine-vs-engine comparisons reuse the same float32 forward passes, so only the
# combination's arithmetic differs: 1e-5 is well above its rounding.
TOL = 1e-5
# Engine vs a separate cache-free Hugging Face forward pass: float32 rounding of these
# peaked models reaches ~2e-5 (measured, see test_combine_reference.py).
MODEL_TOL = 5e-5
PROMPT = "w1 w2 w3"
CONT = "w5 w17 w42 w8 w8 w33 w1 w59 w20 w11 w3 w47 w26 w38 w14 w50 w2 w9 w31 w44"


def ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def score(engine: Engine, spec: EFTSpec):
    return asyncio.run(engine.score(ScoreRequest(ids(engine, PROMPT), ids(engine, CONT), spec)))


def role_rows(engine: Engine, roles) -> dict[str, torch.Tensor]:
    """Full log-prob rows ``[len(CONT), V]`` of each role at the continuation's positions,
    through the Role interface (one fresh session each)."""
    prompt, cont = ids(engine, PROMPT), ids(engine, CONT)

    async def one(role):
        session = uuid.uuid4().hex
        try:
            (rows,) = await engine.roles[role].score([ScoreItem(session, prompt + cont, len(cont) + 1)])
            return rows
        finally:
            await engine.roles[role].release([session])

    return {r: asyncio.run(one(r))[:-1].double() for r in roles}


def at_tokens(engine: Engine, scores: torch.Tensor) -> list[float]:
    """log_softmax of hand-made scores, at the continuation's tokens."""
    index = torch.tensor(ids(engine, CONT)).unsqueeze(-1)
    return torch.log_softmax(scores, dim=-1).gather(-1, index).squeeze(-1).tolist()


def max_diff(a, b) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) for x, y in zip(a, b))


def test_continuation_is_long_and_in_vocabulary(engine):
    cont = ids(engine, CONT)
    assert len(cont) == 20 and all(2 <= t < engine.vocab_size for t in cont)


# (a) lambda = 0 is base_large --------------------------------------------------------------


def test_lambda_zero_is_base_large(engine):
    res = score(engine, EFTSpec(deltas={"ft_small": 0.0}))
    assert max_diff(res.logprobs, res.role_logprobs["base_large"]) < TOL
    rows = role_rows(engine, ["base_large"])
    assert max_diff(res.logprobs, at_tokens(engine, rows["base_large"])) < TOL
    # lambda matters: lambda = 1 is far from base_large on this continuation
    assert max_diff(score(engine, EFTSpec()).logprobs, res.role_logprobs["base_large"]) > 1e-2


def test_lambda_zero_diagnostics_are_base_large(engine):
    sampling = SamplingParams(temperature=1.0, seed=3, max_new_tokens=20)
    gen = asyncio.run(engine.generate(GenerationRequest(ids(engine, PROMPT), eft=EFTSpec(deltas={"ft_small": 0.0}), sampling=sampling, diagnostics=True)))
    assert len(gen.diagnostics) >= 5
    assert max_diff([d.logprob for d in gen.diagnostics], [d.role_logprobs["base_large"] for d in gen.diagnostics]) < TOL


# (b) one model in every role ------------------------------------------------------------------

SAME = TinyModel(hidden=32, layers=1, seed=21, init_std=0.3)


@pytest.fixture(scope="module")
def same_model_engine(tmp_path_factory) -> Engine:
    words = [f"w{i}" for i in range(60)]  # the conftest family's words
    paths = build_tiny_family(tmp_path_factory.mktemp("same"), words, {"base_large": SAME, "base_small": SAME, "ft_small": SAME})
    return Engine.local(paths)


@pytest.mark.parametrize(
    "spec",
    [EFTSpec(), EFTSpec(beta=2.0), EFTSpec(weight_top_p=0.5), EFTSpec(deltas={"ft_small": 0.3})],
    ids=["upscale", "beta2", "weight_top_p", "lambda0.3"],
)
def test_same_model_everywhere_is_that_model(same_model_engine, spec):
    res = score(same_model_engine, spec)
    for role in ("base_large", "base_small", "ft_small"):
        assert max_diff(res.logprobs, res.role_logprobs[role]) < TOL
    # independently: the saved model itself, one cache-free forward pass
    model = AutoModelForCausalLM.from_pretrained(same_model_engine.roles["ft_small"].info.model).eval()
    prompt, cont = ids(same_model_engine, PROMPT), ids(same_model_engine, CONT)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + cont]), use_cache=False).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits[:, : same_model_engine.vocab_size].double(), -1)
    expected = expected.gather(-1, torch.tensor(cont).unsqueeze(-1)).squeeze(-1).tolist()
    assert max_diff(res.logprobs, expected) < MODEL_TOL


def test_same_model_sampling_is_that_model(same_model_engine):
    sampling = SamplingParams(temperature=1.0, seed=5, max_new_tokens=20)
    prompt = ids(same_model_engine, PROMPT)
    eft = asyncio.run(same_model_engine.generate(GenerationRequest(prompt, eft=EFTSpec(), sampling=sampling, diagnostics=True)))
    alone = asyncio.run(
        same_model_engine.generate(GenerationRequest(prompt, eft=EFTSpec(preset="linear", coefficients={"ft_small": 1.0}), sampling=sampling))
    )
    assert eft.token_ids == alone.token_ids
    assert max_diff([d.logprob for d in eft.diagnostics], [d.role_logprobs["ft_small"] for d in eft.diagnostics]) < TOL


def test_distinct_family_is_not_that_model(engine):
    """The same check on the real family fails: base_large != base_small there."""
    res = score(engine, EFTSpec())
    assert max_diff(res.logprobs, res.role_logprobs["ft_small"]) > 1e-2


# (c) beta = 1 and weight_top_p = 1 are plain up-scaling --------------------------------------


def test_beta_one_top_p_one_is_plain_upscale(engine):
    explicit = score(engine, EFTSpec(deltas={"ft_small": 1.0}, beta=1.0, weight_top_p=1.0))
    plain = score(engine, EFTSpec())
    assert max_diff(explicit.logprobs, plain.logprobs) < TOL
    rows = role_rows(engine, ["base_large", "base_small", "ft_small"])
    by_hand = at_tokens(engine, rows["base_large"] + (rows["ft_small"] - rows["base_small"]))
    assert max_diff(plain.logprobs, by_hand) < TOL
    # both knobs do something when moved off 1
    assert max_diff(score(engine, EFTSpec(beta=1.5)).logprobs, plain.logprobs) > 1e-2
    assert max_diff(score(engine, EFTSpec(weight_top_p=0.5)).logprobs, plain.logprobs) > 1e-2


def test_amplification_by_hand(engine):
    rows = role_rows(engine, ["base_large", "base_small", "ft_small"])
    res = score(engine, EFTSpec(beta=1.5))
    by_hand = at_tokens(engine, rows["ft_small"] + 1.5 * (rows["base_large"] - rows["base_small"]))
    assert max_diff(res.logprobs, by_hand) < TOL


# (d) linear with (1, 1, -1) is up-scaling ---------------------------------------------------


def test_linear_coefficients_equal_upscale(engine):
    linear = score(engine, EFTSpec(preset="linear", coefficients={"base_large": 1.0, "ft_small": 1.0, "base_small": -1.0}))
    up = score(engine, EFTSpec())
    assert max_diff(linear.logprobs, up.logprobs) < TOL
    for role in ("base_large", "base_small", "ft_small"):
        assert max_diff(linear.role_logprobs[role], up.role_logprobs[role]) < TOL
    # a different linear combination is not up-scaling
    other = score(engine, EFTSpec(preset="linear", coefficients={"base_large": 1.0, "ft_small": 1.0, "base_small": -0.5}))
    assert max_diff(other.logprobs, up.logprobs) > 1e-2


# (e) interpolate with {ft_small: 1} is ft_small -------------------------------------------------


def test_interpolate_full_weight_is_ft_small(engine):
    res = score(engine, EFTSpec(preset="interpolate", deltas={"ft_small": 1.0}))
    assert max_diff(res.logprobs, res.role_logprobs["ft_small"]) < TOL
    assert max_diff(res.logprobs, at_tokens(engine, role_rows(engine, ["ft_small"])["ft_small"])) < TOL
    half = score(engine, EFTSpec(preset="interpolate", deltas={"ft_small": 0.5}))
    assert max_diff(half.logprobs, res.role_logprobs["ft_small"]) > 1e-2


def test_interpolate_two_rewards_by_hand(engine):
    rows = role_rows(engine, ["base_small", "ft_small", "ft_safe"])
    res = score(engine, EFTSpec(preset="interpolate", deltas={"ft_small": 0.4, "ft_safe": 0.6}))
    bs = rows["base_small"]
    by_hand = at_tokens(engine, bs + 0.4 * (rows["ft_small"] - bs) + 0.6 * (rows["ft_safe"] - bs))
    assert max_diff(res.logprobs, by_hand) < TOL


# (f) down-scaling by hand -------------------------------------------------------------------


def test_downscale_by_hand(engine):
    res = score(engine, EFTSpec(preset="downscale"))
    rows = role_rows(engine, ["base_small", "ft_large", "base_large"])
    by_hand = at_tokens(engine, rows["base_small"] + rows["ft_large"] - rows["base_large"])
    assert max_diff(res.logprobs, by_hand) < TOL
    for role in ("base_small", "ft_large", "base_large"):
        assert max_diff(res.role_logprobs[role], at_tokens(engine, rows[role])) < TOL
    # the delta matters: down-scaling is not base_small itself
    assert max_diff(res.logprobs, res.role_logprobs["base_small"]) > 1e-2


# greedy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["w7", "w10 w20"], ids=["to_length", "to_eos"])
def test_greedy_lambda_zero_equals_greedy_base_large(engine, family_paths, text):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=30)
    prompt = ids(engine, text)
    zero = asyncio.run(engine.generate(GenerationRequest(prompt, eft=EFTSpec(deltas={"ft_small": 0.0}), sampling=greedy)))
    large = asyncio.run(engine.generate(GenerationRequest(prompt, eft=EFTSpec(preset="linear", coefficients={"base_large": 1.0}), sampling=greedy)))
    assert zero.token_ids == large.token_ids
    assert zero.finish_reason == large.finish_reason and zero.text == large.text
    assert len(zero.token_ids) >= 20
    # lambda does matter for the greedy path too
    assert asyncio.run(engine.generate(GenerationRequest(prompt, eft=EFTSpec(), sampling=greedy))).token_ids != zero.token_ids
    # and it is base_large's own greedy continuation, step by step without a cache
    model = AutoModelForCausalLM.from_pretrained(family_paths["base_large"]).eval()
    seq = list(prompt)
    with torch.inference_mode():
        for _ in zero.token_ids:
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1, : engine.vocab_size]
            seq.append(int(logits.argmax()))
    assert seq[len(prompt) :] == zero.token_ids
