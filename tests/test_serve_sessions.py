"""Session caches on Serve replicas are freed when a client cancels a generation, and after
an idle timeout when a client vanishes without releasing.

Cancellation and failure run on the run's shared ensemble (``served_ensemble``: base_small
has two replicas, so "freed" must hold on the one that held the session). The idle timeout
needs a short ``session_idle_s``, which no other test should live with: it gets an
application of its own (``eft-ft_idle``), deleted after this module; it also serves as a
role whose calls time out. It serves the 8-token family's ft_small: a small model, and no
session of the big family's tests can land in its caches.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import Iterator

import pytest

from conftest import ServedEnsemble, areplica_stats
from eft_router.engine import Engine, GenerationRequest
from eft_router.roles.interface import ScoreItem
from eft_router.roles.serve import RoleUnavailable, ServeRole
from eft_router.core.spec import EFTSpec, SamplingParams, SpeculativeParams

IDLE_S = 1.0
# Long enough to be mid-way whenever the test cancels (it cancels after the first block).
LONG = SamplingParams(temperature=0.0, max_new_tokens=300, ignore_eos=True)


async def holders(served: ServedEnsemble, roles: dict[str, ServeRole], session_id: str) -> dict[str, list[str]]:
    """For each role, the replicas whose caches hold ``session_id``."""
    out = {}
    for role in served.roles:
        stats = await areplica_stats(roles[role], served.replicas(role))
        out[role] = [replica for replica, st in stats.items() if session_id in st["sessions"]]
    return out


async def start_and_cancel(
    served: ServedEnsemble, roles: dict[str, ServeRole], engine: Engine, session_id: str, cancels: int
) -> None:
    """Stream a long generation in a task, check that every role holds its session once the
    first block is out, then cancel the task ``cancels`` times: the later ones reach it
    while it leaves (the engine releases it in the step after the first cancel)."""
    prompt = engine.tokenizer("w21 w22 w23")["input_ids"]
    first_block = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.stream(GenerationRequest(prompt, sampling=LONG, speculative=SpeculativeParams(k=3), session_id=session_id)):
            first_block.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_block.wait(), 30)
    during = await holders(served, roles, session_id)
    assert all(len(h) == 1 for h in during.values()), during
    assert not task.done(), "the generation ended before the test could cancel it"
    task.cancel()
    for _ in range(cancels - 1):
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def wait_freed(served: ServedEnsemble, roles: dict[str, ServeRole], session_id: str, within_s: float) -> None:
    """Poll every replica until none holds ``session_id``, failing after ``within_s``: a
    generation cancelled again while releasing goes on releasing in the background."""
    deadline = time.monotonic() + within_s
    while any((left := await holders(served, roles, session_id)).values()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{within_s} s after the generation ended, replicas still hold the session: {left}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("cancels", [1, 2])
def test_cancelled_generation_frees_the_session_on_every_replica(served_ensemble, serve_roles, serve_engine, cancels):
    """A client cancelling its generation mid-way (a gRPC client disconnecting, a timeout)
    leaves no cache behind on any role's replicas; also when it is cancelled again while
    releasing (a timeout around the cancelled call, a server shutting down)."""
    sid = f"cancel{cancels}-" + uuid.uuid4().hex

    async def scenario() -> None:
        await start_and_cancel(served_ensemble, serve_roles, serve_engine, sid, cancels)
        await wait_freed(served_ensemble, serve_roles, sid, within_s=1.0)

    asyncio.run(scenario())


# -- idle timeout ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idle_role(ray_cluster, tiny_vocab_paths) -> Iterator[ServeRole]:
    """Role ``ft_idle`` (the 8-token family's ft_small) with ``session_idle_s`` = IDLE_S,
    deployed from the ensemble config like any role."""
    from ray import serve

    from eft_router.roles.serve import app_name, connect_serve_roles
    from services.app import deploy_ensemble
    from services.config import EnsembleConfig

    config = EnsembleConfig.model_validate(
        {
            "roles": {
                "ft_idle": {
                    "model": tiny_vocab_paths["ft_small"],
                    "session_idle_s": IDLE_S,
                    "ray_actor_options": {"num_cpus": 0.5},
                }
            },
            "drafter": "ft_idle",
        }
    )
    assert config.app_args("ft_idle")["session_idle_s"] == IDLE_S
    deploy_ensemble(config)
    try:
        yield connect_serve_roles(["ft_idle"])["ft_idle"]
    finally:
        serve.delete(app_name("ft_idle"))


def test_idle_session_is_freed_without_further_calls(idle_role):
    """A session left unreleased goes after ``session_idle_s`` although no call reaches the
    replica's caches afterwards (``sessions`` only reads them): the replica's own sweep
    frees it, at most 1.5 x the timeout after its last use, and not before the timeout."""
    sid = "idle-" + uuid.uuid4().hex
    prompt = [2, 3, 4, 5]  # ids of the 8-token vocabulary

    async def scenario() -> tuple[float, float, float]:
        sent = time.monotonic()
        await idle_role.score([ScoreItem(sid, prompt, 1)])
        returned = time.monotonic()
        assert sid in await idle_role._call("sessions")
        limit = 1.5 * IDLE_S + 3.0  # the sweep's bound plus slack for a loaded machine
        while sid in await idle_role._call("sessions"):
            assert time.monotonic() - returned < limit, f"session still cached {limit} s after its last use"
            await asyncio.sleep(0.05)
        return sent, returned, time.monotonic()

    sent, _, gone = asyncio.run(scenario())
    assert gone - sent > IDLE_S, f"freed {gone - sent:.2f} s after its last use, before session_idle_s={IDLE_S}"



def test_a_role_timing_out_leaves_no_session_on_the_others(served_ensemble, serve_roles, serve_engine, idle_role):
    """A block in which one role's call times out (``timeout_s``, the router's role timeout)
    while the other roles' calls of that block are still queued or running: the session is
    still freed on every role. The engine waits for every call of a step before the failed
    request leaves; a release sent at once would overtake them on the replicas and be
    undone by them."""
    # ft_idle with an immediate timeout; told the big family's vocabulary size, which the
    # engine requires of every role (the call never gets far enough to matter)
    hasty = ServeRole(replace(idle_role.info, vocab_size=serve_engine.vocab_size), idle_role.handle, timeout_s=1e-6)
    engine = Engine({**serve_roles, "ft_idle": hasty}, serve_engine.tokenizer)
    prompt = engine.tokenizer("w50 w51 w52 w53 w54")["input_ids"]
    eft = EFTSpec(deltas={"ft_small": 1.0, "ft_idle": 0.5})  # every role scores each block
    for attempt in range(3):
        sid = f"timeout{attempt}-" + uuid.uuid4().hex

        async def scenario() -> None:
            with pytest.raises(RoleUnavailable, match="'ft_idle'.*TimeoutError"):
                await engine.generate(GenerationRequest(prompt, eft=eft, sampling=LONG, speculative=SpeculativeParams(k=0), session_id=sid))
            await wait_freed(served_ensemble, serve_roles, sid, within_s=1.0)

        asyncio.run(scenario())
