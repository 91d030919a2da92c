"""The Ray Serve backend: roles served as Serve deployments, behind the :class:`Role` interface.

Each role ``r`` is the deployment ``RoleDeployment`` of the Serve application ``eft-r``
(deployed by ``services.app``). This module reaches it by name through a Serve handle and
never imports ``services``. Serve and Ray failures become :class:`RoleUnavailable` (the role
cannot be reached: no application, dead replica, back-pressure, timeout) or
:class:`RoleFailed` (the replica raised), both naming the role.

Session affinity with batches: a step's call carries many sessions, and each session's KV
cache lives on one replica. :func:`owner` (rendezvous hashing of the session id over the live
replica ids) says which; the call is split into one call per replica, each routed to its
replica by the deployment's request router, which uses the same function and publishes the
live replica ids it sees into :data:`REPLICAS` (it runs in this process, inside the handle).
A call whose sessions moved (a replica joined or left meanwhile) is still correct: the
replica that gets a session it never saw recomputes its prefix.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..core.vocab import MAX_LISTED, VocabularyMismatch, differences
from .interface import Draft, DraftItem, PartialFailure, Role, RoleError, RoleFailed, RoleInfo, RoleUnavailable, ScoreItem, members

APP_PREFIX = "eft-"
DEPLOYMENT_NAME = "RoleDeployment"
SERVE_FLAG = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
# Serve caps a message between a handle and a replica at 4 MiB by default, and one call's
# reply is 4 (k + 1) V bytes per request: 10 MB for 16 requests at k = 4 and V = 32,000,
# which failed with RESOURCE_EXHAUSTED. Raised to gRPC's largest (what Serve's own proxy uses).
MAX_MESSAGE_FLAG = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
# What the processes the project starts (the router, and every replica by its runtime_env)
# set before Ray and Serve start: Serve reads them when it is imported.
SERVE_ENV = {SERVE_FLAG: "1", MAX_MESSAGE_FLAG: str(2**31 - 1)}
SESSION_METHODS = frozenset({"score", "draft", "release", "ping", "stats"})  # first argument: the routing key
REPLICAS: dict[str, tuple[str, ...]] = {}  # Serve application -> its live replica ids, as this process's handles see them


def use_serve_env() -> None:
    """:data:`SERVE_ENV` in this process (what is set already stays): call it before Ray
    and Serve are imported or started here. Serve's throughput-optimized settings measured
    ~1.6x more calls/s (``bench/bench_serve_calls.py``)."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)


def app_name(role: str, prefix: str = APP_PREFIX) -> str:
    """The Serve application that serves ``role`` (``prefix`` tells ensembles on one cluster apart)."""
    return f"{prefix}{role}"


def _weight(key: str, replica_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(key: str, replica_ids: Sequence[str]) -> str:
    """The replica that serves ``key`` (a session id): highest random weight. Stable: when a
    replica joins or leaves, only the sessions that hash to it move."""
    return max(replica_ids, key=lambda r: _weight(key, r))


def _map_error(role: str, err: BaseException, app: str) -> BaseException:
    """The exception to raise for ``err``; cancellation passes through unchanged. Ray's and
    Serve's own errors (a dead or unreachable replica, back-pressure, a timeout) mean the role
    is unavailable; anything else is the replica's own exception (wrapped in a
    ``RayTaskError``, or shipped as it is by the gRPC transport): the role failed."""
    from ray.exceptions import RayError, RayTaskError, TaskCancelledError
    from ray.serve.exceptions import RayServeException, RequestCancelledError

    where = f"Serve application {app!r}"
    if isinstance(err, (asyncio.CancelledError, TaskCancelledError, RequestCancelledError)):
        return err
    if isinstance(err, RayTaskError):
        cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
        return RoleFailed(role, cause, where)
    if isinstance(err, (RayError, RayServeException, TimeoutError, ConnectionError)):
        return RoleUnavailable(role, err, where)
    return RoleFailed(role, err, where)


def _handle(role: str, app: str) -> Any:
    """A handle of the role's deployment of its own (not Serve's shared, cached one: a role
    shuts its handle down on the event loop that used it, which Serve's ``shutdown`` could
    not do once that loop is closed), with the gRPC transport (measured faster than passing
    requests by object reference: ``bench/bench_serve_calls.py``)."""
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    try:
        serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app)  # raises if the application is not deployed
    except Exception as err:
        raise RoleUnavailable(role, err, f"Serve application {app!r}") from err
    return DeploymentHandle(DEPLOYMENT_NAME, app).options(_by_reference=False)


class ServeRole:
    """A :class:`~eft_router.roles.interface.Role` over a Serve deployment handle.

    ``timeout_s`` bounds each call (None: no bound); a call that times out is cancelled on
    the replica and raises :class:`RoleUnavailable`. Results travel packed: one NumPy array
    per call (it pickles as one buffer), split here into the items' rows.
    """

    def __init__(
        self, info: RoleInfo, handle: Any, timeout_s: float | None = None, app: str | None = None, infos: dict[str, RoleInfo] | None = None
    ) -> None:
        self.info = info
        self.infos = infos or {info.name: info}  # every role the deployment serves (a group: several)
        self.handle = handle
        self.timeout_s = timeout_s
        self.app = app or app_name(info.name)

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            response = getattr(self.handle, method).remote(*args)
            if self.timeout_s is None:
                return await response
            try:
                return await asyncio.wait_for(_await(response), self.timeout_s)
            except asyncio.TimeoutError as err:
                raise TimeoutError(f"{method} took over {self.timeout_s} s") from err
        except Exception as err:  # cancellation and generator exits pass through untouched
            mapped = _map_error(self.info.name, err, self.app)
            if mapped is err:
                raise
            raise mapped from err

    def replicas(self) -> tuple[str, ...]:
        """The live replica ids this process's handle knows (empty before its first update)."""
        return REPLICAS.get(self.app, ())

    async def replica_stats(self) -> dict[str, dict[str, Any]]:
        """``stats`` of every live replica, by replica id: each asked by its id (before the
        handle knows its replicas, the one replica an unrouted call reaches)."""
        routes = self.replicas()
        if not routes:
            st = await self._call("stats")
            return {st["replica"]: st}
        found = await asyncio.gather(*(self._call("stats", route) for route in routes))
        return {st["replica"]: st for st in found}

    def _by_replica(self, keys: Sequence[str]) -> dict[str, list[int]]:
        """Item indices per routing key: each live replica's sessions, or, before the handle
        knows its replicas, everything routed by the first session."""
        replicas = self.replicas()
        if not replicas:
            return {keys[0]: list(range(len(keys)))} if keys else {}
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(owner(key, replicas), []).append(i)
        return groups

    async def _fan_out(self, method: str, items: Sequence[Any], unpack: Callable[[Any, list], list]) -> list:
        """One call per replica (its part of ``items``), results back in the items' order;
        ``unpack`` turns a part's reply (and the part's items) into its results. A failed part fails its items only
        (:class:`PartialFailure`); when every part fails, the call raises that error."""
        groups = self._by_replica([item if isinstance(item, str) else item.session_id for item in items])
        replies = await asyncio.gather(
            *(self._call(method, route, [items[i] for i in where]) for route, where in groups.items()), return_exceptions=True
        )
        # every part has ended here: none stores a cache after the caller moves on
        out: list = [None] * len(items)
        errors: dict[int, RoleError] = {}
        for where, reply in zip(groups.values(), replies):
            if isinstance(reply, BaseException):
                if not isinstance(reply, RoleError):
                    raise reply
                errors.update({i: reply for i in where})
                continue
            for i, result in zip(where, unpack(reply, [items[i] for i in where])):
                out[i] = result
        if errors:
            if len(errors) == len(items):
                raise next(iter(errors.values()))
            raise PartialFailure(self.info.name, out, errors)
        return out

    async def score(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        return await self._fan_out("score", items, lambda reply, part: list(torch.split(torch.from_numpy(reply[0]), reply[1])))

    async def draft(self, items: Sequence[DraftItem]) -> list[Draft]:
        def unpack(reply: tuple[list[tuple], np.ndarray], part: list[DraftItem]) -> list[Draft]:
            # per item: the drafter's rows, then each ``also`` role's, all len(tokens) + 1 long
            shapes, packed = reply
            rows = torch.from_numpy(packed)
            out = []
            sizes = [(len(t) + 1) * (1 + len(it.also)) for (t, _, _), it in zip(shapes, part)]
            for (t, parents, sampled), item, r in zip(shapes, part, torch.split(rows, sizes)):
                own, *others = torch.split(r, len(t) + 1)
                out.append(Draft(t, own, dict(zip(item.also, others)), parents, sampled))
            return out

        return await self._fan_out("draft", items, unpack)

    async def release(self, session_ids: Sequence[str]) -> None:
        await self._fan_out("release", list(session_ids), lambda reply, part: [None] * len(part))

    async def close(self) -> None:
        """Shut the handle down (on the loop that used it: with Serve's throughput-optimized
        settings its router lives on that loop)."""
        await self.handle.shutdown_async()

    async def probe(self, timeout_s: float) -> None:
        """Ping every replica this process's handle knows (any replica before it knows them)."""
        await asyncio.gather(*(self._ping(route, timeout_s) for route in self.replicas() or ("",)))

    async def _ping(self, route: str, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._call("ping", route), timeout_s)
        except asyncio.TimeoutError as err:
            what = f"replica {route} did not answer" if route else "no replica answered"
            raise RoleUnavailable(self.info.name, TimeoutError(f"{what} within {timeout_s} s"), f"Serve application {self.app!r}") from err


async def _await(response: Any) -> Any:
    return await response


def _check_roles(infos: dict[str, RoleInfo], digests: dict[str, str | None], fetch_vocab) -> None:
    """Refuse roles whose vocabulary sizes or token-to-id maps differ (naming them)."""
    sizes = {role: info.vocab_size for role, info in infos.items()}
    if len(set(sizes.values())) > 1:
        raise VocabularyMismatch(f"roles disagree on the shared vocabulary size: {sizes}")
    known = {role: d for role, d in digests.items() if d is not None}
    if len(set(known.values())) > 1:
        (ref, ref_digest), *_ = known.items()
        other = next(role for role, d in known.items() if d != ref_digest)
        ref_vocab, other_vocab = fetch_vocab(ref), fetch_vocab(other)
        diffs = differences(ref_vocab, other_vocab)[:MAX_LISTED]
        raise VocabularyMismatch(
            f"role {other!r} does not share role {ref!r}'s vocabulary "
            f"({len(other_vocab)} vs {len(ref_vocab)} tokens); first differences: " + "; ".join(diffs)
        )


def _serving(roles: Sequence[str], served_by: Mapping[str, str] | None, prefix: str) -> tuple[dict[str, str], dict[str, str]]:
    """Each role's application (its own, or, by ``served_by``, the one of the role whose
    group serves it), and per application the first of its roles (to name it in errors)."""
    served_by = served_by or {}
    apps = {role: app_name(served_by.get(role, role), prefix) for role in roles}
    names: dict[str, str] = {}
    for role, app in apps.items():
        names.setdefault(app, role)
    return apps, names


def _assemble(
    roles: Sequence[str],
    apps: dict[str, str],
    names: dict[str, str],
    handles: dict[str, Any],
    infos: dict[str, dict[str, RoleInfo]],
    digests: dict[str, str | None],
    fetch_vocab: Callable[[str], dict[str, int]],
    call_timeout_s: float | None,
) -> dict[str, Role]:
    """The roles over their applications' handles (one backend per application, a
    :class:`Member` per role of a group), after checking that each application serves its
    roles and that all share one vocabulary. ``infos``, ``digests``, ``fetch_vocab``: by
    application; ``names``: a role of each application."""
    for role in roles:
        if role not in infos[apps[role]]:
            raise VocabularyMismatch(f"role {role!r}: application {apps[role]!r} serves role(s) {', '.join(infos[apps[role]])}, not it")
    _check_roles(
        {role: infos[apps[role]][role] for role in roles},
        {names[app]: d for app, d in digests.items()},
        lambda role: fetch_vocab(apps[role]),
    )
    out: dict[str, Role] = {}
    for app, handle in handles.items():
        app_infos = infos[app]
        primary = next(info for info in app_infos.values())
        out.update(members(ServeRole(primary, handle, call_timeout_s, app, app_infos)))
    return {role: out[role] for role in roles}


def connect_serve_roles(
    roles: Sequence[str],
    timeout_s: float | None = 60.0,
    call_timeout_s: float | None = None,
    app_prefix: str = APP_PREFIX,
    served_by: Mapping[str, str] | None = None,
) -> dict[str, Role]:
    """Handles to the served ``roles`` (from outside an event loop; inside one use
    :func:`aconnect_serve_roles`). Fetches each application's roles and checks that all
    roles share one vocabulary (sizes, and token-to-id maps by digest, naming the first
    differences). ``timeout_s`` bounds these connection calls; ``call_timeout_s`` each later
    role call (None: unbounded). Role ``r`` is the application ``app_prefix + r``, or, for
    an adapter role co-served with its base, ``app_prefix + served_by[r]``."""
    apps, names = _serving(roles, served_by, app_prefix)
    handles = {app: _handle(role, app) for app, role in names.items()}

    def get(app: str, method: str) -> Any:
        try:
            return getattr(handles[app], method).remote().result(timeout_s=timeout_s)
        except Exception as err:  # Ctrl-C (KeyboardInterrupt) is not a role failure: it passes
            raise _map_error(names[app], err, app) from err

    infos = {app: get(app, "infos") for app in handles}
    digests = {app: get(app, "vocab_digest") for app in handles}
    return _assemble(roles, apps, names, handles, infos, digests, lambda app: get(app, "vocab"), call_timeout_s)


async def aconnect_serve_roles(
    roles: Sequence[str],
    timeout_s: float | None = 60.0,
    call_timeout_s: float | None = None,
    app_prefix: str = APP_PREFIX,
    served_by: Mapping[str, str] | None = None,
) -> dict[str, Role]:
    """:func:`connect_serve_roles` for code running in an event loop (the router)."""
    apps, names = _serving(roles, served_by, app_prefix)
    handles = {app: _handle(role, app) for app, role in names.items()}
    probes = {app: ServeRole(RoleInfo(names[app], "", 0, 0, 0, 0), handles[app], timeout_s, app) for app in handles}
    infos = dict(zip(handles, await asyncio.gather(*(probes[a]._call("infos") for a in handles))))
    digests = dict(zip(handles, await asyncio.gather(*(probes[a]._call("vocab_digest") for a in handles))))
    vocabs = {}
    if len({d for d in digests.values() if d is not None}) > 1:
        vocabs = dict(zip(handles, await asyncio.gather(*(probes[a]._call("vocab") for a in handles))))
    return _assemble(roles, apps, names, handles, infos, digests, vocabs.__getitem__, call_timeout_s)
