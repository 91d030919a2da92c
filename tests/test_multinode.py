"""Roles placed across the nodes of a Ray cluster by their config, and a generation across
those nodes equal to the in-process engine.

The cluster is the run's shared one (``ray_cluster`` in conftest: a head and two worker
nodes on this machine, each worker with its own custom resource); ``served_ensemble`` pins
base_large to node_a and ft_small to node_b through ``ray_actor_options.resources`` and
leaves base_small's two replicas unpinned.
"""

from __future__ import annotations

import asyncio

import ray

from conftest import NODE_RESOURCES, ServedEnsemble, replica_stats
from eft_router.roles.serve import ServeRole
from eft_router.core.spec import SamplingParams, SpeculativeParams
from eft_router.engine import GenerationRequest



def node_of_resource() -> dict[str, str]:
    """Node id of each worker node's custom resource, as the cluster itself reports it."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    out = {}
    for resource in NODE_RESOURCES:
        holders = [n["NodeID"] for n in nodes if resource in n["Resources"]]
        assert len(holders) == 1, f"{resource}: held by {len(holders)} live nodes"
        out[resource] = holders[0]
    return out


def replicas_of(served_ensemble: ServedEnsemble, serve_roles: dict[str, ServeRole]) -> dict[str, dict[str, dict]]:
    return {r: replica_stats(serve_roles[r], served_ensemble.replicas(r)) for r in served_ensemble.roles}


def test_replicas_run_where_the_config_pins_them(ray_cluster, served_ensemble, serve_roles):
    """Each replica reports the node it runs on; a role whose config asks for a node's
    custom resource runs there and nowhere else."""
    nodes = node_of_resource()
    assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 1 + len(NODE_RESOURCES)
    assert len(set(nodes.values())) == len(NODE_RESOURCES)
    pinned = 0
    for role, replicas in replicas_of(served_ensemble, serve_roles).items():
        resources = served_ensemble.config.roles[role].ray_actor_options.resources or {}
        wanted = {nodes[r] for r in resources if r in nodes}
        for replica, st in replicas.items():
            if wanted:
                assert {st["node"]} == wanted, (role, replica, st["node"], nodes)
                pinned += 1
    assert pinned == 2  # base_large on node_a, ft_small on node_b: the check above did run


def test_generation_across_nodes_equals_in_process(served_ensemble, serve_roles, serve_engine, engine):
    """A speculative greedy generation (ft_small drafts on node_b, base_large verifies on
    node_a, base_small wherever Serve put it) gives the in-process engine's tokens, and the
    model work really ran on both worker nodes."""
    nodes = node_of_resource()
    before = replicas_of(served_ensemble, serve_roles)
    prompt = engine.tokenizer("w11 w12 w13 w14")["input_ids"]
    kwargs = dict(sampling=SamplingParams(temperature=0.0, max_new_tokens=20), speculative=SpeculativeParams(k=3))
    local = asyncio.run(engine.generate(GenerationRequest(prompt, **kwargs)))
    remote = asyncio.run(serve_engine.generate(GenerationRequest(prompt, **kwargs)))
    assert remote.token_ids == local.token_ids
    assert remote.stats.accepted_per_block == local.stats.accepted_per_block
    after = replicas_of(served_ensemble, serve_roles)
    worked = {
        after[role][replica]["node"]
        for role in after
        for replica in after[role]
        if after[role][replica]["computed_tokens"] > before[role].get(replica, {}).get("computed_tokens", 0)
    }
    assert set(nodes.values()) <= worked, (nodes, worked)
