"""The EFT combination equals a brute-force reference written from ARCHITECTURE.md.

Two independent checks:

* end to end: sample with the engine (KV caches, batched roles, the real combine), then
  recompute every step from scratch with plain Hugging Face forward passes (no cache) and a
  per-mode formula written out by hand here, and compare the engine's diagnostics and
  ``Engine.score`` with it, per token and over the whole vocabulary;
* ``combine`` alone on random ``[B, T, V]`` log-probs against a per-row python loop,
  including the conservative (weight top-p) filter semantics.

Nothing here calls ``eft_router.core.combine`` to build an expected value.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dataclasses import replace

from conftest import ROLES, WORDS
from eft_router.core.combine import combine
from eft_router.engine import Engine, GenerationRequest, ScoreRequest
from eft_router.core.spec import EFTSpec, SamplingParams
from eft_router.tiny import build_tiny_family

# combine() on given float32 log-probs is plain arithmetic: 1e-5 is far above its rounding.
TOL = 1e-5
# Engine (KV-cached float32 forward passes) against the cache-free reference. The models
# here have the log-prob range of trained LMs (init_std 0.1); on the suite's deliberately
# peaked models (log-probs down to about -40) float32 rounding alone reaches ~1.8e-5.
# Any real error (a wrong coefficient, a missed normalisation or filter, an off-by-one
# position) is >= 1e-3.
MODEL_TOL = 1e-5
ALL_ROLES = ("base_large", "base_small", "ft_small", "ft_safe", "ft_large")
PROMPT = "w1 w2 w3"
SEED = 1  # gives >= 15 tokens in every mode below with these tiny models
MAX_NEW = 30


# -- brute-force reference, written from ARCHITECTURE.md ----------------------------------


def py_log_softmax(scores: list[float]) -> list[float]:
    m = max(scores)
    lse = m + math.log(sum(math.exp(s - m) for s in scores))
    return [s - lse for s in scores]


def py_nucleus(logprobs: list[float], top_p: float) -> list[bool]:
    """Smallest set of most likely tokens whose probability mass reaches top_p: walk the
    tokens from most to least likely, keep a token while the mass kept so far is < top_p."""
    probs = [math.exp(x) for x in py_log_softmax(logprobs)]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = [False] * len(probs)
    mass = 0.0
    for i in order:
        if mass >= top_p:
            break
        keep[i] = True
        mass += probs[i]
    return keep


def ref_upscale(l, deltas, beta=1.0, top_p=1.0):
    """l_base_large + sum_i lambda_i (l_ft_i - l_base_small), written as the behaviour
    l_base_small + sum_i lambda_i (l_ft_i - l_base_small) plus the up-scaling weight
    beta * (l_base_large - l_base_small); with top_p < 1 the weight is zeroed outside the
    nucleus of softmax(behaviour)."""
    V = len(l["base_large"])
    behaviour = [l["base_small"][v] + sum(lam * (l[r][v] - l["base_small"][v]) for r, lam in deltas.items()) for v in range(V)]
    keep = py_nucleus(behaviour, top_p) if top_p < 1.0 else [True] * V
    return [behaviour[v] + (beta * (l["base_large"][v] - l["base_small"][v]) if keep[v] else 0.0) for v in range(V)]


def ref_downscale(l, beta=1.0, top_p=1.0):
    """base_small + (ft_large - base_large); filter on the nucleus of ft_large."""
    V = len(l["base_large"])
    behaviour = list(l["ft_large"])
    keep = py_nucleus(behaviour, top_p) if top_p < 1.0 else [True] * V
    return [behaviour[v] + (beta * (l["base_small"][v] - l["base_large"][v]) if keep[v] else 0.0) for v in range(V)]


def ref_linear(l, coefficients):
    V = len(next(iter(l.values())))
    return [sum(c * l[r][v] for r, c in coefficients.items()) for v in range(V)]


# mode -> (spec, roles it reads, reference scores from per-role log-prob lists)
MODES = {
    "upscale": (
        EFTSpec(),
        {"base_large", "base_small", "ft_small"},
        lambda l: [bl + (ft - bs) for bl, bs, ft in zip(l["base_large"], l["base_small"], l["ft_small"])],
    ),
    "downscale": (
        EFTSpec(preset="downscale"),
        {"base_large", "base_small", "ft_large"},
        lambda l: [bs + (fl - bl) for bl, bs, fl in zip(l["base_large"], l["base_small"], l["ft_large"])],
    ),
    "interp_upscaled": (
        EFTSpec(deltas={"ft_small": 0.7, "ft_safe": 0.3}),
        {"base_large", "base_small", "ft_small", "ft_safe"},
        lambda l: [
            bl + 0.7 * (ft - bs) + 0.3 * (sf - bs)
            for bl, bs, ft, sf in zip(l["base_large"], l["base_small"], l["ft_small"], l["ft_safe"])
        ],
    ),
    "amplify": (
        EFTSpec(beta=1.5),
        {"base_large", "base_small", "ft_small"},
        lambda l: [ft + 1.5 * (bl - bs) for bl, bs, ft in zip(l["base_large"], l["base_small"], l["ft_small"])],
    ),
    "weight_top_p": (
        EFTSpec(weight_top_p=0.8),
        {"base_large", "base_small", "ft_small"},
        lambda l: [
            ft + ((bl - bs) if keep else 0.0)
            for bl, bs, ft, keep in zip(l["base_large"], l["base_small"], l["ft_small"], py_nucleus(l["ft_small"], 0.8))
        ],
    ),
    "interpolate": (
        EFTSpec(preset="interpolate", deltas={"ft_small": 0.5, "ft_safe": 0.25}),
        {"base_small", "ft_small", "ft_safe"},
        lambda l: [bs + 0.5 * (ft - bs) + 0.25 * (sf - bs) for bs, ft, sf in zip(l["base_small"], l["ft_small"], l["ft_safe"])],
    ),
    "linear": (
        EFTSpec(preset="linear", coefficients={"base_large": 0.5, "ft_small": 0.8, "base_small": -0.3}),
        {"base_large", "base_small", "ft_small"},
        lambda l: ref_linear(l, {"base_large": 0.5, "ft_small": 0.8, "base_small": -0.3}),
    ),
}


class Reference:
    """Cache-free full forward passes of every role, straight from the saved checkpoints."""

    def __init__(self, paths: dict[str, str], vocab_size: int) -> None:
        self.models = {r: AutoModelForCausalLM.from_pretrained(paths[r]).float().eval() for r in ALL_ROLES}
        self.V = vocab_size
        self._memo: dict[tuple[str, tuple[int, ...]], list[float]] = {}

    @torch.inference_mode()
    def logprobs(self, role: str, ids: list[int]) -> list[float]:
        """log_softmax over the first V logits of the next token after ``ids``."""
        key = (role, tuple(ids))
        if key not in self._memo:
            out = self.models[role](input_ids=torch.tensor([ids]), use_cache=False)
            logits = out.logits[0, -1].double().tolist()
            assert len(logits) >= self.V
            self._memo[key] = py_log_softmax(logits[: self.V])
        return self._memo[key]

    def step(self, mode: str, ids: list[int]) -> tuple[dict[str, list[float]], list[float]]:
        """Per-role log-probs and log_softmax(s) of the EFT scores, after ``ids``."""
        _, roles, formula = MODES[mode]
        l = {r: self.logprobs(r, ids) for r in roles}
        return l, py_log_softmax(formula(l))


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory) -> dict[str, str]:
    roles = {role: replace(spec, init_std=0.1) for role, spec in ROLES.items()}
    return build_tiny_family(tmp_path_factory.mktemp("reference_family"), WORDS, roles)


@pytest.fixture(scope="module")
def engine(family_paths) -> Engine:
    return Engine.local(family_paths)


@pytest.fixture(scope="module")
def reference(family_paths, engine) -> Reference:
    return Reference(family_paths, len(engine.tokenizer))


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return engine.tokenizer(PROMPT)["input_ids"]


# -- end to end ---------------------------------------------------------------------------


def test_reference_sees_padded_rows_trimmed(reference, engine):
    """The reference trims ft_small's padded embedding rows to the tokenizer's length."""
    assert engine.vocab_size == len(engine.tokenizer) == reference.V
    assert reference.models["ft_small"].get_output_embeddings().weight.shape[0] == reference.V + 4


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_generation_matches_reference(engine, reference, prompt, mode):
    spec, roles, _ = MODES[mode]
    sampling = SamplingParams(temperature=1.0, seed=SEED, max_new_tokens=MAX_NEW, stop_token_ids=())
    gen = asyncio.run(engine.generate(GenerationRequest(prompt, eft=spec, sampling=sampling, diagnostics=True)))
    n = len(gen.token_ids)
    assert n >= 10, f"only {n} tokens ({gen.finish_reason}); pick another seed"
    assert len(gen.diagnostics) == n
    role_err = eft_err = 0.0
    for t, (token, diag) in enumerate(zip(gen.token_ids, gen.diagnostics)):
        assert diag.token_id == token
        assert set(diag.role_logprobs) == roles
        l, eft = reference.step(mode, prompt + gen.token_ids[:t])
        for r in roles:
            role_err = max(role_err, abs(diag.role_logprobs[r] - l[r][token]))
        eft_err = max(eft_err, abs(diag.logprob - eft[token]))
        assert math.isfinite(diag.logprob)
    assert role_err < MODEL_TOL, f"role log-probs differ by {role_err}"
    assert eft_err < MODEL_TOL, f"EFT log-probs differ by {eft_err}"

    # Engine.score on the same continuation: one forward pass per role, same numbers.
    scored = asyncio.run(engine.score(ScoreRequest(prompt, gen.token_ids, spec)))
    assert scored.token_ids == gen.token_ids
    assert set(scored.role_logprobs) == roles
    for t, token in enumerate(gen.token_ids):
        l, eft = reference.step(mode, prompt + gen.token_ids[:t])
        assert abs(scored.logprobs[t] - eft[token]) < MODEL_TOL, (t, scored.logprobs[t], eft[token])
        for r in roles:
            assert abs(scored.role_logprobs[r][t] - l[r][token]) < MODEL_TOL, (t, r)


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_whole_vocabulary_matches_reference(engine, reference, prompt, mode):
    """Every token's EFT log-prob at one position (after a few fixed tokens), via
    Engine.score of a one-token continuation, against the reference distribution."""
    spec, roles, _ = MODES[mode]
    prefix = prompt + engine.tokenizer("w10 w20 w30 w40 w50")["input_ids"]
    _, eft = reference.step(mode, prefix)
    assert abs(sum(math.exp(x) for x in eft) - 1.0) < 1e-9
    got = [asyncio.run(engine.score(ScoreRequest(prefix, [v], spec))).logprobs[0] for v in range(reference.V)]
    err = max(abs(a - b) for a, b in zip(got, eft))
    assert err < MODEL_TOL, f"max diff over the vocabulary {err}"
    # the distribution is not degenerate, so the comparison says something
    assert max(eft) - min(eft) > 1.0


def test_weight_filter_is_exercised(reference, prompt, engine):
    """At the whole-vocabulary position the 0.8-nucleus of ft_small is a strict subset, and
    dropping the filter changes the reference: the weight_top_p checks above can fail."""
    prefix = prompt + engine.tokenizer("w10 w20 w30 w40 w50")["input_ids"]
    l, filtered = reference.step("weight_top_p", prefix)
    keep = py_nucleus(l["ft_small"], 0.8)
    assert 0 < sum(keep) < reference.V
    unfiltered = py_log_softmax(MODES["upscale"][2](l))
    assert max(abs(a - b) for a, b in zip(filtered, unfiltered)) > 1e-2


# -- combine() on random tensors ------------------------------------------------------------

UNIT_CASES = {
    "upscale": (EFTSpec(), lambda l: ref_upscale(l, {"ft_small": 1.0})),
    "upscale_lambda_1.5": (EFTSpec(deltas={"ft_small": 1.5}), lambda l: ref_upscale(l, {"ft_small": 1.5})),
    "downscale": (EFTSpec(preset="downscale"), lambda l: ref_downscale(l)),
    "interp_upscaled": (
        EFTSpec(deltas={"ft_small": 0.7, "ft_safe": 0.3}),
        lambda l: [
            bl + 0.7 * (ft - bs) + 0.3 * (sf - bs)
            for bl, bs, ft, sf in zip(l["base_large"], l["base_small"], l["ft_small"], l["ft_safe"])
        ],
    ),
    "amplify": (
        EFTSpec(beta=1.5),
        lambda l: [ft + 1.5 * (bl - bs) for bl, bs, ft in zip(l["base_large"], l["base_small"], l["ft_small"])],
    ),
    "beta_0": (EFTSpec(beta=0.0), lambda l: list(l["ft_small"])),
    "weight_top_p_0.8": (EFTSpec(weight_top_p=0.8), lambda l: ref_upscale(l, {"ft_small": 1.0}, top_p=0.8)),
    "weight_top_p_0.3_beta_2_two_deltas": (
        EFTSpec(deltas={"ft_small": 0.6, "ft_safe": 0.4}, beta=2.0, weight_top_p=0.3),
        lambda l: ref_upscale(l, {"ft_small": 0.6, "ft_safe": 0.4}, beta=2.0, top_p=0.3),
    ),
    "downscale_weight_top_p_0.7": (
        EFTSpec(preset="downscale", weight_top_p=0.7),
        lambda l: ref_downscale(l, top_p=0.7),
    ),
    "interpolate": (
        EFTSpec(preset="interpolate", deltas={"ft_small": 0.5, "ft_safe": 0.25}),
        lambda l: [bs + 0.5 * (ft - bs) + 0.25 * (sf - bs) for bs, ft, sf in zip(l["base_small"], l["ft_small"], l["ft_safe"])],
    ),
    "linear": (
        EFTSpec(preset="linear", coefficients={"base_large": 2.0, "ft_safe": -0.5, "ft_large": 0.25}),
        lambda l: ref_linear(l, {"base_large": 2.0, "ft_safe": -0.5, "ft_large": 0.25}),
    ),
}


def random_logprobs(seed: int, shape=(3, 4, 50)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {r: torch.log_softmax(3.0 * torch.randn(*shape, generator=g), dim=-1) for r in ALL_ROLES}


@pytest.mark.parametrize("case", list(UNIT_CASES), ids=list(UNIT_CASES))
def test_combine_matches_bruteforce(case):
    spec, formula = UNIT_CASES[case]
    lp = random_logprobs(seed=list(UNIT_CASES).index(case))
    plan = spec.resolve(list(ALL_ROLES))
    out = combine({r: lp[r] for r in plan.roles}, plan)
    B, T, V = lp["base_large"].shape
    assert out.shape == (B, T, V)
    err = 0.0
    for b in range(B):
        for t in range(T):
            row = {r: lp[r][b, t].double().tolist() for r in ALL_ROLES}
            expected = formula(row)
            got = out[b, t].tolist()
            assert all(math.isfinite(x) for x in got)
            err = max(err, max(abs(x - y) for x, y in zip(got, expected)))
    assert err < TOL, f"{case}: max diff {err}"


def test_weight_top_p_keeps_tokens_outside_the_nucleus():
    """Outside the nucleus of the behaviour distribution (ft_small here) the up-scaling weight
    is 0: the token keeps its behaviour score (finite), it is not removed; inside, the score
    is the full up-scaled one."""
    lp = random_logprobs(seed=7, shape=(2, 5, 40))
    plan = EFTSpec(weight_top_p=0.6).resolve(list(ALL_ROLES))
    out = combine({r: lp[r] for r in plan.roles}, plan)
    outside_total = 0
    for b in range(2):
        for t in range(5):
            ft = lp["ft_small"][b, t].double().tolist()
            bl = lp["base_large"][b, t].double().tolist()
            bs = lp["base_small"][b, t].double().tolist()
            keep = py_nucleus(ft, 0.6)
            for v in range(40):
                got = float(out[b, t, v])
                assert math.isfinite(got)
                if keep[v]:
                    assert abs(got - (ft[v] + bl[v] - bs[v])) < TOL
                else:
                    outside_total += 1
                    assert abs(got - ft[v]) < TOL, (b, t, v)
                    # ...and not the unfiltered value: the filter really did something here
                    assert abs(bl[v] - bs[v]) < TOL or abs(got - (ft[v] + bl[v] - bs[v])) > TOL
    assert outside_total > 100  # most of a peaked distribution is outside a 0.6 nucleus


def test_weight_top_p_hand_example():
    """ft_small = [0.5, 0.3, 0.15, 0.05], top_p 0.7: the nucleus is tokens {0, 1}."""
    ft = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    bl = torch.log_softmax(torch.tensor([1.0, -1.0, 2.0, 0.5]), -1)
    bs = torch.log_softmax(torch.tensor([-0.5, 0.3, 0.0, -2.0]), -1)
    plan = EFTSpec(weight_top_p=0.7).resolve(["base_large", "base_small", "ft_small"])
    out = combine({"base_large": bl, "base_small": bs, "ft_small": ft}, plan)
    expected = [ft[0] + bl[0] - bs[0], ft[1] + bl[1] - bs[1], ft[2], ft[3]]
    assert torch.allclose(out, torch.stack(expected), atol=1e-6, rtol=0)
    # and the filtered distribution differs from the unfiltered one on the tail tokens
    full = combine({"base_large": bl, "base_small": bs, "ft_small": ft}, EFTSpec().resolve(["base_large", "base_small", "ft_small"]))
    assert torch.allclose(out[:2], full[:2], atol=1e-6) and not torch.allclose(out[2:], full[2:], atol=1e-3)
