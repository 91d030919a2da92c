"""The Ray Serve backend: roles served as Serve deployments, behind the :class:`Role` interface.

Each role ``r`` is the deployment ``RoleDeployment`` of the Serve application ``eft-r``
(deployed by ``services.app``). This module reaches it by name through a Serve handle and
never imports ``services``. Serve and Ray failures become :class:`RoleUnavailable` (the
role cannot be reached: no application, dead replica, back-pressure, timeout) or
:class:`RoleFailed` (the replica raised), both naming the role.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any, Collection, Sequence

import torch

from .roles import Draft, RoleInfo
from .spec import SamplingParams
from .vocab import MAX_LISTED, VocabularyMismatch, _differences

APP_PREFIX = "eft-"
DEPLOYMENT_NAME = "RoleDeployment"


def app_name(role: str, prefix: str = APP_PREFIX) -> str:
    """The Serve application that serves ``role`` (``prefix`` tells ensembles on one cluster apart)."""
    return f"{prefix}{role}"


class RoleError(RuntimeError):
    """A call to a served role failed; ``role`` names it, ``cause`` is the underlying error."""

    def __init__(self, role: str, cause: BaseException, what: str, app: str | None = None) -> None:
        app = app or app_name(role)
        super().__init__(f"role {role!r} (Serve application {app!r}) {what}: {type(cause).__name__}: {cause}")
        self.role = role
        self.cause = cause


class RoleUnavailable(RoleError):
    """The role could not be reached: not deployed, replicas dead or overloaded, timed out."""

    def __init__(self, role: str, cause: BaseException, app: str | None = None) -> None:
        super().__init__(role, cause, "is unavailable", app)


class RoleFailed(RoleError):
    """The role's replica raised while handling the call (``cause`` is its exception)."""

    def __init__(self, role: str, cause: BaseException, app: str | None = None) -> None:
        super().__init__(role, cause, "failed", app)


def _map_error(role: str, err: BaseException, app: str | None = None) -> BaseException:
    """The exception to raise for ``err``; cancellation passes through unchanged."""
    from ray.exceptions import RayTaskError, TaskCancelledError

    if isinstance(err, (asyncio.CancelledError, TaskCancelledError)):
        return err
    if isinstance(err, RayTaskError):  # user code raised inside the replica
        cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
        return RoleFailed(role, cause, app)
    return RoleUnavailable(role, err, app)  # RayServeException, RayActorError, timeouts, ...


def _handle(role: str, app: str) -> Any:
    from ray import serve

    try:
        return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app)
    except Exception as err:
        raise RoleUnavailable(role, err, app) from err


class ServeRole:
    """A :class:`~eft_router.roles.Role` over a Serve deployment handle.

    ``timeout_s`` bounds each call (None: no bound); a call that times out is cancelled on
    the replica and raises :class:`RoleUnavailable`.
    """

    def __init__(self, info: RoleInfo, handle: Any, timeout_s: float | None = None, app: str | None = None) -> None:
        self.info = info
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

    async def score(self, session_id: str, token_ids: Sequence[int], start: int) -> torch.Tensor:
        return await self._call("score", session_id, list(token_ids), start)

    async def draft(
        self, session_id: str, token_ids: Sequence[int], k: int, sampling: SamplingParams, uniforms: Sequence[float],
        stop_ids: Collection[int] = (), confidence: float = 0.0,
    ) -> Draft:
        return await self._call("draft", session_id, list(token_ids), k, sampling, list(uniforms), sorted(stop_ids), confidence)

    async def release(self, session_id: str) -> None:
        await self._call("release", session_id)


async def _await(response: Any) -> Any:
    return await response


def block_bytes(roles: Sequence[str], drafter: str | None, k: int, vocab_size: int) -> dict[str, int]:
    """Bytes the replicas return for one speculative block of ``k`` drafts: per role, and the
    sum under ``"total"``. The drafter returns a :class:`Draft` (k tokens and its rows
    ``[k+1, V]``), every other role its rows ``[k+1, V]``; sizes are of the objects pickled
    with protocol 5, as Ray ships a replica's result.

    Why this is as compact as exactness allows: every row is needed (the target p_t at all
    k+1 positions is combined before the first rejection is known), over the whole
    vocabulary (top-k/top-p and the residual max(0, p - q) read every token), in float32
    (bfloat16 values near a log-prob of -10 are 0.0625 apart, far beyond 1e-5). So a
    role's payload is 4 (k+1) V bytes plus a few hundred bytes of pickle framing, provided
    the tensor owns its storage: a view pickles all of its base tensor (the worker returns
    a fresh tensor per request, never a slice of the batch's logits).
    """
    rows = torch.zeros(k + 1, vocab_size, dtype=torch.float32)
    draft = Draft(tokens=[vocab_size - 1] * k, logprobs=rows)
    sizes = {role: len(pickle.dumps(draft if role == drafter else rows, protocol=5)) for role in roles}
    return {**sizes, "total": sum(sizes.values())}


def _check_roles(infos: dict[str, RoleInfo], digests: dict[str, str | None], fetch_vocab, apps: dict[str, str]) -> None:
    """Refuse roles whose vocabulary sizes or token-to-id maps differ (naming them)."""
    for role, info in infos.items():
        if info.name != role:
            raise VocabularyMismatch(f"role {role!r}: application {apps[role]!r} serves role {info.name!r}")
    sizes = {role: info.vocab_size for role, info in infos.items()}
    if len(set(sizes.values())) > 1:
        raise VocabularyMismatch(f"roles disagree on the shared vocabulary size: {sizes}")
    known = {role: d for role, d in digests.items() if d is not None}
    if len(set(known.values())) > 1:
        (ref, ref_digest), *_ = known.items()
        other = next(role for role, d in known.items() if d != ref_digest)
        ref_vocab, other_vocab = fetch_vocab(ref), fetch_vocab(other)
        diffs = _differences(ref_vocab, other_vocab)[:MAX_LISTED]
        raise VocabularyMismatch(
            f"role {other!r} does not share role {ref!r}'s vocabulary "
            f"({len(other_vocab)} vs {len(ref_vocab)} tokens); first differences: " + "; ".join(diffs)
        )


def connect_serve_roles(
    roles: Sequence[str], timeout_s: float | None = 60.0, call_timeout_s: float | None = None, app_prefix: str = APP_PREFIX
) -> dict[str, ServeRole]:
    """Handles to the served ``roles`` (from outside an event loop; inside one use
    :func:`aconnect_serve_roles`). Fetches each role's info and checks that all roles share
    one vocabulary (sizes, and token-to-id maps by digest, naming the first differences).
    ``timeout_s`` bounds these connection calls; ``call_timeout_s`` each later role call
    (None: unbounded). Role ``r`` is the application ``app_prefix + r``."""
    apps = {role: app_name(role, app_prefix) for role in roles}
    handles = {role: _handle(role, apps[role]) for role in roles}

    def get(role: str, method: str) -> Any:
        try:
            return getattr(handles[role], method).remote().result(timeout_s=timeout_s)
        except BaseException as err:  # noqa: BLE001
            raise _map_error(role, err, apps[role]) from err

    infos = {role: get(role, "info") for role in roles}
    digests = {role: get(role, "vocab_digest") for role in roles}
    _check_roles(infos, digests, lambda role: get(role, "vocab"), apps)
    return {role: ServeRole(infos[role], handles[role], call_timeout_s, apps[role]) for role in roles}


async def aconnect_serve_roles(
    roles: Sequence[str], timeout_s: float | None = 60.0, call_timeout_s: float | None = None, app_prefix: str = APP_PREFIX
) -> dict[str, ServeRole]:
    """:func:`connect_serve_roles` for code running in an event loop (the router)."""
    apps = {role: app_name(role, app_prefix) for role in roles}
    handles = {role: _handle(role, apps[role]) for role in roles}
    probes = {role: ServeRole(RoleInfo(role, "", 0, 0), handles[role], timeout_s, apps[role]) for role in roles}
    infos = dict(zip(roles, await asyncio.gather(*(probes[r]._call("info") for r in roles))))
    digests = dict(zip(roles, await asyncio.gather(*(probes[r]._call("vocab_digest") for r in roles))))
    vocabs = {}
    if len({d for d in digests.values() if d is not None}) > 1:
        vocabs = dict(zip(roles, await asyncio.gather(*(probes[r]._call("vocab") for r in roles))))
    _check_roles(infos, digests, vocabs.__getitem__, apps)
    return {role: ServeRole(infos[role], handles[role], call_timeout_s, apps[role]) for role in roles}
