"""One role as a Ray Serve deployment: each replica holds one :class:`RoleWorker`.

The replica exposes exactly the :class:`eft_router.roles.Role` calls (``score``, ``draft``,
``release``) plus ``info``, ``vocab_digest``/``vocab`` (for the router's shared-vocabulary
check), ``sessions``/``stats`` (tests, metrics) and ``check_health``. Every call carries the
session id and the full token ids, so a replica that never saw a session recomputes it:
results never depend on which replica Serve routes to. Routing only makes it fast:
:class:`SessionAffinityRouter` sends all calls of a session to one replica, so its KV cache
is reused and ``release`` finds it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Collection, Sequence

import ray
import torch
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from eft_router.roles import Draft, RoleInfo
from eft_router.spec import SamplingParams
from eft_router.worker import DEFAULT_MAX_CACHED_TOKENS, DraftRequest, RoleWorker, ScoreRequest

from .config import DEFAULT_BATCH_WAIT_TIMEOUT_S, DEFAULT_MAX_BATCH_SIZE
from .tensor_parallel import TensorParallelWorker


def vocab_digest(vocab: dict[str, int]) -> str:
    """A digest of a token-to-id map: equal digests, equal maps."""
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _pick_device() -> str:
    """``cuda`` when Ray gave this replica a GPU (``ray_actor_options.num_gpus``), else ``cpu``."""
    try:
        gpus = ray.get_gpu_ids()
    except Exception:  # not inside Ray (a unit test constructing the class directly)
        gpus = []
    return "cuda" if gpus and torch.cuda.is_available() else "cpu"


SESSION_METHODS = frozenset({"score", "draft", "release"})  # first argument: the session id


def _affinity(session_id: str, replica: RunningReplica) -> int:
    digest = hashlib.blake2b(f"{session_id}\0{replica.replica_id.unique_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class SessionAffinityRouter(RequestRouter):
    """Routes every call of a session to one replica: rendezvous (highest-random-weight)
    hashing of the session id over the live replicas.

    Why: the KV caches live on the replicas. With Serve's default power-of-two routing, the
    steps of one session land on random replicas: each recomputes the whole prefix (correct,
    but the cache is useless with N replicas on all but 1/N of the steps), and ``release``
    reaches only one of the replicas that hold the session (the others keep it until LRU
    eviction). Rendezvous hashing is stable: when a replica joins or leaves, only the
    sessions that hash to it move (and recompute once); the cache a moved session leaves on
    its old replica is reclaimed by that replica's LRU bound.

    A session's calls wait for its replica when that replica's queue is full rather than
    spill to another one, so that ``release`` always finds the cache. Calls without a
    session (``info``, ``stats``, ...) go to the shorter queue of two random replicas.

    The router runs in the caller's process (the Serve handle), which unpickles this class
    by reference: the caller needs the ``services`` package importable.
    """

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        meta = pending_request.metadata if pending_request is not None else None
        if meta is not None and meta.call_method in SESSION_METHODS and pending_request.args:
            session = str(pending_request.args[0])
            return [[max(candidate_replicas, key=lambda r: _affinity(session, r))]]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]


@serve.deployment(
    name="RoleDeployment",
    request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),
)
class RoleDeployment:
    """A replica of one role.

    Concurrency: the methods are ``async`` and every call that touches the worker (model or
    session caches) runs on one dedicated worker thread, in arrival order. Not plain sync
    methods, because Serve 2.60 runs sync methods in a thread pool
    (``RAY_SERVE_RUN_SYNC_IN_THREADPOOL=1``), i.e. several at once, and the worker is
    single-threaded by design (its LRU caches and a model's KV caches are not thread safe).
    Not the worker inline on the event loop either: a forward pass would then block the
    replica's loop, which also answers health checks and reports queue metrics to the
    autoscaler. ``max_ongoing_requests`` therefore bounds how many calls wait here.

    Batching: ``score`` and ``draft`` calls of concurrent sessions go through Serve's
    ``@serve.batch`` queues and run as one ``score_many`` / ``draft_many`` on the worker
    thread: one forward pass per batch (per draft step), where unbatched calls would queue
    for the thread one forward pass each. ``max_batch_size`` and ``batch_wait_timeout_s``
    are set per replica from the role's config. A request is validated before it joins a
    batch, so a bad one fails alone instead of failing the calls batched with it.

    Tensors are returned as CPU float32 tensors (Serve pickles them to the caller).
    """

    def __init__(
        self,
        role: str,
        model: str,
        dtype: str = "float32",
        max_cached_tokens: int = DEFAULT_MAX_CACHED_TOKENS,
        vocab_size: int | None = None,
        session_idle_s: float | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
        tp_size: int = 1,
    ) -> None:
        self._vocab: dict[str, int] | None = None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model)
        except Exception as err:  # a model directory without a tokenizer
            if vocab_size is None:
                raise ValueError(
                    f"role {role!r}: cannot load a tokenizer from {model!r} to size the shared "
                    f"vocabulary; give vocab_size ({err})"
                ) from err
        else:
            self._vocab = tokenizer.get_vocab()
            if vocab_size is None:
                vocab_size = len(tokenizer)
        self._digest = vocab_digest(self._vocab) if self._vocab is not None else None
        # tp_size > 1: the model sharded over rank actors, behind the same worker interface
        args = dict(
            name=role, model=model, vocab_size=vocab_size, dtype=dtype, max_cached_tokens=max_cached_tokens,
            session_idle_s=session_idle_s,
        )
        self.worker: RoleWorker | TensorParallelWorker = (
            TensorParallelWorker(tp_size, **args) if tp_size > 1 else RoleWorker(**args, device=_pick_device())
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"role-{role}")
        for batched in (self._score_batch, self._draft_batch):
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        # The caches see idleness only when a call touches them: sweep, so that an abandoned
        # session goes even when no further call comes (at most 1.5 x session_idle_s after
        # its last call). The constructor runs on the replica's event loop.
        self._sweeper: asyncio.Task | None = None
        if session_idle_s is not None:
            self._sweeper = asyncio.get_running_loop().create_task(self._expire_idle_sessions(session_idle_s / 2))

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _expire_idle_sessions(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self._run(self.worker.expire_idle_sessions)

    # -- the Role calls ----------------------------------------------------------------------

    async def score(self, session_id: str, token_ids: Sequence[int], start: int) -> torch.Tensor:
        request = ScoreRequest(session_id, list(token_ids), start)
        self.worker.validate(request)
        return await self._score_batch(request)

    async def draft(
        self, session_id: str, token_ids: Sequence[int], k: int, sampling: SamplingParams, uniforms: Sequence[float],
        stop_ids: Collection[int] = (), confidence: float = 0.0,
    ) -> Draft:
        request = DraftRequest(session_id, list(token_ids), k, sampling, list(uniforms), frozenset(stop_ids), confidence)
        self.worker.validate(request)
        return await self._draft_batch(request)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def _score_batch(self, requests: list[ScoreRequest]) -> list[torch.Tensor]:
        return await self._run(self.worker.score_many, requests)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def _draft_batch(self, requests: list[DraftRequest]) -> list[Draft]:
        return await self._run(self.worker.draft_many, requests)

    async def release(self, session_id: str) -> None:
        await self._run(self.worker.release, session_id)

    # -- metadata, introspection, health ------------------------------------------------------

    async def info(self) -> RoleInfo:
        return self.worker.info

    async def vocab_digest(self) -> str | None:
        """SHA-256 of the token-to-id map, or None when the model has no tokenizer."""
        return self._digest

    async def vocab(self) -> dict[str, int] | None:
        """The token-to-id map (fetched only to name differences when digests disagree)."""
        return self._vocab

    async def sessions(self) -> list[str]:
        """Ids of the sessions cached on this replica, least recently used first."""
        return await self._run(lambda: self.worker.caches.ids())

    async def stats(self) -> dict[str, Any]:
        """This replica's id and cache state (for tests and metrics)."""

        def read() -> dict[str, Any]:
            caches = self.worker.caches
            return {
                "sessions": caches.ids(),
                "cached_tokens": caches.cached_tokens,
                "computed_tokens": self.worker.computed_tokens,
                "batches": self.worker.batches,
                "batched_calls": self.worker.batched_calls,
            }

        out = await self._run(read)
        out["replica"] = serve.get_replica_context().replica_id.unique_id
        out["node"] = ray.get_runtime_context().get_node_id()  # where the config placed it
        return out

    async def check_health(self) -> None:
        """Serve's periodic health check: runs on the event loop, so a long forward pass on
        the worker thread does not fail it; a broken worker thread does, and so does a
        failed or unresponsive tensor-parallel rank."""
        if self._executor._shutdown:  # noqa: SLF001 - no public flag
            raise RuntimeError(f"role {self.worker.info.name!r}: worker thread is shut down")
        if self._sweeper is not None and self._sweeper.done():  # it only ends by raising
            raise RuntimeError(f"role {self.worker.info.name!r}: idle-session sweep failed") from self._sweeper.exception()
        if isinstance(self.worker, TensorParallelWorker):
            await self.worker.check_health()

    def __del__(self) -> None:
        sweeper = getattr(self, "_sweeper", None)
        if sweeper is not None:
            sweeper.cancel()
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        worker = getattr(self, "worker", None)
        if isinstance(worker, TensorParallelWorker):
            worker.shutdown()
