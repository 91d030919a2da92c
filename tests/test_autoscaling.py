"""A role's ``autoscaling_config`` in the ensemble config is what Serve scales it by: under
concurrent load the role scales up (to its ``max_replicas``, no further), and back down to
its ``min_replicas`` once the load stops.

The role gets an application of its own (``eft-ft_scaled``, ft_small's model) on the run's
shared cluster, deleted after the module: the shared ensemble keeps its fixed replicas. The
autoscaling periods are cut to about a second (Serve's defaults wait 30 s to scale up and
10 minutes to scale down); the whole test takes about 20 s.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Callable, Iterator

import pytest

from eft_router.roles.interface import ScoreItem
from eft_router.roles.serve import ServeRole, app_name

ROLE = "ft_scaled"
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0,
    "downscale_delay_s": 1,
    "metrics_interval_s": 0.2,
    "look_back_period_s": 1,
}
CONCURRENCY = 8  # calls always in flight: Serve wants 8 replicas at target 1, gets max 2
UP_WITHIN_S = 45.0  # starting a replica (a process importing torch) on a busy 2-core machine
DOWN_WITHIN_S = 30.0


def replica_states() -> dict[str, int]:
    """Serve's count of the role's replicas by state (RUNNING, STARTING, STOPPING...)."""
    from ray import serve

    app = serve.status().applications[app_name(ROLE)]
    return {state: n for state, n in app.deployments["RoleDeployment"].replica_states.items() if n}


@pytest.fixture(scope="module")
def scaled_role(ray_cluster, family_paths) -> Iterator[ServeRole]:
    """Role ``ft_scaled`` deployed from an ensemble config with :data:`AUTOSCALING`."""
    from ray import serve

    from eft_router.roles.serve import connect_serve_roles
    from services.app import deploy_ensemble
    from services.config import EnsembleConfig

    config = EnsembleConfig.model_validate(
        {
            "roles": {
                ROLE: {
                    "model": family_paths["ft_small"],
                    "autoscaling_config": AUTOSCALING,
                    "ray_actor_options": {"num_cpus": 0.5},
                }
            },
            "drafter": ROLE,
        }
    )
    assert config.roles[ROLE].deployment_options()["autoscaling_config"] == AUTOSCALING
    deploy_ensemble(config)
    try:
        yield connect_serve_roles([ROLE])[ROLE]
    finally:
        serve.delete(app_name(ROLE))


async def wait_for(
    condition: Callable[[dict[str, int]], bool], within_s: float, what: str, seen: list[dict[str, int]]
) -> None:
    """Poll :func:`replica_states` (off the event loop, which keeps the load going) until
    ``condition`` holds; every observation goes to ``seen``."""
    deadline = time.monotonic() + within_s
    while True:
        states = await asyncio.to_thread(replica_states)
        seen.append(states)
        if condition(states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within_s} s; replica states seen: {seen[-5:]}")
        await asyncio.sleep(0.25)


def test_role_scales_up_under_load_and_back_down(scaled_role, engine):
    prompt = engine.tokenizer("w1 w2 w3 w4 w5 w6 w7 w8")["input_ids"]
    assert replica_states() == {"RUNNING": 1}
    seen: list[dict[str, int]] = []

    async def scenario() -> None:
        stop = asyncio.Event()

        async def load(i: int) -> None:
            session = f"load{i}-" + uuid.uuid4().hex
            while not stop.is_set():
                await scaled_role.score([ScoreItem(session, prompt, 1)])
            await scaled_role.release([session])

        loaders = [asyncio.create_task(load(i)) for i in range(CONCURRENCY)]
        try:
            await wait_for(lambda s: s.get("RUNNING", 0) >= 2, UP_WITHIN_S, "scale up under load", seen)
        finally:
            stop.set()
            await asyncio.gather(*loaders)
        await wait_for(lambda s: s == {"RUNNING": 1}, DOWN_WITHIN_S, "scale down after the load", seen)

    asyncio.run(scenario())
    most = max(sum(s.values()) - s.get("STOPPING", 0) for s in seen)
    assert most == AUTOSCALING["max_replicas"], seen
