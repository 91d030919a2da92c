"""Batching concurrent sessions into one forward pass gives the unbatched results, and the
returned log-probs are as compact as exactness allows.

Batched rows differ from unbatched ones only by float summation order: stacking sessions is
bit-exact, but padding a session's keys to the batch's length changes the length of the
attention reductions (a padded row alone differs just as much). That is a few float32 ulps
of values up to about 10 here, so the tolerance is 1e-5 absolute plus 2e-6 relative.
"""

from __future__ import annotations

import asyncio
import pickle

import pytest
import torch

from conftest import replica_stats
from eft_router.serve_backend import block_bytes
from eft_router.spec import SamplingParams, SpeculativeParams
from eft_router.worker import DraftRequest, RoleWorker, ScoreRequest

V = 62  # 60 words + <unk> + <eos>
CLOSE = dict(atol=1e-5, rtol=2e-6)


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def twin_workers(family_paths, role: str) -> tuple[RoleWorker, RoleWorker]:
    """Two workers of one model: one runs batches, the other the same calls one by one."""
    return RoleWorker(role, family_paths[role], V), RoleWorker(role, family_paths[role], V)


@pytest.mark.parametrize("role", ["base_large", "ft_small"])  # ft_small: padded embedding rows
def test_score_many_equals_score_and_leaves_equal_caches(family_paths, role):
    batched, single = twin_workers(family_paths, role)
    prefixes = [random_ids(n, seed) for seed, n in enumerate((5, 17, 30, 9))]
    for w in (batched, single):
        for i, prefix in enumerate(prefixes[:3]):  # s3 is new: nothing cached
            w.score(f"s{i}", prefix, len(prefix))
    # new tokens 1, 4, 2, 7; s1 asks for rows before its cached end (crop, recompute)
    requests = [
        ScoreRequest(f"s{i}", prefix + random_ids(m, 10 + i), start)
        for i, (prefix, m, start) in enumerate(zip(prefixes, (1, 4, 2, 7), (6, 12, 31, 1)))
    ]
    rows = batched.score_many(requests)
    assert batched.batches == 1 and batched.batched_calls == 4
    for request, got in zip(requests, rows):
        want = single.score(request.session_id, request.token_ids, request.start)
        assert got.shape == want.shape == (len(request.token_ids) - request.start + 1, V)
        torch.testing.assert_close(got, want, **CLOSE)

    # Greedy decoding on the caches the batch left: same tokens, same rows.
    ids = {r.session_id: list(r.token_ids) for r in requests}
    ref = {s: list(t) for s, t in ids.items()}
    for _ in range(5):
        steps = batched.score_many([ScoreRequest(s, t, len(t)) for s, t in ids.items()])
        for (s, t), got in zip(ids.items(), steps):
            want = single.score(s, ref[s], len(ref[s]))
            torch.testing.assert_close(got, want, **CLOSE)
            t.append(int(got[-1].argmax()))
            ref[s].append(int(want[-1].argmax()))
    assert ids == ref
    assert batched.computed_tokens == single.computed_tokens  # the batch reused the caches


def test_same_session_twice_in_a_batch_runs_in_order(family_paths):
    batched, single = twin_workers(family_paths, "base_small")
    a, b = random_ids(12, 1), random_ids(6, 2)
    requests = [ScoreRequest("a", a[:8], 8), ScoreRequest("b", b, 2), ScoreRequest("a", a, 9)]
    rows = batched.score_many(requests)
    for request, got in zip(requests, rows):
        want = single.score(request.session_id, request.token_ids, request.start)
        torch.testing.assert_close(got, want, **CLOSE)
    assert batched.caches.tokens_of("a") == a and batched.computed_tokens == single.computed_tokens


def test_draft_many_equals_draft(family_paths):
    batched, single = twin_workers(family_paths, "ft_small")
    hot = SamplingParams(temperature=0.8, top_p=0.9)
    requests = [
        DraftRequest("d0", random_ids(7, 3), 4, hot, [0.1, 0.7, 0.4, 0.9]),
        DraftRequest("d1", random_ids(15, 4), 2, SamplingParams(temperature=0.0), [0.5, 0.5]),
        DraftRequest("d2", random_ids(3, 5), 0, hot, []),
        DraftRequest("d3", random_ids(11, 6), 5, SamplingParams(temperature=1.2, top_k=5), [0.3] * 5),
    ]
    for w in (batched, single):
        w.score("d1", requests[1].token_ids[:10], 10)  # one session starts with a cache
    drafts = batched.draft_many(requests)
    # one pass for the first positions, one per draft step; step 5 has d3 alone (no batch)
    assert batched.batches == 1 + 4
    for request, got in zip(requests, drafts):
        want = single.draft(request.session_id, request.token_ids, request.k, request.sampling, request.uniforms)
        assert got.tokens == want.tokens and len(got.tokens) == request.k
        torch.testing.assert_close(got.logprobs, want.logprobs, **CLOSE)


def test_draft_many_with_a_session_that_stops_early(family_paths):
    batched, single = twin_workers(family_paths, "ft_small")
    greedy = SamplingParams(temperature=0.0)
    ids = random_ids(6, 7)
    stop = single.draft("probe", ids, 3, greedy, [0.5] * 3).tokens[1]
    requests = [
        DraftRequest("a", ids, 3, greedy, [0.5] * 3, frozenset({stop})),
        DraftRequest("b", random_ids(9, 8), 3, greedy, [0.5] * 3),
    ]
    drafts = batched.draft_many(requests)
    assert len(drafts[0].tokens) <= 2 and drafts[0].tokens[-1] == stop and len(drafts[1].tokens) == 3
    assert batched.batches == 1 + len(drafts[0].tokens)  # "a" leaves the batch after its stop
    for request, got in zip(requests, drafts):
        want = single.draft(request.session_id, request.token_ids, request.k, request.sampling, request.uniforms, request.stop_ids)
        assert got.tokens == want.tokens
        torch.testing.assert_close(got.logprobs, want.logprobs, **CLOSE)


def test_a_bad_request_names_its_argument(family_paths):
    worker = RoleWorker("base_small", family_paths["base_small"], V)
    with pytest.raises(ValueError, match="start"):
        worker.score_many([ScoreRequest("ok", [2, 3], 1), ScoreRequest("bad", [2, 3], 7)])
    with pytest.raises(ValueError, match="uniforms"):
        worker.validate(DraftRequest("bad", [2, 3], 3, SamplingParams(), [0.5]))


# -- the batching config ---------------------------------------------------------------------------


def role_config(**fields):
    from services.config import RoleConfig

    return RoleConfig.model_validate({"model": "m", **fields})


def test_batch_config_reaches_the_deployment():
    from services.app import RoleAppArgs
    from services.config import EnsembleConfig

    default = role_config()
    assert (default.max_batch_size, default.batch_wait_timeout_s) == (8, 0.002)
    assert default.deployment_options()["max_ongoing_requests"] == 16  # Serve's default 5 would cap batches
    config = EnsembleConfig.model_validate({"roles": {"base_large": {"model": "m", "max_batch_size": 4, "batch_wait_timeout_s": 0}}})
    args = RoleAppArgs.model_validate(config.app_args("base_large"))
    assert (args.max_batch_size, args.batch_wait_timeout_s) == (4, 0)
    assert config.roles["base_large"].deployment_options()["max_ongoing_requests"] == 8


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"batch_wait_timeout_s": -0.1}, "batch_wait_timeout_s"),
        ({"max_ongoing_requests": 4}, r"max_ongoing_requests \(4\) < max_batch_size \(8\)"),
    ],
)
def test_batch_config_errors_name_the_field(fields, message):
    from pydantic import ValidationError

    from services.app import RoleAppArgs

    with pytest.raises(ValidationError, match=message):
        role_config(**fields)
    if "max_ongoing_requests" not in fields:  # the builder's own args are checked alike
        with pytest.raises(ValidationError, match=message):
            RoleAppArgs.model_validate({"role": "base_small", "model": "m", **fields})


# -- transfer: bytes per block --------------------------------------------------------------------


def test_block_bytes_is_the_float32_payload_and_what_the_worker_returns(family_paths):
    roles, k = ["base_large", "base_small", "ft_small"], 4
    sizes = block_bytes(roles, "ft_small", k, V)
    assert sizes["total"] == sum(sizes[r] for r in roles)
    for role in roles:  # 4 (k+1) V bytes of float32 plus a little framing
        assert 0 < sizes[role] - 4 * (k + 1) * V < 600, (role, sizes)
    # Rows computed in a batch own their storage: they pickle to the nominal size, not the
    # batch's (a view would carry every session's logits along).
    worker = RoleWorker("base_small", family_paths["base_small"], V)
    rows = worker.score_many([ScoreRequest(f"t{i}", random_ids(9 + i, i), 9 + i - k) for i in range(3)])
    assert {len(pickle.dumps(r, protocol=5)) for r in rows} == {sizes["base_small"]}
    draft = worker.draft_many([DraftRequest(f"t{i}", random_ids(6, i), k, SamplingParams(), [0.5] * k) for i in range(2)])
    assert {len(pickle.dumps(d, protocol=5)) for d in draft} == {sizes["ft_small"]}


# -- through Serve: real batching in the replicas -------------------------------------------------


@pytest.mark.parametrize("k", [0, 3])
def test_concurrent_generations_batch_and_equal_in_process(served_ensemble, serve_engine, serve_roles, engine, k):
    """8 sessions generating at once through Serve: token for token the in-process engine's
    output, and the replicas ran batches of several sessions."""
    prompts = [engine.tokenizer(" ".join(f"w{(5 * i + j) % 60}" for j in range(1 + i % 4)))["input_ids"] for i in range(8)]
    kwargs = dict(sampling=SamplingParams(temperature=0.0, max_new_tokens=16), speculative=SpeculativeParams(k=k))
    replicas = {name: served_ensemble.config.roles[name].num_replicas or 1 for name in serve_roles}

    def batched_calls() -> dict[str, int]:
        """Per role, the calls its replicas ran in forward passes shared with other sessions."""
        return {n: sum(st["batched_calls"] for st in replica_stats(serve_roles[n], r).values()) for n, r in replicas.items()}

    before = batched_calls()

    async def generate_all():
        return await asyncio.gather(*(serve_engine.generate(p, **kwargs) for p in prompts))

    remote = asyncio.run(generate_all())
    for prompt, got in zip(prompts, remote):
        want = asyncio.run(engine.generate(prompt, **kwargs))
        assert got.token_ids == want.token_ids, prompt
    after = batched_calls()
    assert all(after[n] > before[n] for n in replicas), (before, after)
