"""A role sharded with DeepSpeed AutoTP over two Ray actors gives the unsharded results.

On the shared cluster, one extra application serves only base_large with ``tp_size: 2``;
generation pairs it with the tiny test family's other roles in-process. Why only one role:
every replica and rank is a process that imports torch and transformers, the bulk of the
start-up on 2 cores, and the unsharded roles through Serve are test_serve_backend's subject.

Why base_large is not the family's own: AutoTP sums partial products in another order, and
the family's deliberately peaked base_large (init_std 0.3) turns that float32 rounding into
log-prob differences up to 2e-5 on 120-token inputs, while the unsharded model differs from
itself by 7.6e-6 between a full pass and prefix-by-prefix passes: a 1e-5 bound would test
rounding luck. The same shape at init_std 0.1 (still informative, log-probs down to -7) stays
below 2.5e-6 sharded, 4x inside the bound; a sharding bug moves log-probs by O(1).

The last Ray test kills a rank, so it must stay last; the application is deleted after the
module. The config tests need no Ray.
"""

from __future__ import annotations

import asyncio
import glob
import time
import uuid

import pytest
import torch
from pydantic import ValidationError

from conftest import KV_CACHE_BYTES, WORDS
from eft_router.core.spec import SamplingParams, SpeculativeParams
from eft_router.engine import Engine, GenerationRequest
from eft_router.roles.interface import DraftItem, DraftParams, ScoreItem
from eft_router.tiny import TinyModel, build_tiny_family

SHARDED = "base_large"
SHARDED_MODEL = TinyModel(hidden=64, layers=2, heads=4, seed=1, init_std=0.1)  # hidden, heads, MLP: even
SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"


def tp_config(paths: dict[str, str]):
    from services.config import EnsembleConfig

    role = {
        "model": paths[SHARDED],
        "tp_size": 2,
        "ray_actor_options": {"num_cpus": 0.5},
        "kv_cache_bytes": KV_CACHE_BYTES,
        # Serve's own periodic check must not replace the replica while the last test probes it
        "health_check_period_s": 600,
    }
    return EnsembleConfig.model_validate({"roles": {SHARDED: role}, "drafter": SHARDED, "app_prefix": "eft-tp-"})


@pytest.fixture(scope="module")
def paths(family_paths, tmp_path_factory) -> dict[str, str]:
    """The family's base_small and ft_small with :data:`SHARDED_MODEL` as base_large."""
    sharded = build_tiny_family(tmp_path_factory.mktemp("tp"), WORDS, {SHARDED: SHARDED_MODEL})
    return {"base_small": family_paths["base_small"], "ft_small": family_paths["ft_small"], **sharded}


@pytest.fixture(scope="module")
def reference(paths) -> Engine:
    """The in-process engine over the same models, unsharded."""
    return Engine.local(paths, kv_cache_bytes=KV_CACHE_BYTES)


@pytest.fixture(scope="module")
def shm_before() -> set[str]:
    return set(glob.glob(SHM_BUFFERS))


@pytest.fixture(scope="module")
def serve_roles(ray_cluster, paths, shm_before):
    """base_large with tp_size 2 as its own application (``eft-tp-base_large``) on the shared
    cluster, deleted after the module."""
    from ray import serve

    from eft_router.roles.serve import connect_serve_roles
    from services.app import deploy_ensemble

    config = tp_config(paths)
    deploy_ensemble(config)
    try:
        yield connect_serve_roles([SHARDED], app_prefix=config.app_prefix)
    finally:
        serve.delete(f"{config.app_prefix}{SHARDED}")


def ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def test_sharded_logprobs_equal_unsharded(serve_roles, reference, shm_before):
    role, worker = serve_roles[SHARDED], reference.roles[SHARDED].worker
    long = ids(reference, " ".join(f"w{(7 * i) % 60}" for i in range(96)))
    sid = "tp-" + uuid.uuid4().hex
    try:
        for n, start in ((60, 40), (len(long), 61), (len(long), 3)):  # fresh, cache reuse, cache roll-back
            (remote,) = asyncio.run(role.score([ScoreItem(sid, long[:n], n - start + 1)]))
            (local,) = worker.score([ScoreItem("ref-" + sid, long[:n], n - start + 1)])
            torch.testing.assert_close(remote, local, atol=1e-5, rtol=0)
        params, uniforms = DraftParams(temperature=0.8, top_p=0.9), [0.1, 0.5, 0.93, 0.3]
        (remote,) = asyncio.run(role.draft([DraftItem(sid, long[:12], 4, params, uniforms)]))
        (local,) = worker.draft([DraftItem("ref-" + sid, long[:12], 4, params, uniforms)])
        assert remote.tokens == local.tokens
        torch.testing.assert_close(remote.logprobs, local.logprobs, atol=1e-5, rtol=0)
    finally:
        asyncio.run(role.release([sid]))
        worker.release(["ref-" + sid])
    stats = asyncio.run(role._call("stats"))  # rank 0's caches: the release reached the ranks
    assert stats["sessions"] == [] and stats["cached_tokens"] == 0
    assert set(glob.glob(SHM_BUFFERS)) <= shm_before  # gloo all-reduce: no shared-memory buffers


@pytest.mark.parametrize("k", [0, 4])
def test_greedy_generation_equals_in_process(serve_roles, reference, k):
    served = Engine({**reference.roles, **serve_roles}, reference.tokenizer)  # base_large through Serve
    kwargs = dict(sampling=SamplingParams(temperature=0.0, max_new_tokens=16), speculative=SpeculativeParams(k=k))
    for prompt in ("w1 w2 w3", "w30 w31 w30 w31 w5"):
        local = asyncio.run(reference.generate(GenerationRequest(ids(reference, prompt), **kwargs)))
        remote = asyncio.run(served.generate(GenerationRequest(ids(reference, prompt), **kwargs)))
        assert remote.token_ids == local.token_ids, prompt


def test_dead_rank_fails_fast_and_fails_health_check(serve_roles):
    """Last in the module: it leaves base_large's replica broken."""
    import ray

    from eft_router.roles.serve import RoleFailed

    named = ray.util.list_named_actors(all_namespaces=True)
    (victim,) = [a for a in named if a["name"].startswith(f"tp-{SHARDED}-") and a["name"].endswith("-rank1")]
    role = serve_roles[SHARDED]
    asyncio.run(role._call("check_health"))  # every rank answers its ping
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]))
    started = time.monotonic()
    with pytest.raises(RoleFailed, match=f"'{SHARDED}'.*rank 1 failed"):
        asyncio.run(role.score([ScoreItem("dead-rank", list(range(2, 20)), 2)]))
    assert time.monotonic() - started < 10  # not the 60 s collective timeout
    with pytest.raises(RoleFailed, match=f"'{SHARDED}'.*rank 1 failed"):
        asyncio.run(role._call("check_health"))
    with pytest.raises(RoleFailed, match=f"'{SHARDED}'.*rank 1 failed"):  # the router's health probe sees it too
        asyncio.run(role.probe(5.0))


# -- config -------------------------------------------------------------------------------------


def test_config_reserves_a_placement_group(family_paths):
    from ray.serve.schema import ServeDeploySchema

    config = tp_config(family_paths)
    config.roles[SHARDED].ray_actor_options.resources = {"node_a": 1}
    serve_config = config.to_serve_config()
    apps = {app.name: app for app in ServeDeploySchema.model_validate(serve_config).applications}
    (dep,) = apps[f"eft-tp-{SHARDED}"].deployments
    assert apps[f"eft-tp-{SHARDED}"].args["tp_size"] == 2
    assert dep.placement_group_bundles == [{"CPU": 0.5, "node_a": 1}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert dep.placement_group_strategy == "STRICT_PACK" and dep.health_check_period_s == 600
    config.roles[SHARDED].tp_size = 1
    (plain,) = config.to_serve_config()["applications"]
    assert "tp_size" not in plain["args"] and "placement_group_bundles" not in plain["deployments"][0]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"tp_size": 0}, "roles.base_large.tp_size"),
        ({"ray_actor_options": {"num_gpus": 0.5}}, "ray_actor_options.num_gpus 0.5"),
    ],
)
def test_config_errors_name_the_field(family_paths, change, field):
    from services.config import EnsembleConfig

    raw = tp_config(family_paths).model_dump(exclude_none=True)
    raw["roles"][SHARDED] |= change
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        EnsembleConfig.model_validate(raw)


# -- idle expiry: one clock for all ranks ------------------------------------------------------------


def test_ranks_on_their_own_clocks_would_diverge(paths):
    """The hazard, reproduced with two workers standing for two ranks: the same calls, each
    run a few milliseconds after the other's, as ranks do. At the idle boundary one rank
    drops the session and the other keeps it, so their next forward passes differ in shape
    (between real ranks, the collective in it would hang)."""
    from eft_router.roles.worker import RoleWorker

    now = [1000.0]
    ranks = [RoleWorker(SHARDED, paths[SHARDED], 62, kv_cache_bytes=KV_CACHE_BYTES, session_idle_s=30.0, clock=lambda: now[0]) for _ in range(2)]
    for w in ranks:
        w.score([ScoreItem("edge", [3, 4, 5], 1)])
    for w, at in zip(ranks, (1029.999, 1030.003)):  # the second call reaches rank 1 4 ms later
        now[0] = at
        w.score([ScoreItem("edge", [3, 4, 5, 6], 1)])
    assert [w.computed_tokens for w in ranks] == [3 + 1, 3 + 4]  # rank 1 recomputed the prefix, rank 0 did not


def test_the_replica_expires_idle_sessions_for_every_rank():
    from services.tensor_parallel import LastUse

    now = [0.0]
    idle = LastUse(30.0, clock=lambda: now[0])
    idle.touch(["a", "b"])
    now[0] = 20.0
    idle.touch(["b", "c"])
    now[0] = 30.5
    assert idle.expired() == ["a"]  # decided once, then released on every rank alike
    now[0] = 50.5
    assert idle.expired() == ["b", "c"] and idle.expired() == []
    idle.touch(["d"])
    idle.forget(["d"])
    now[0] = 1000.0
    assert idle.expired() == [] and LastUse(None).expired() == []
