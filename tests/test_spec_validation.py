"""Bad requests raise SpecError naming the field and what is allowed, and leave the engine
serving; tokenizers that disagree are refused; padded embedding rows are trimmed."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
import torch

from eft_router.roles.interface import ScoreItem
from eft_router.engine import Engine, GenerationRequest, ScoreRequest
from eft_router.core.spec import MAX_NEW_TOKENS, MAX_SPECULATIVE_K, EFTSpec, SamplingParams, SpecError, SpeculativeParams
from eft_router.tiny import TinyModel, build_tiny_family, tiny_tokenizer
from eft_router.core.vocab import VocabularyMismatch, check_shared_vocabulary

PROMPT = [3, 4, 5]  # "w1 w2 w3"
CONTEXT = 512  # the conftest family's context length
GOOD = SamplingParams(temperature=1.0, seed=0, max_new_tokens=5)


def gen(engine, prompt=PROMPT, eft=None, sampling=None, speculative=None, diagnostics=False):
    kwargs = {"diagnostics": diagnostics}
    if eft is not None:
        kwargs["eft"] = eft() if callable(eft) else eft
    if sampling is not None:
        kwargs["sampling"] = sampling() if callable(sampling) else sampling
    if speculative is not None:
        kwargs["speculative"] = speculative() if callable(speculative) else speculative
    return asyncio.run(engine.generate(GenerationRequest(prompt, **kwargs)))


def nan_delta():
    return EFTSpec(deltas={"ft_small": math.nan})


# id -> (request, expected field, substrings the message must contain)
CASES = {
    # -- which roles ----------------------------------------------------------------------
    "delta_unknown_role": (
        lambda e: gen(e, eft=lambda: EFTSpec(deltas={"ft_nope": 1.0})),
        "eft.deltas.ft_nope",
        ["'ft_nope'", "not served", "base_large", "base_small", "ft_small", "ft_safe", "ft_large"],
    ),
    "delta_base_large": (
        lambda e: gen(e, eft=lambda: EFTSpec(deltas={"base_large": 1.0})),
        "eft.deltas.base_large",
        ["fine-tune of base_small", "'ft_*'", "'base_large'"],
    ),
    "delta_base_small": (
        lambda e: gen(e, eft=lambda: EFTSpec(deltas={"ft_small": 0.5, "base_small": 0.5})),
        "eft.deltas.base_small",
        ["fine-tune of base_small", "'ft_*'"],
    ),
    "upscale_delta_ft_large": (
        lambda e: gen(e, eft=lambda: EFTSpec(deltas={"ft_large": 1.0})),
        "eft.deltas.ft_large",
        ["fine-tune of base_small", "other than 'ft_large'"],
    ),
    "downscale_delta_ft_small": (
        lambda e: gen(e, eft=lambda: EFTSpec(preset="downscale", deltas={"ft_small": 1.0})),
        "eft.deltas.ft_small",
        ["'ft_large'", "base_large"],
    ),
    "linear_unknown_role": (
        lambda e: gen(e, eft=lambda: EFTSpec(preset="linear", coefficients={"base_large": 1.0, "ft_nope": 1.0})),
        "eft.coefficients.ft_nope",
        ["'ft_nope'", "not served", "ft_small"],
    ),
    # -- numbers --------------------------------------------------------------------------
    "lambda_nan": (lambda e: gen(e, eft=nan_delta), "eft.deltas.ft_small", ["finite", "nan"]),
    "lambda_inf": (lambda e: gen(e, eft=lambda: EFTSpec(deltas={"ft_small": math.inf})), "eft.deltas.ft_small", ["finite", "inf"]),
    "lambda_minus_inf": (lambda e: gen(e, eft=lambda: EFTSpec(deltas={"ft_small": -math.inf})), "eft.deltas.ft_small", ["finite"]),
    "lambda_string": (lambda e: gen(e, eft=lambda: EFTSpec(deltas={"ft_small": "1"})), "eft.deltas.ft_small", ["number"]),
    "beta_nan": (lambda e: gen(e, eft=lambda: EFTSpec(beta=math.nan)), "eft.beta", ["finite"]),
    "beta_inf": (lambda e: gen(e, eft=lambda: EFTSpec(beta=math.inf)), "eft.beta", ["finite"]),
    "coefficient_nan": (
        lambda e: gen(e, eft=lambda: EFTSpec(preset="linear", coefficients={"base_large": math.nan})),
        "eft.coefficients.base_large",
        ["finite"],
    ),
    "weight_top_p_0": (lambda e: gen(e, eft=lambda: EFTSpec(weight_top_p=0.0)), "eft.weight_top_p", ["(0, 1]"]),
    "weight_top_p_1.5": (lambda e: gen(e, eft=lambda: EFTSpec(weight_top_p=1.5)), "eft.weight_top_p", ["(0, 1]"]),
    "temperature_negative": (lambda e: gen(e, sampling=lambda: SamplingParams(temperature=-0.5)), "sampling.temperature", ["0 (greedy) or in [0.0001, 10000]"]),
    "temperature_tiny": (lambda e: gen(e, sampling=lambda: SamplingParams(temperature=1e-40)), "sampling.temperature", ["0 (greedy) or in [0.0001", "1e-40"]),
    "temperature_denormal": (lambda e: gen(e, sampling=lambda: SamplingParams(temperature=5e-324)), "sampling.temperature", ["0 (greedy) or in"]),
    "temperature_huge": (lambda e: gen(e, sampling=lambda: SamplingParams(temperature=1e5)), "sampling.temperature", ["10000]", "100000"]),
    "beta_huge": (lambda e: gen(e, eft=lambda: EFTSpec(beta=1e39)), "eft.beta", ["[-10000, 10000]", "1e+39"]),
    "lambda_huge": (lambda e: gen(e, eft=lambda: EFTSpec(deltas={"ft_small": -1e39})), "eft.deltas.ft_small", ["[-10000, 10000]"]),
    "coefficient_huge": (
        lambda e: gen(e, eft=lambda: EFTSpec(preset="linear", coefficients={"base_large": 1e39})),
        "eft.coefficients.base_large",
        ["[-10000, 10000]"],
    ),
    "temperature_nan": (lambda e: gen(e, sampling=lambda: SamplingParams(temperature=math.nan)), "sampling.temperature", ["finite"]),
    "top_p_0": (lambda e: gen(e, sampling=lambda: SamplingParams(top_p=0.0)), "sampling.top_p", ["(0, 1]"]),
    "top_p_1.5": (lambda e: gen(e, sampling=lambda: SamplingParams(top_p=1.5)), "sampling.top_p", ["(0, 1]"]),
    "top_k_minus_1": (lambda e: gen(e, sampling=lambda: SamplingParams(top_k=-1)), "sampling.top_k", [">= 0"]),
    "top_k_float": (lambda e: gen(e, sampling=lambda: SamplingParams(top_k=2.5)), "sampling.top_k", ["integer"]),
    "speculative_k_minus_1": (
        lambda e: gen(e, speculative=lambda: SpeculativeParams(k=-1)),
        "speculative.k",
        [f"[0, {MAX_SPECULATIVE_K}]"],
    ),
    "speculative_k_too_big": (
        lambda e: gen(e, speculative=lambda: SpeculativeParams(k=MAX_SPECULATIVE_K + 1)),
        "speculative.k",
        [f"[0, {MAX_SPECULATIVE_K}]"],
    ),
    "speculative_confidence_1.5": (
        lambda e: gen(e, speculative=lambda: SpeculativeParams(k=2, confidence=1.5)),
        "speculative.confidence",
        ["[0, 1]"],
    ),
    "speculative_confidence_nan": (
        lambda e: gen(e, speculative=lambda: SpeculativeParams(k=2, confidence=float("nan"))),
        "speculative.confidence",
        ["finite"],
    ),
    "max_new_tokens_0": (
        lambda e: gen(e, sampling=lambda: SamplingParams(max_new_tokens=0)),
        "sampling.max_new_tokens",
        [f"[1, {MAX_NEW_TOKENS}]"],
    ),
    "max_new_tokens_too_big": (
        lambda e: gen(e, sampling=lambda: SamplingParams(max_new_tokens=MAX_NEW_TOKENS + 1)),
        "sampling.max_new_tokens",
        [f"[1, {MAX_NEW_TOKENS}]"],
    ),
    "seed_float": (lambda e: gen(e, sampling=lambda: SamplingParams(seed=1.5)), "sampling.seed", ["integer"]),
    "seed_string": (lambda e: gen(e, sampling=lambda: SamplingParams(seed="7")), "sampling.seed", ["integer"]),
    "seed_bool": (lambda e: gen(e, sampling=lambda: SamplingParams(seed=True)), "sampling.seed", ["integer"]),
    "seed_negative": (lambda e: gen(e, sampling=lambda: SamplingParams(seed=-1)), "sampling.seed", ["[0, "]),
    "stop_empty_string": (lambda e: gen(e, sampling=lambda: SamplingParams(stop=("ok", ""))), "sampling.stop[1]", ["non-empty"]),
    "stop_token_negative": (
        lambda e: gen(e, sampling=lambda: SamplingParams(stop_token_ids=(1, -3))),
        "sampling.stop_token_ids[1]",
        [">= 0"],
    ),
    # -- preset / field combinations -----------------------------------------------------------
    "coefficients_with_upscale": (
        lambda e: gen(e, eft=lambda: EFTSpec(coefficients={"base_large": 1.0})),
        "eft.coefficients",
        ["only for preset 'linear'"],
    ),
    "linear_without_coefficients": (
        lambda e: gen(e, eft=lambda: EFTSpec(preset="linear")),
        "eft.coefficients",
        ["'linear'", "at least one role coefficient"],
    ),
    "linear_with_deltas": (
        lambda e: gen(e, eft=lambda: EFTSpec(preset="linear", coefficients={"base_large": 1.0}, deltas={"ft_small": 1.0})),
        "eft.deltas",
        ["eft.coefficients"],
    ),
    "interpolate_with_beta": (
        lambda e: gen(e, eft=lambda: EFTSpec(preset="interpolate", beta=2.0)),
        "eft.beta",
        ["interpolate"],
    ),
    "interpolate_with_weight_top_p": (
        lambda e: gen(e, eft=lambda: EFTSpec(preset="interpolate", weight_top_p=0.5)),
        "eft.weight_top_p",
        ["interpolate"],
    ),
    "deltas_not_a_mapping": (lambda e: gen(e, eft=lambda: EFTSpec(deltas=["ft_small"])), "eft.deltas", []),
    "stop_bare_string": (lambda e: gen(e, sampling=lambda: SamplingParams(stop="END")), "sampling.stop", []),
    "stop_token_ids_bare_int": (lambda e: gen(e, sampling=lambda: SamplingParams(stop_token_ids=5)), "sampling.stop_token_ids", []),
    "unknown_preset": (
        lambda e: gen(e, eft=lambda: EFTSpec(preset="sideways")),
        "eft.preset",
        ["upscale", "downscale", "interpolate", "linear", "'sideways'"],
    ),
    # -- the request itself -------------------------------------------------------------------
    "empty_prompt": (lambda e: gen(e, prompt=[]), "prompt_ids", ["at least one token"]),
    "token_id_out_of_range": (lambda e: gen(e, prompt=[3, 62, 4]), "prompt_ids[1]", ["[0, 62)", "62"]),
    "token_id_negative": (lambda e: gen(e, prompt=[-1]), "prompt_ids[0]", ["[0, 62)"]),
    "token_id_float": (lambda e: gen(e, prompt=[3, 4.0]), "prompt_ids[1]", ["integers"]),
    "over_context_length": (
        lambda e: gen(e, sampling=lambda: SamplingParams(max_new_tokens=CONTEXT - len(PROMPT) + 1)),
        "sampling.max_new_tokens",
        [f"context length {CONTEXT}", "prompt (3 tokens)"],
    ),
    "drafter_not_served": (
        lambda e: gen(e, speculative=lambda: SpeculativeParams(k=2, drafter="ft_nope")),
        "speculative.drafter",
        ["'ft_nope'", "base_large", "ft_small"],
    ),
    "score_empty_continuation": (
        lambda e: asyncio.run(e.score(ScoreRequest(PROMPT, [], EFTSpec()))),
        "continuation_ids",
        ["at least one token"],
    ),
    "score_unknown_delta": (
        lambda e: asyncio.run(e.score(ScoreRequest(PROMPT, [5], EFTSpec(deltas={"ft_nope": 1.0})))),
        "eft.deltas.ft_nope",
        ["not served"],
    ),
    "score_over_context_length": (
        lambda e: asyncio.run(e.score(ScoreRequest(PROMPT, [5] * (CONTEXT - len(PROMPT) + 1), EFTSpec()))),
        "continuation_ids",
        [f"context length {CONTEXT}"],
    ),
}


@pytest.fixture(scope="module")
def baseline(engine):
    """A good request's answer before any bad one was made."""
    assert engine.context_length == CONTEXT and engine.vocab_size == 62
    out = gen(engine, sampling=GOOD)
    assert len(out.token_ids) >= 1
    return out.token_ids


def sessions(engine) -> int:
    return sum(len(role.worker.sessions) for role in engine.roles.values())


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_request_is_refused(engine, baseline, case):
    request, field, needles = CASES[case]
    before = sessions(engine)
    with pytest.raises(SpecError) as info:
        request(engine)
    err = info.value
    assert err.field == field
    for needle in needles:
        assert needle in err.message, f"{needle!r} not in {err.message!r}"
    assert str(err).startswith(f"{field}: ")
    assert sessions(engine) == before  # nothing left behind in the roles' caches
    # ...and the engine still serves the same good request with the same answer
    assert gen(engine, sampling=GOOD).token_ids == baseline


# -- a role a preset needs is not served ----------------------------------------------------


@pytest.fixture(scope="module")
def small_engine(family_paths) -> Engine:
    return Engine.local({k: family_paths[k] for k in ("base_small", "ft_small")})


@pytest.mark.parametrize("preset", ["upscale", "downscale"])
def test_preset_needs_base_large(small_engine, preset):
    with pytest.raises(SpecError) as info:
        gen(small_engine, eft=EFTSpec(preset=preset))
    err = info.value
    assert err.field == "eft.preset", f"field {err.field!r} is not the dotted path of the preset field"
    assert "'base_large'" in err.message and "not served" in err.message
    assert "base_small" in err.message and "ft_small" in err.message  # what is served
    # the same engine serves what it can: interpolation at the small scale
    ok = gen(small_engine, eft=EFTSpec(preset="interpolate"), sampling=GOOD)
    assert 1 <= len(ok.token_ids) <= GOOD.max_new_tokens


def test_default_delta_not_served(family_paths):
    """Up-scaling's default delta is ft_small: without it the error names it."""
    eng = Engine.local({k: family_paths[k] for k in ("base_large", "base_small", "ft_safe")})
    with pytest.raises(SpecError) as info:
        gen(eng, eft=EFTSpec())
    assert "'ft_small'" in info.value.message and "ft_safe" in info.value.message
    assert info.value.field.startswith("eft.")
    ok = gen(eng, eft=EFTSpec(deltas={"ft_safe": 1.0}), sampling=GOOD)
    assert len(ok.token_ids) >= 1


# -- the shared vocabulary -------------------------------------------------------------------


def test_same_vocabulary_accepted():
    toks = {"base_large": tiny_tokenizer(list("abcd")), "ft_small": tiny_tokenizer(list("abcd"))}
    assert check_shared_vocabulary(toks) == 6


def test_swapped_ids_named():
    toks = {
        "base_large": tiny_tokenizer(list("abcd")),
        "base_small": tiny_tokenizer(list("abcd")),
        "ft_small": tiny_tokenizer(list("acbd")),  # 'b' and 'c' swap ids 3 and 4
    }
    with pytest.raises(VocabularyMismatch) as info:
        check_shared_vocabulary(toks)
    msg = str(info.value)
    assert "'ft_small'" in msg and "'base_large'" in msg and "'base_small'" not in msg
    assert "id 3: 'b' vs 'c'" in msg and "id 4: 'c' vs 'b'" in msg
    assert msg.index("id 3") < msg.index("id 4")
    assert "id 2" not in msg and "id 5" not in msg  # only the ids that differ


def test_extra_token_named():
    toks = {"base_large": tiny_tokenizer(list("ab")), "ft_small": tiny_tokenizer(list("abz"))}
    with pytest.raises(VocabularyMismatch) as info:
        check_shared_vocabulary(toks)
    msg = str(info.value)
    assert "'ft_small'" in msg and "id 4: None vs 'z'" in msg and "5 vs 4 tokens" in msg


def test_many_differences_listed_first_few():
    words = [f"w{i}" for i in range(30)]
    shuffled = words[:]
    random.Random(0).shuffle(shuffled)
    toks = {"base_large": tiny_tokenizer(words), "ft_small": tiny_tokenizer(shuffled)}
    with pytest.raises(VocabularyMismatch) as info:
        check_shared_vocabulary(toks)
    msg = str(info.value)
    first = next(i for i, (a, b) in enumerate(zip(words, shuffled)) if a != b) + 2  # 2 specials
    assert f"id {first}: {words[first - 2]!r} vs {shuffled[first - 2]!r}" in msg
    assert msg.count("id ") <= 5


SMALL = TinyModel(hidden=8, layers=1, heads=2, seed=31, init_std=0.3)


def test_engine_refuses_role_with_other_tokenizer(tmp_path):
    words = [f"w{i}" for i in range(20)]
    paths = build_tiny_family(tmp_path, words, {"base_large": SMALL, "base_small": SMALL, "ft_small": SMALL})
    swapped = ["w1", "w0", *words[2:]]
    tiny_tokenizer(swapped).save_pretrained(paths["ft_small"])
    with pytest.raises(VocabularyMismatch) as info:
        Engine.local(paths)
    msg = str(info.value)
    assert "'ft_small'" in msg and "id 2: 'w0' vs 'w1'" in msg and "id 3: 'w1' vs 'w0'" in msg
    # the untouched roles alone load fine
    Engine.local({k: paths[k] for k in ("base_large", "base_small")})


def test_padded_embedding_rows_are_trimmed(tmp_path):
    words = [f"w{i}" for i in range(20)]
    padded = TinyModel(hidden=8, layers=1, heads=2, seed=32, init_std=0.3, pad_rows=4)
    paths = build_tiny_family(tmp_path, words, {"base_large": padded, "base_small": SMALL, "ft_small": SMALL})
    eng = Engine.local(paths)
    V = len(eng.tokenizer)
    assert V == 22 and eng.vocab_size == V
    model = eng.roles["base_large"].worker.model
    assert model.get_output_embeddings().weight.shape[0] == V + 4
    ids = [2, 5, 7, 9, 11]

    async def rows():
        try:
            (rows,) = await eng.roles["base_large"].score([ScoreItem("s", ids, len(ids))])
            return rows
        finally:
            await eng.roles["base_large"].release(["s"])

    lp = asyncio.run(rows())
    assert lp.shape == (len(ids), V)
    assert torch.allclose(lp.double().exp().sum(-1), torch.ones(len(ids), dtype=torch.float64), atol=1e-5, rtol=0)
    # the padded rows carry real mass here, so not trimming them would show
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    untrimmed = torch.log_softmax(logits, -1)[:, :V]
    assert (untrimmed.exp().sum(-1) < 0.99).all()
    assert torch.allclose(lp.double(), torch.log_softmax(logits[:, :V], -1), atol=5e-5, rtol=0)
    # and the engine samples/scores over exactly V tokens with that role in the mix
    out = gen(eng, prompt=[2, 3], sampling=SamplingParams(seed=1, max_new_tokens=8))
    assert all(0 <= t < V for t in out.token_ids)
    res = asyncio.run(eng.score(ScoreRequest([2, 3], [4, 5, 6], EFTSpec())))
    assert all(math.isfinite(x) and x <= 0 for x in res.logprobs)


# -- every accepted value computes a finite, normalised distribution --------------------------


EXTREMES = {
    "temperature_min": dict(sampling=SamplingParams(temperature=1e-4, seed=3, max_new_tokens=6)),
    "temperature_max": dict(sampling=SamplingParams(temperature=1e4, seed=3, max_new_tokens=6)),
    "top_p_tiny": dict(sampling=SamplingParams(top_p=1e-45, seed=3, max_new_tokens=6)),
    "top_p_denormal": dict(sampling=SamplingParams(top_p=5e-324, seed=3, max_new_tokens=6)),
    "beta_max": dict(eft=EFTSpec(beta=1e4, weight_top_p=1e-45), sampling=SamplingParams(temperature=1e-4, seed=3, max_new_tokens=6)),
    "beta_min": dict(eft=EFTSpec(beta=-1e4)),
    "deltas_max": dict(eft=EFTSpec(deltas={"ft_small": 1e4, "ft_safe": -1e4})),
    "coefficients_max": dict(eft=EFTSpec(preset="linear", coefficients={"base_large": 1e4, "base_small": -1e4, "ft_small": 1e4})),
}


@pytest.mark.parametrize("case", list(EXTREMES), ids=list(EXTREMES))
@pytest.mark.parametrize("k", [0, 2])
def test_extreme_accepted_values_give_finite_distributions(engine, case, k):
    """The edges of every range: generation runs (speculatively too) and Score's log-probs
    are finite and at most 0; no NaN anywhere."""
    fields = dict(EXTREMES[case])
    fields.setdefault("sampling", SamplingParams(seed=3, max_new_tokens=6))
    out = gen(engine, speculative=SpeculativeParams(k=k), **fields)
    assert 1 <= len(out.token_ids) <= 6 and all(0 <= t < 62 for t in out.token_ids)
    diagnosed = gen(engine, speculative=SpeculativeParams(k=k), diagnostics=True, **fields)
    assert all(math.isfinite(d.logprob) and d.logprob <= 1e-6 for d in diagnosed.diagnostics)
    scored = asyncio.run(engine.score(ScoreRequest(PROMPT, [5, 6, 7], fields.get("eft", EFTSpec()))))
    assert all(math.isfinite(x) and x <= 1e-6 for x in scored.logprobs), scored.logprobs
