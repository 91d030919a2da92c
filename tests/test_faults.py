"""A replica killed under load costs only the requests it touches.

An ensemble of its own on the run's shared cluster (applications ``eft-fault-<role>``,
deleted after the module; base_small with two replicas) behind a router on the Serve
backend. Twelve streams run; one base_small replica is killed. The streams whose sessions
it held fail with UNAVAILABLE naming base_small within 5 s (or, when Serve retries a call
the dead replica never started on the other one, go on there), the others finish; health turns
NOT_SERVING while the dead replica is still listed (a probe reaches every replica), and
SERVING again once it is not (its sessions then hash to the survivor, which recomputes
them) and after Serve has replaced it; new requests succeed; and no surviving replica of
any role keeps a session.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from conftest import KV_CACHE_BYTES, areplica_stats
from eft_router.api import eft_pb2 as pb
from eft_router.server.client import EFTClient
from eft_router.server.grpc_server import RouterThread

PREFIX = "eft-fault-"
ROLES = ("base_large", "base_small", "ft_small")
STREAMS = 12


@pytest.fixture(scope="module")
def fault_config(ray_cluster, family_paths):
    from ray import serve

    from services.app import deploy_ensemble
    from services.config import EnsembleConfig

    roles = {
        role: {
            "model": family_paths[role], "num_replicas": 2 if role == "base_small" else 1,
            "ray_actor_options": {"num_cpus": 0.25}, "kv_cache_bytes": KV_CACHE_BYTES,
        }
        for role in ROLES
    }
    config = EnsembleConfig.model_validate({
        "roles": roles, "app_prefix": PREFIX,
        "router": {"port": 0, "http_port": 0, "health_interval_s": 0.25, "health_timeout_s": 1.0, "role_timeout_s": 30},
    })
    deploy_ensemble(config)
    try:
        yield config
    finally:
        for role in ROLES:
            serve.delete(f"{PREFIX}{role}")


def health_seen(client: EFTClient, want: str, within_s: float) -> float:
    """Seconds until health reads ``want``; fails after ``within_s``."""
    started = time.monotonic()
    while client.health() != want:
        assert time.monotonic() - started < within_s, f"health never became {want} within {within_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def run_and_kill(router: RouterThread, client: EFTClient, role: str):
    """Twelve streams under way, then one replica of ``role`` killed; returns each stream's
    outcome ``(status, tokens or details, when)``, the health seen from just before the kill
    on (every 20 ms), the kill's time and the killed replica's id."""
    import ray

    request = pb.GenerateRequest(prompt=pb.Prompt(text="w1 w2"), sampling=pb.SamplingParams(max_tokens=150, ignore_eos=True, temperature=0.0))
    outcomes: list = [None] * STREAMS
    under_way = threading.Barrier(STREAMS + 1, timeout=120)

    def stream(i: int) -> None:
        try:
            chunks = client.stub.GenerateStream(request, timeout=120)
            first = next(chunks)
            under_way.wait()
            outcomes[i] = ("OK", len(first.token_ids) + sum(len(c.token_ids) for c in chunks), time.monotonic())
        except grpc.RpcError as err:
            outcomes[i] = (err.code().name, err.details(), time.monotonic())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    under_way.wait()
    served = router.router.engine.roles[role].role
    replica = served.replicas()[0]
    (victim,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{PREFIX}{role}" in a["name"] and replica in a["name"]]
    statuses: list[tuple[float, str]] = []
    watching = threading.Event()

    def watch() -> None:
        with EFTClient(f"localhost:{router.port}") as prober:
            while not watching.is_set():
                statuses.append((time.monotonic(), prober.health(timeout=5)))
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
    for t in threads:
        t.join(180)
    deadline = time.monotonic() + 90
    while not (len(served.replicas()) == fault_replicas(role) and replica not in served.replicas()):
        assert time.monotonic() < deadline, f"Serve did not replace the {role} replica within 90 s"
        time.sleep(0.2)
    health_seen(client, "SERVING", within_s=15)  # every replica answers again
    watching.set()
    watcher.join()
    return outcomes, statuses, killed_at


def fault_replicas(role: str) -> int:
    return 2 if role == "base_small" else 1


def check_after(router: RouterThread, client: EFTClient, config) -> None:
    """New requests succeed within 60 s, and no replica of any role keeps a session (after
    the last one's release)."""

    deadline = time.monotonic() + 60
    while True:
        try:
            assert len(client.generate("w3 w4", max_tokens=5, temperature=0.0).token_ids) == 5
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, err.details()
            time.sleep(0.5)

    async def leftovers() -> dict[str, list[str]]:
        out = {}
        for name, timed in router.router.engine.roles.items():
            stats = await areplica_stats(timed.role, fault_replicas(name))
            out[name] = [s for st in stats.values() for s in st["sessions"]]
        return out

    # a request's sessions are released in the step after its last chunk went out, so the
    # generate above may return a moment before its own release reaches the replicas
    deadline = time.monotonic() + 10
    while (left := router.run(leftovers())) != {role: [] for role in ROLES} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == {role: [] for role in ROLES}


@pytest.fixture
def fault_router(fault_config):
    from services.launch import router_factory

    with RouterThread(router_factory(fault_config, "serve")) as router, EFTClient(f"localhost:{router.port}", timeout=120) as client:
        assert client.health() == "SERVING"
        yield router, client


def test_a_role_without_a_replica_is_not_serving_until_it_is_replaced(fault_router, fault_config):
    """ft_small's only replica killed: every stream needs it, so each one fails with
    UNAVAILABLE naming it within 5 s, or (Serve retrying a call the replica never started)
    finishes once the replacement answers; health is NOT_SERVING until it does."""
    router, client = fault_router
    outcomes, statuses, killed_at = run_and_kill(router, client, "ft_small")
    for code, what, at in outcomes:
        assert code == "OK" and what == 150 or code == "UNAVAILABLE" and "'ft_small'" in what and at - killed_at < 5.0, (code, what)
    down = [at - killed_at for at, status in statuses if status == "NOT_SERVING"]
    assert down and down[0] < 5.0, statuses[:5]
    check_after(router, client, fault_config)


def test_a_killed_replica_fails_only_its_requests(fault_router, fault_config):
    """One of base_small's two replicas killed: the streams whose sessions it held fail with
    UNAVAILABLE naming base_small within 5 s (or go on on the other replica, when Serve
    retries the call there); the other replica's streams finish."""
    router, client = fault_router
    outcomes, statuses, killed_at = run_and_kill(router, client, "base_small")
    finished = [o for o in outcomes if o[0] == "OK"]
    assert finished and all(n == 150 for _, n, _ in finished), outcomes
    for code, what, at in (o for o in outcomes if o[0] != "OK"):
        assert code == "UNAVAILABLE" and "'base_small'" in what and at - killed_at < 5.0, (code, what)
    check_after(router, client, fault_config)
