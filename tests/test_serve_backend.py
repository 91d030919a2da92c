"""The Ray Serve backend gives exactly the in-process backend's results.

The ensemble runs on the run's shared Ray cluster (``served_ensemble`` in conftest: a head
and two worker nodes, base_large and ft_small pinned to different nodes, base_small with
two replicas: session affinity and release must hold across them). The config tests need
no Ray.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
import yaml
from pydantic import ValidationError

from conftest import SERVED_ROLES as SERVED
from conftest import KV_CACHE_BYTES, replica_stats, served_ensemble_config
from eft_router.core.spec import SamplingParams, SpeculativeParams
from eft_router.engine import GenerationRequest, ScoreRequest
from eft_router.roles.interface import DraftItem, DraftParams, ScoreItem
from eft_router.tiny import TinyModel, build_tiny_family

PROMPTS = ["w1 w2 w3", "w7", "w30 w31 w30 w31 w5"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


def ids(engine, text):
    return engine.tokenizer(text)["input_ids"]


# -- Serve backend == in-process backend -------------------------------------------------------


@pytest.mark.parametrize("speculative", [SpeculativeParams(), SpeculativeParams(k=4), SpeculativeParams(k=4, overlap=True)], ids=["plain", "k4", "k4-overlap"])
def test_greedy_generation_equals_in_process(serve_engine, engine, speculative):
    """Overlapped drafting runs the drafter's and the verifiers' deployments at once here."""
    for prompt in PROMPTS:
        kwargs = dict(sampling=GREEDY, speculative=speculative)
        local = asyncio.run(engine.generate(GenerationRequest(ids(engine, prompt), **kwargs)))
        remote = asyncio.run(serve_engine.generate(GenerationRequest(ids(engine, prompt), **kwargs)))
        assert remote.token_ids == local.token_ids, prompt
        assert remote.text == local.text and remote.finish_reason == local.finish_reason
        assert remote.stats.accepted_per_block == local.stats.accepted_per_block


def test_score_equals_in_process(serve_engine, engine):
    prompt, cont = ids(engine, "w1 w2 w3 w4"), ids(engine, "w5 w6 w7 w8 w9")
    local = asyncio.run(engine.score(ScoreRequest(prompt, cont)))
    remote = asyncio.run(serve_engine.score(ScoreRequest(prompt, cont)))
    assert remote.token_ids == local.token_ids
    # float32: a replica may start the session from a live session's cached prefix, which
    # changes the last bits of values around 10; hence rel as well as abs 1e-6
    assert remote.logprobs == pytest.approx(local.logprobs, rel=1e-6, abs=1e-6)
    assert set(remote.role_logprobs) == set(local.role_logprobs)
    for role, lp in local.role_logprobs.items():
        assert remote.role_logprobs[role] == pytest.approx(lp, rel=1e-6, abs=1e-6), role


def replica_totals(serve_roles) -> dict[str, dict[str, dict]]:
    return {name: replica_stats(role, 2 if name == "base_small" else 1) for name, role in serve_roles.items()}


def test_session_affinity_and_release_on_every_replica(serve_roles, serve_engine, engine):
    """Every call of a session goes to one replica (so its cache is reused: each step runs
    only the new tokens), and the release at the end of a generation reaches it: afterwards
    no replica of any role holds either session. (Only these two: the cluster is shared
    with other test modules.)"""
    sid = "kept-" + uuid.uuid4().hex
    prompt = ids(engine, "w3 w4 w5 w6 w7 w8")
    before = replica_totals(serve_roles)
    gen = asyncio.run(
        serve_engine.generate(GenerationRequest(prompt, sampling=GREEDY, speculative=SpeculativeParams(k=3), session_id=sid, keep_session=True))
    )
    during = replica_totals(serve_roles)
    for name in SERVED:
        holders = [r for r, st in during[name].items() if sid in st["sessions"]]
        assert len(holders) == 1, (name, during[name])
        computed = sum(st["computed_tokens"] for st in during[name].values())
        computed -= sum(st["computed_tokens"] for st in before[name].values())
        # cache reuse: about one pass over prompt + output (+ rejected drafts), not one per step
        assert computed <= len(prompt) + len(gen.token_ids) + 3 * gen.stats.blocks, (name, computed)
    asyncio.run(serve_engine.release(sid))
    ended = "ended-" + uuid.uuid4().hex
    asyncio.run(serve_engine.generate(GenerationRequest(prompt, sampling=GREEDY, speculative=SpeculativeParams(k=2), session_id=ended)))
    for name, replicas in replica_totals(serve_roles).items():
        for replica, st in replicas.items():
            assert not {sid, ended} & set(st["sessions"]), (name, replica, st)


def test_replica_without_the_session_recomputes(serve_roles, engine):
    """Scoring a long prefix under a session id no replica has seen, then extending it (the
    next call may land on the other replica), equals the in-process rows."""
    long = ids(engine, " ".join(f"w{(7 * i) % 60}" for i in range(48)))
    for name in ("base_large", "base_small"):
        role, worker = serve_roles[name], engine.roles[name].worker
        sid = "fresh-" + uuid.uuid4().hex
        try:
            for n, start in ((40, 30), (len(long), 41), (len(long), 5)):
                (remote,) = asyncio.run(role.score([ScoreItem(sid, long[:n], n - start + 1)]))
                (local,) = worker.score([ScoreItem("ref-" + sid, long[:n], n - start + 1)])
                assert remote.dtype == torch.float32 and remote.device.type == "cpu"
                assert remote.shape == (n - start + 1, role.info.vocab_size)
                torch.testing.assert_close(remote, local, atol=1e-6, rtol=0)
        finally:
            asyncio.run(role.release([sid]))
            worker.release(["ref-" + sid])


def test_a_call_splits_by_the_replica_that_owns_each_session(serve_roles, engine):
    """base_small has two replicas: one step's call carrying many sessions becomes one call
    per replica, each session on its owner, and every row equals the in-process one."""
    from eft_router.roles.serve import owner

    role, worker = serve_roles["base_small"], engine.roles["base_small"].worker
    replicas = role.replicas()
    assert len(replicas) == 2
    items = [ScoreItem(f"split-{i}-" + uuid.uuid4().hex, ids(engine, f"w{i} w{i + 1} w{i + 2}"), 2) for i in range(12)]
    owners = {owner(it.session_id, replicas) for it in items}
    assert owners == set(replicas)  # both replicas own some of them
    try:
        for got, want in zip(asyncio.run(role.score(items)), worker.score([ScoreItem("ref-" + it.session_id, it.token_ids, 2) for it in items])):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        stats = replica_stats(role, 2)
        for it in items:
            holders = [r for r, st in stats.items() if it.session_id in st["sessions"]]
            assert holders == [owner(it.session_id, replicas)]
    finally:
        asyncio.run(role.release([it.session_id for it in items]))
        worker.release(["ref-" + it.session_id for it in items])


def test_draft_equals_in_process(serve_roles, engine):
    prompt = ids(engine, "w9 w8 w7")
    params = DraftParams(temperature=0.8, top_p=0.9)
    uniforms = [0.1, 0.5, 0.93, 0.3]
    remote_sid = "d-" + uuid.uuid4().hex
    (remote,) = asyncio.run(serve_roles["ft_small"].draft([DraftItem(remote_sid, prompt, 4, params, uniforms)]))
    asyncio.run(serve_roles["ft_small"].release([remote_sid]))  # leave the shared ensemble as found
    (local,) = engine.roles["ft_small"].worker.draft([DraftItem("d-local", prompt, 4, params, uniforms)])
    engine.roles["ft_small"].worker.release(["d-local"])
    asyncio.run(serve_roles["ft_small"].release(["unused"]))  # unknown sessions are ignored
    assert remote.tokens == local.tokens
    torch.testing.assert_close(remote.logprobs, local.logprobs, atol=1e-6, rtol=0)
    # stop ids reach the replica: the draft ends after the first stop token
    stop = local.tokens[1]
    sid = "d-" + uuid.uuid4().hex
    stopping = DraftParams(temperature=0.8, top_p=0.9, stop_ids=frozenset({stop}))
    (stopped,) = asyncio.run(serve_roles["ft_small"].draft([DraftItem(sid, prompt, 4, stopping, uniforms)]))
    asyncio.run(serve_roles["ft_small"].release([sid]))
    assert stopped.tokens == local.tokens[: local.tokens.index(stop) + 1]


def test_a_reply_over_4_mib_arrives(ray_cluster, tmp_path):
    """A call's reply is 4 (k + 1) V bytes per request: at a hub model's vocabulary one
    step passes Serve's default cap of 4 MiB per message (16 requests, k = 4, V = 32,000:
    10 MB), which ended the call with RESOURCE_EXHAUSTED before every process the project
    starts raised it (``roles.serve.SERVE_ENV``). Here 200 rows of an 8,002-token vocabulary
    (6.4 MB) in one reply, equal to the in-process worker's."""
    from ray import serve

    from eft_router.roles.serve import connect_serve_roles
    from eft_router.roles.worker import RoleWorker
    from services.app import deploy_ensemble
    from services.config import EnsembleConfig

    paths = build_tiny_family(tmp_path, [f"v{i}" for i in range(8000)], {"base_small": TinyModel(seed=3)})
    role_config = {"model": paths["base_small"], "ray_actor_options": {"num_cpus": 0.25}, "kv_cache_bytes": KV_CACHE_BYTES}
    config = EnsembleConfig.model_validate({"roles": {"base_small": role_config}, "drafter": "base_small", "app_prefix": "wide-"})
    deploy_ensemble(config)
    try:
        role = connect_serve_roles(["base_small"], app_prefix="wide-")["base_small"]
        token_ids = [2 + (7 * i) % 8000 for i in range(200)]
        (remote,) = asyncio.run(role.score([ScoreItem("wide", token_ids, len(token_ids))]))
        asyncio.run(role.release(["wide"]))
    finally:
        serve.delete("wide-base_small")
    assert remote.shape == (200, 8002) and remote.numel() * 4 > 4 * 2**20
    (local,) = RoleWorker("base_small", paths["base_small"], 8002, kv_cache_bytes=KV_CACHE_BYTES).score([ScoreItem("wide", token_ids, len(token_ids))])
    torch.testing.assert_close(remote, local, atol=1e-6, rtol=0)


def test_errors_name_the_role(serve_roles, engine):
    from eft_router.roles.serve import RoleFailed, RoleUnavailable, ServeRole, connect_serve_roles

    with pytest.raises(RoleUnavailable, match="'ft_absent'"):
        connect_serve_roles(["ft_absent"])
    with pytest.raises(RoleFailed, match="'base_small'.*rows") as err:  # the replica's own check
        asyncio.run(serve_roles["base_small"].score([ScoreItem("bad", [1, 2], 7)]))
    assert isinstance(err.value.cause, ValueError) and err.value.role == "base_small"
    role = serve_roles["base_large"]
    hasty = ServeRole(role.info, role.handle, timeout_s=1e-4)
    with pytest.raises(RoleUnavailable, match="'base_large'.*TimeoutError"):
        asyncio.run(hasty.score([ScoreItem("hasty", list(range(2, 60)), 2)]))
    asyncio.run(role.release(["hasty"]))  # same replica (affinity), after the abandoned call


def test_async_connect(serve_roles):
    from eft_router.roles.serve import aconnect_serve_roles

    roles = asyncio.run(aconnect_serve_roles(list(SERVED)))
    assert {r: x.info for r, x in roles.items()} == {r: x.info for r, x in serve_roles.items()}


def test_ctrl_c_while_connecting_is_not_a_role_failure(serve_roles, monkeypatch):
    """Connecting maps a replica's or Ray's errors to role errors, but a KeyboardInterrupt
    (Ctrl-C while waiting for a role) must reach the caller as itself."""
    from ray.serve.handle import DeploymentHandle

    from eft_router.roles.interface import RoleError
    from eft_router.roles.serve import connect_serve_roles

    method = DeploymentHandle.__getattr__  # handle.infos, handle.vocab, ...

    def interrupted(self, name):
        if name == "infos":
            raise KeyboardInterrupt
        return method(self, name)

    monkeypatch.setattr(DeploymentHandle, "__getattr__", interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        connect_serve_roles(["ft_small"])

    def failing(self, name):
        if name == "infos":
            raise RuntimeError("replica down")
        return method(self, name)

    monkeypatch.setattr(DeploymentHandle, "__getattr__", failing, raising=False)
    with pytest.raises(RoleError, match="'ft_small'.*replica down"):
        connect_serve_roles(["ft_small"])


def test_vocabulary_check_names_roles():
    from eft_router.roles.interface import RoleInfo
    from eft_router.roles.serve import _assemble, _check_roles
    from eft_router.core.vocab import VocabularyMismatch

    infos = {r: RoleInfo(r, "m", 3, 16, 8, 16) for r in ("base_large", "ft_small")}
    vocabs = {"base_large": {"a": 0, "b": 1, "c": 2}, "ft_small": {"a": 0, "c": 1, "b": 2}}
    _check_roles(infos, {"base_large": "x", "ft_small": "x"}, vocabs.__getitem__)
    with pytest.raises(VocabularyMismatch, match="'ft_small'.*'base_large'.*id 1: 'b' vs 'c'"):
        _check_roles(infos, {"base_large": "x", "ft_small": "y"}, vocabs.__getitem__)
    with pytest.raises(VocabularyMismatch, match="size.*'ft_small': 4"):
        _check_roles({**infos, "ft_small": RoleInfo("ft_small", "m", 4, 16, 8, 16)}, {}, vocabs.__getitem__)
    apps = {"ft_small": "eft-ft_small"}
    with pytest.raises(VocabularyMismatch, match="'ft_small'.*'eft-ft_small' serves role\\(s\\) base_large, not it"):
        _assemble(["ft_small"], apps, {"eft-ft_small": "ft_small"}, {"eft-ft_small": None}, {"eft-ft_small": {"base_large": infos["base_large"]}}, {}, vocabs.__getitem__, None)


# -- the ensemble config ------------------------------------------------------------------------


def test_config_to_serve_config_parses(family_paths, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from services.config import EnsembleConfig

    raw = served_ensemble_config(family_paths).model_dump(exclude_none=True)
    raw["roles"]["base_small"] = {"model": family_paths["base_small"], "dtype": "bfloat16",
                                  "autoscaling_config": {"min_replicas": 1, "max_replicas": 3},
                                  "max_ongoing_requests": 8, "session_idle_s": 300}
    raw["vocab_size"] = 62
    raw["defaults"] = {"eft": {"beta": 1.5}, "sampling": {"temperature": 0.7}, "speculative": {"k": 4}}
    path = tmp_path / "ensemble.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = EnsembleConfig.from_yaml(path)
    serve_config = config.to_serve_config()
    schema = ServeDeploySchema.model_validate(serve_config)
    apps = {app.name: app for app in schema.applications}
    assert set(apps) == {f"eft-{r}" for r in SERVED}
    small = apps["eft-base_small"]
    assert small.import_path == "services.app:role_app" and small.route_prefix is None
    assert small.args == {"role": "base_small", "model": family_paths["base_small"], "dtype": "bfloat16",
                          "kv_cache_bytes": 1 << 30, "vocab_size": 62, "session_idle_s": 300}
    (dep,) = small.deployments
    assert dep.name == "RoleDeployment" and dep.max_ongoing_requests == 8
    assert dep.autoscaling_config["max_replicas"] == 3
    (large,) = apps["eft-base_large"].deployments
    assert large.num_replicas == 1 and large.ray_actor_options.num_cpus == 0.5
    assert large.ray_actor_options.resources == {"node_a": 1}  # node pinning reaches Serve

    from services.app import role_app  # the builder accepts the args it is given

    assert role_app(small.args) is not None


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: c["roles"]["ft_small"].update(tp_size=0), "roles.ft_small.tp_size"),
        (lambda c: c.update(replicas=2), "replicas"),
        (lambda c: c["roles"]["base_large"].update(autoscaling_config={"max_replicas": 2}), "num_replicas and autoscaling_config"),
        (lambda c: c.update(drafter="ft_other"), "drafter"),
        (lambda c: c["roles"]["base_small"].update(dtype="float64"), "roles.base_small.dtype"),
        (lambda c: c["roles"]["base_small"].update(num_replicas=0), "roles.base_small.num_replicas"),
        (lambda c: c["roles"]["base_small"].update(kv_cache_bytes=0), "roles.base_small.kv_cache_bytes"),
        (lambda c: c["roles"]["base_small"].update(max_seq_len=0), "roles.base_small.max_seq_len"),
        (lambda c: c["roles"]["base_small"].update(max_cached_tokens=100), "roles.base_small.max_cached_tokens"),  # gone: refused
        (lambda c: c["roles"]["base_small"].update(session_idle_s=0), "roles.base_small.session_idle_s"),
        (lambda c: c["roles"]["base_small"]["ray_actor_options"].update(num_cpu=1), "ray_actor_options.num_cpu"),
        (lambda c: c["roles"].update(helper={"model": "x"}), "role 'helper'"),
        (lambda c: c["roles"]["base_large"].update(num_replicas=None, autoscaling_config={"min_replicas": 3, "max_replicas": 2}), "roles.base_large.autoscaling_config"),
        (lambda c: c["roles"]["base_large"].update(num_replicas=None, autoscaling_config={"min_replica": 1}), "min_replica"),
        (lambda c: c.update(defaults={"sampling": {"top_p": 0}}), "defaults.sampling.top_p"),
        (lambda c: c.update(defaults={"eft": {"deltas": {"ft_safe": 1.0}}}), "defaults.eft.deltas"),
    ],
)
def test_config_errors_name_the_field(family_paths, change, field):
    from services.config import EnsembleConfig

    raw = served_ensemble_config(family_paths).model_dump(exclude_none=True)
    change(raw)
    with pytest.raises(ValidationError) as err:
        EnsembleConfig.model_validate(raw)
    assert field in str(err.value), str(err.value)
