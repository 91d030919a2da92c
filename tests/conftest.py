"""Shared fixtures: tiny random role families built once per test run, and one Ray cluster
with the tiny family served on it (started on first use)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import pytest
import torch

# Tiny models run fastest on one thread; more threads than cores slows them many times over.
torch.set_num_threads(1)

from eft_router.core.acceptance import TreeOutcome, accept_tree
from eft_router.core.sampling import sample_from
from eft_router.engine import Engine, Generation, GenerationRequest
from eft_router.roles.serve import MAX_MESSAGE_FLAG, SERVE_ENV
from eft_router.tiny import TinyModel, build_tiny_family

# Room for large replies in this process's Serve handles, as in every process the project
# starts (Serve reads it when it is imported). The rest of SERVE_ENV reaches the replicas
# by their deployment options; this process keeps Serve's default handle settings.
os.environ.setdefault(MAX_MESSAGE_FLAG, SERVE_ENV[MAX_MESSAGE_FLAG])

if TYPE_CHECKING:
    from ray.cluster_utils import Cluster

    from eft_router.roles.serve import ServeRole
    from services.config import EnsembleConfig

WORDS = [f"w{i}" for i in range(60)]
# Peaked (init_std 0.3) so that roles disagree visibly and speculative blocks see both
# acceptances and rejections; ft_small has padded embedding rows like many hub models.
ROLES = {
    "base_large": TinyModel(hidden=64, layers=2, seed=1, init_std=0.3),
    "base_small": TinyModel(hidden=32, layers=1, seed=2, init_std=0.3),
    "ft_small": TinyModel(hidden=32, layers=1, seed=3, init_std=0.3, pad_rows=4),
    "ft_safe": TinyModel(hidden=32, layers=1, seed=4, init_std=0.3),
    "ft_large": TinyModel(hidden=64, layers=2, seed=5, init_std=0.3),
}
TINY_VOCAB_WORDS = list("abcdef")  # 8 tokens with <unk> and <eos>
TINY_VOCAB_ROLES = {
    "base_large": TinyModel(hidden=16, layers=1, seed=11, init_std=0.3),
    "base_small": TinyModel(hidden=8, layers=1, heads=2, seed=12, init_std=0.3),
    "ft_small": TinyModel(hidden=8, layers=1, heads=2, seed=13, init_std=0.3),
}


KV_CACHE_BYTES = 1 << 24  # per role: a few dozen slots of the tiny models' 512 positions


class Recording:
    """A role that logs each call's start and end with its item count,
    ``(event, call, items)``, in one log that several roles may share."""

    def __init__(self, role: Any, log: list) -> None:
        self.role, self.log = role, log
        self.info, self.infos = role.info, role.infos

    async def _logged(self, call: str, items):
        self.log.append(("start", call, len(items)))
        try:
            return await getattr(self.role, call)(items)
        finally:
            self.log.append(("end", call, len(items)))

    async def score(self, items):
        return await self._logged("score", items)

    async def draft(self, items):
        return await self._logged("draft", items)

    async def release(self, session_ids):
        await self.role.release(session_ids)

    async def probe(self, timeout_s):
        await self.role.probe(timeout_s)


def first_positive_branch(target, draft_probs, tokens, parents, sampled, accept_uniforms, final_uniform) -> TreeOutcome:
    """A wrong multi-draft rule, as a drop-in for ``accept_tree``: take the first branch
    whose token has p > 0, untested, then a bonus token."""
    head = next((i for i, p in enumerate(parents) if p == -1 and float(target[0, tokens[i]]) > 0), None)
    if head is None:
        return accept_tree(target, draft_probs, tokens, parents, sampled, accept_uniforms, final_uniform)
    return TreeOutcome([tokens[head], int(sample_from(target[head + 1], final_uniform))], 1, [0, head + 1])


def free_port() -> int:
    """A TCP port that was free a moment ago (for a front whose config has no 'any free
    port' value: HTTP's 0 means off)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def generate(engine: Engine, prompt_ids, **fields) -> Generation:
    """One request (the fields of :class:`GenerationRequest`) run to its end."""
    return asyncio.run(engine.generate(GenerationRequest(prompt_ids, **fields)))


@pytest.fixture(scope="session")
def family_paths(tmp_path_factory) -> dict[str, str]:
    return build_tiny_family(tmp_path_factory.mktemp("family"), WORDS, ROLES)


ADAPTERS = {"ft_small": 21, "ft_safe": 22}  # LoRA roles of base_small (random init seeds)


@pytest.fixture(scope="session")
def adapter_paths(family_paths, tmp_path_factory) -> dict[str, dict[str, str]]:
    """LoRA adapters of the tiny family's base_small (``adapters``: role -> adapter
    directory) and the same adapters merged into full models (``merged``: role -> model)."""
    from eft_router.tiny import merged_lora, tiny_lora

    root = tmp_path_factory.mktemp("adapters")
    base = family_paths["base_small"]
    adapters = {role: tiny_lora(base, root / role, seed) for role, seed in ADAPTERS.items()}
    merged = {role: merged_lora(base, path, root / f"{role}-merged") for role, path in adapters.items()}
    return {"adapters": adapters, "merged": merged}


@pytest.fixture(scope="session")
def engine(family_paths) -> Engine:
    return Engine.local(family_paths, kv_cache_bytes=KV_CACHE_BYTES)


@pytest.fixture(scope="session")
def tiny_vocab_paths(tmp_path_factory) -> dict[str, str]:
    return build_tiny_family(tmp_path_factory.mktemp("tiny_vocab"), TINY_VOCAB_WORDS, TINY_VOCAB_ROLES)


@pytest.fixture(scope="session")
def tiny_vocab_engine(tiny_vocab_paths) -> Engine:
    return Engine.local(tiny_vocab_paths, kv_cache_bytes=KV_CACHE_BYTES)


# -- one Ray cluster with the tiny family served on it, for the whole run ---------------------

# Each worker node's own custom resource: a role is pinned to a node by
# ray_actor_options.resources {<resource>: 1} in the ensemble config.
NODE_RESOURCES = ("node_a", "node_b")
SERVED_ROLES = ("base_large", "base_small", "ft_small")
PINNED = {"base_large": "node_a", "ft_small": "node_b"}  # base_small: anywhere


@dataclass(frozen=True)
class ServedEnsemble:
    """What :func:`served_ensemble` deployed: the validated config (per-role deployment
    options, node pinning) and the served roles (Serve applications ``eft-<role>``)."""

    config: EnsembleConfig
    roles: tuple[str, ...]

    def replicas(self, role: str) -> int:
        """How many replicas ``role`` runs (the config's fixed ``num_replicas``)."""
        return self.config.roles[role].num_replicas or 1


def served_ensemble_config(paths: dict[str, str]) -> EnsembleConfig:
    """The shared ensemble: base_large pinned to node_a, base_small with two replicas
    (session affinity and release must hold across replicas), ft_small pinned to node_b."""
    from services.config import EnsembleConfig

    roles = {}
    for role in SERVED_ROLES:
        actor: dict[str, Any] = {"num_cpus": 0.5}
        if role in PINNED:
            actor["resources"] = {PINNED[role]: 1}
        roles[role] = {
            "model": paths[role],
            "num_replicas": 2 if role == "base_small" else 1,
            "ray_actor_options": actor,
            "kv_cache_bytes": KV_CACHE_BYTES,
        }
    return EnsembleConfig.model_validate({"roles": roles})


async def areplica_stats(role: ServeRole, replicas: int, wait_s: float = 10.0) -> dict[str, dict[str, Any]]:
    """``stats()`` of every replica of a role, by replica id, each asked by its id; waits
    until this process's handle knows ``replicas`` of them."""
    deadline = time.monotonic() + wait_s
    while True:
        seen = await role.replica_stats()
        if len(seen) == replicas or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert len(seen) == replicas, f"saw {len(seen)} of {replicas} replicas of {role.info.name}"
    return seen


def replica_stats(role: ServeRole, replicas: int) -> dict[str, dict[str, Any]]:
    """:func:`areplica_stats` from outside an event loop."""
    return asyncio.run(areplica_stats(role, replicas))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Cluster]:
    """A head and two worker nodes on this machine (``ray.cluster_utils.Cluster``), each
    worker with its own custom resource (:data:`NODE_RESOURCES`), this process connected as
    the driver, and Serve started with handles only (no HTTP proxy).

    One per run because starting costs about 15 s; a test that needs another deployment adds
    a Serve application under its own name and deletes it after. Logical CPUs are
    over-provisioned (4 per node on 2 cores): replicas of tiny models are mostly idle, and
    Serve reserves CPUs per replica. Ray's files go to a private temp dir (``RAY_TMPDIR``,
    inherited by every Ray process), so this cluster's address file and sessions never meet
    the clusters other runs start on the same machine. The dir name is short: Ray's unix
    socket paths must stay under 108 bytes.
    """
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from services.launch import disconnect_ray

    tmp = tempfile.mkdtemp(prefix="eft-ray-")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=4, include_dashboard=False)
        for resource in NODE_RESOURCES:
            cluster.add_node(num_cpus=4, resources={resource: 100})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        serve.start(proxy_location="Disabled")
        yield cluster
    finally:
        if ray.is_initialized():
            serve.shutdown()
            disconnect_ray()
        cluster.shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def served_ensemble(ray_cluster: Cluster, family_paths: dict[str, str]) -> ServedEnsemble:
    """:func:`served_ensemble_config` deployed on :func:`ray_cluster` once per run (20-50 s
    on 2 cores). Tests must leave it as they found it: release their sessions, and deploy
    other configurations as applications of their own."""
    from services.app import deploy_ensemble

    config = served_ensemble_config(family_paths)
    deploy_ensemble(config)
    return ServedEnsemble(config, SERVED_ROLES)


@pytest.fixture(scope="session")
def serve_roles(served_ensemble: ServedEnsemble) -> dict[str, ServeRole]:
    """The served roles behind the engine's role interface (Serve handles)."""
    from eft_router.roles.serve import connect_serve_roles

    return connect_serve_roles(list(served_ensemble.roles))


@pytest.fixture(scope="session")
def serve_engine(serve_roles: dict[str, ServeRole], engine: Engine) -> Engine:
    """The engine over the served roles, with the in-process engine's tokenizer."""
    return Engine(serve_roles, engine.tokenizer)
