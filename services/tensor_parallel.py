"""A role sharded over ``tp_size`` processes with DeepSpeed inference tensor parallelism.

:class:`TensorParallelWorker` is what a :class:`~services.role_deployment.RoleDeployment`
replica holds instead of a :class:`~eft_router.worker.RoleWorker` when ``tp_size > 1``: it
starts one Ray actor per rank in bundles 1..tp of the replica's placement group (bundle 0 is
the replica itself), and each rank builds a full ``RoleWorker`` around its shard of the model
(``deepspeed.init_inference`` with AutoTP). Every call goes to every rank, in one order,
because the ranks' forward passes meet in all-reduces; rank 0 answers.

All-reduce: plain ``torch.distributed`` (gloo on CPU, nccl on GPU), not DeepSpeed's
shared-memory op. DeepSpeed's ``TorchBackend`` loads that op whenever it is "compatible": on
CPU that is a g++ JIT build of about a minute (per machine and torch version), and each rank
then leaves a 66 MiB ``/dev/shm/deepspeed_allreduce_buffer_*`` that nothing deletes, a leak
per replica restart; it also segfaults unless ``LOCAL_SIZE`` is exact. Marking the op
incompatible in ``deepspeed.ops.__compatible_ops__`` (a dict DeepSpeed computes once per
process and keeps, so that edits persist) before ``init_distributed`` makes
``inference_all_reduce`` fall back to ``torch.distributed.all_reduce``: nothing to compile,
nothing in shared memory, and the logits still match the unsharded model. What is given up
is the op's lower all-reduce latency for CPU serving of large models.

Failures: the caller waits on all ranks together (``ray.wait``) and a dead rank fails the
call at once; the group then stays failed (:meth:`TensorParallelWorker.check_health`
raises, so Serve replaces the replica) because the survivors may sit in a collective that
can no longer complete (bounded by :data:`COLLECTIVE_TIMEOUT_S`).
"""

from __future__ import annotations

import asyncio
import functools
import operator
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from datetime import timedelta
from typing import Any, Callable, Iterable, Sequence

import ray
import torch
from ray.exceptions import RayError, RayTaskError
from ray.util import get_current_placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from eft_router.roles.interface import Draft, DraftItem, RoleInfo, ScoreItem
from eft_router.roles.worker import DTYPES, RoleWorker

COLLECTIVE_TIMEOUT_S = 60.0  # a rank waits this long for its peers in a collective, then raises
HEALTH_TIMEOUT_S = 10.0  # a rank that does not answer a ping this fast is unhealthy (Serve waits 30 s)
CLOSE_TIMEOUT_S = 5.0  # for the ranks to leave the process group before they are killed


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel role failed; the replica must be replaced."""


def _sharded_worker(env: dict[str, str], gpu: bool, worker_kwargs: dict[str, Any]) -> RoleWorker:
    """This process's rank: join the process group, then a ``RoleWorker`` around its shard.

    ``init_distributed`` reads the rendezvous (RANK, WORLD_SIZE, MASTER_ADDR/PORT...) from the
    environment. It is set here, not as the actor's runtime_env: an environment of its own
    would keep the rank from starting in one of Ray's idle worker processes. A module-level
    function, not the actor's ``__init__``: Ray pickles an actor's methods by value.
    """
    os.environ.update(env)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # torch is imported: the variable comes too late
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # why: module docstring
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    tp_size, dtype = int(env["WORLD_SIZE"]), DTYPES[worker_kwargs.get("dtype", "float32")]

    def shard(model: torch.nn.Module) -> torch.nn.Module:
        return deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size}, dtype=dtype).module

    return RoleWorker(**worker_kwargs, device="cuda" if gpu else "cpu", prepare=shard)


@ray.remote(concurrency_groups={"health": 1})
class _Rank:
    """One rank. ``ping`` has its own thread (the ``health`` concurrency group) so that it
    answers during a long forward pass."""

    def __init__(self, env: dict[str, str], gpu: bool, worker_kwargs: dict[str, Any]) -> None:
        self.rank = int(env["RANK"])
        self.worker = _sharded_worker(env, gpu, worker_kwargs)

    def call(self, name: str, *args: Any) -> Any:
        """Call the worker's method ``name`` (dotted: ``sessions.ids``) or read its attribute;
        only rank 0's result travels back."""
        value = operator.attrgetter(name)(self.worker)
        result = value(*args) if callable(value) else value
        return result if self.rank == 0 else None

    @ray.method(concurrency_group="health")
    def ping(self) -> None:
        pass

    def close(self) -> None:
        torch.distributed.destroy_process_group()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LastUse:
    """When each session was last used, by the replica's one clock.

    Ranks never expire idle sessions on their own clocks: a session at the idle boundary
    dropped on one rank and not on another would give the ranks different forward passes,
    and the next collective would hang until its timeout. The replica decides, and tells
    every rank which sessions to release.
    """

    def __init__(self, idle_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s = idle_s
        self.clock = clock
        self._used: OrderedDict[str, float] = OrderedDict()

    def touch(self, session_ids: Iterable[str]) -> None:
        now = self.clock()
        for session_id in session_ids:
            self._used[session_id] = now
            self._used.move_to_end(session_id)

    def forget(self, session_ids: Iterable[str]) -> None:
        for session_id in session_ids:
            self._used.pop(session_id, None)

    def expired(self) -> list[str]:
        """The sessions idle for longer than ``idle_s`` (forgotten here once returned)."""
        if self.idle_s is None:
            return []
        deadline = self.clock() - self.idle_s
        out = []
        while self._used and next(iter(self._used.values())) < deadline:
            out.append(self._used.popitem(last=False)[0])
        return out


class TensorParallelWorker:
    """A ``RoleWorker`` sharded over ``tp_size`` rank actors, with the worker's interface.

    Must be built inside a replica that owns a ``STRICT_PACK`` placement group of at least
    ``tp_size + 1`` bundles (``EnsembleConfig.to_serve_config`` emits it): STRICT_PACK keeps
    the ranks on the replica's node, whose address is the rendezvous. Each rank reserves its
    bundle's CPUs and GPUs and runs that many threads. ``worker_kwargs`` are
    :class:`RoleWorker`'s keyword arguments except ``device`` (a rank uses its GPU if its
    bundle has one). Blocks until every rank has loaded its shard.

    Worker methods and counters (``computed_tokens``...) are forwarded by name
    (:meth:`__getattr__`); ``score``, ``draft`` and ``release`` also keep :class:`LastUse`,
    which alone expires idle sessions (``session_idle_s``). Calls are serialised by a lock:
    every rank must see the same calls in the same order.
    """

    def __init__(self, tp_size: int, **worker_kwargs: Any) -> None:
        self.role: str = worker_kwargs["name"]
        self._idle = LastUse(worker_kwargs.pop("session_idle_s", None))
        pg = get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < tp_size + 1 or placement_group_table(pg)["strategy"] != "STRICT_PACK":
            raise ValueError(
                f"role {self.role!r}: tp_size {tp_size} needs a replica in a STRICT_PACK placement group of "
                f"{tp_size + 1} bundles (deploy through the ensemble config, which reserves it)"
            )
        host = ray.util.get_node_ip_address()
        port = _free_port(host)
        group = uuid.uuid4().hex[:8]
        self._ranks = []
        for rank, bundle in enumerate(pg.bundle_specs[1 : tp_size + 1]):
            gpu = bundle.get("GPU", 0) > 0
            env = {
                "MASTER_ADDR": host,
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(tp_size),
                "LOCAL_RANK": "0" if gpu else str(rank),  # Ray shows a rank only its own GPU
                "LOCAL_SIZE": str(tp_size),
                "OMP_NUM_THREADS": str(max(1, int(bundle.get("CPU", 1)))),
            }
            self._ranks.append(
                _Rank.options(
                    name=f"tp-{self.role}-{group}-rank{rank}",  # for `ray list actors` (and tests)
                    num_cpus=bundle.get("CPU", 0),
                    num_gpus=bundle.get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank + 1),
                ).remote(env, gpu, worker_kwargs)
            )
        self._lock = threading.Lock()
        self._failure: str | None = None
        self.info: RoleInfo = self.call("info")
        self.infos = {self.info.name: self.info}

    def __getattr__(self, name: str) -> Any:
        """A :class:`RoleWorker` method runs on every rank; any other public attribute
        (a counter) is rank 0's value."""
        if name.startswith("_"):
            raise AttributeError(name)
        if callable(getattr(RoleWorker, name, None)):
            return functools.partial(self.call, name)
        return self.call(name)

    validate = RoleWorker.validate  # reads only self.info(s): no round trip to the ranks

    def score(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        return self._calls("score", items)

    def draft(self, items: Sequence[DraftItem]) -> list[Draft]:
        return self._calls("draft", items)

    def _calls(self, name: str, items: Sequence[ScoreItem | DraftItem]) -> Any:
        self.expire_idle_sessions()  # as a worker expires on every call, by the replica's clock
        self._idle.touch(item.session_id for item in items)
        return self.call(name, items)

    def release(self, session_ids: Sequence[str]) -> None:
        self._idle.forget(session_ids)
        self.call("release", list(session_ids))

    def expire_idle_sessions(self) -> list[str]:
        expired = self._idle.expired()
        if expired:
            self.call("release", expired)
        return expired

    def _fail(self, rank: int, err: BaseException) -> TensorParallelError:
        what = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        self._failure = self._failure or f"role {self.role!r}: tensor-parallel rank {rank} failed: {what}"
        return TensorParallelError(self._failure)

    def call(self, name: str, *args: Any) -> Any:
        """Run ``name`` on every rank and return rank 0's result.

        A dead rank fails the call as soon as Ray reports it. An exception raised by every
        rank alike (a bad argument, checked before any collective) is re-raised as is and
        leaves the group healthy; exceptions that differ mean the ranks diverged: failed.
        """
        with self._lock:
            if self._failure is not None:
                raise TensorParallelError(self._failure)
            refs = [rank.call.remote(name, *args) for rank in self._ranks]
            errors: dict[int, RayTaskError] = {}
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                rank = refs.index(done[0])
                try:
                    ray.get(done[0])
                except RayTaskError as err:  # the worker raised, the rank is alive
                    errors[rank] = err
                except RayError as err:  # the rank's process died or is unreachable
                    raise self._fail(rank, err) from err
            if errors:
                causes = {(type(e.cause), str(e.cause)) for e in errors.values()}
                if len(errors) == len(refs) and len(causes) == 1:
                    raise errors[0].cause
                first = min(errors)
                raise self._fail(first, errors[first].cause) from errors[first]
            return ray.get(refs[0])

    async def check_health(self) -> None:
        """Raise :class:`TensorParallelError` naming the role and rank when a call failed or
        a rank does not answer a ping within :data:`HEALTH_TIMEOUT_S`."""
        if self._failure is not None:
            raise TensorParallelError(self._failure)
        pings = [rank.ping.remote() for rank in self._ranks]
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        for rank, ping in enumerate(pings):
            try:
                await asyncio.wait_for(ping, max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError as err:
                raise self._fail(rank, TimeoutError(f"no answer to a ping within {HEALTH_TIMEOUT_S} s")) from err
            except RayError as err:
                raise self._fail(rank, err) from err

    def shutdown(self) -> None:
        """Leave the process group on every rank (bounded wait: a rank may be stuck in a
        collective), then kill the ranks. Idempotent. Serve also removes the placement group
        with the replica, which kills any rank left behind."""
        ranks, self._ranks = self._ranks, []
        self._failure = self._failure or f"role {self.role!r}: shut down"
        if ranks:
            ray.wait([rank.close.remote() for rank in ranks], num_returns=len(ranks), timeout=CLOSE_TIMEOUT_S)
        for rank in ranks:
            ray.kill(rank)
