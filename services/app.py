"""The Serve application builder of a role, and deploying a whole ensemble from Python.

``serve deploy config.yaml`` (the config from :meth:`EnsembleConfig.to_serve_config`) calls
:func:`role_app` once per role, then applies the config's per-deployment options;
:func:`deploy_ensemble` does the same from Python through one code path (the config's own
application entries), so both give identical deployments.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from eft_router.roles.worker import DEFAULT_KV_CACHE_BYTES

from .config import ROLE_NAME, Dtype, EnsembleConfig
from .role_deployment import RoleDeployment


class RoleAppArgs(BaseModel):
    """The builder's arguments (``args:`` of a role's application in the Serve config)."""

    model_config = ConfigDict(extra="forbid")

    role: str = Field(pattern=ROLE_NAME.pattern)
    model: str = Field(min_length=1)
    dtype: Dtype = "float32"
    kv_cache_bytes: int = Field(default=DEFAULT_KV_CACHE_BYTES, ge=1)
    max_seq_len: int | None = Field(default=None, ge=1)
    vocab_size: int | None = Field(default=None, ge=1)
    session_idle_s: float | None = Field(default=None, gt=0)
    tp_size: int = Field(default=1, ge=1)  # > 1: the deployment options must reserve the placement group
    adapters: dict[str, str] | None = None  # adapter role -> LoRA directory, co-served with ``role``


def _bind(args: RoleAppArgs, options: dict[str, Any] | None = None) -> Application:
    deployment = RoleDeployment.options(**options) if options else RoleDeployment
    return deployment.bind(
        role=args.role,
        model=args.model,
        dtype=args.dtype,
        kv_cache_bytes=args.kv_cache_bytes,
        max_seq_len=args.max_seq_len,
        vocab_size=args.vocab_size,
        session_idle_s=args.session_idle_s,
        tp_size=args.tp_size,
        adapters=args.adapters,
    )


def role_app(args: dict[str, Any]) -> Application:
    """Serve application builder (``import_path: services.app:role_app``): one
    :class:`RoleDeployment` for ``args["role"]``. Raises pydantic's ``ValidationError``
    naming the bad argument."""
    return _bind(RoleAppArgs.model_validate(args))


def deploy_ensemble(config: EnsembleConfig, wait: bool = True) -> None:
    """Run every role's application (``eft-<role>``, no HTTP route) with the per-role
    deployment options, replacing applications of the same name.

    All applications are submitted together and then awaited together (``serve.run_many``,
    which is what ``serve.run`` calls for one application): replicas of different roles load
    their models concurrently instead of one role after another. ``wait=False`` returns
    once they are submitted.
    """
    targets = []
    for app in config.to_serve_config()["applications"]:
        (options,) = [{k: v for k, v in d.items() if k != "name"} for d in app["deployments"]]
        targets.append(
            serve.RunTarget(
                target=_bind(RoleAppArgs.model_validate(app["args"]), options),
                name=app["name"],
                route_prefix=app["route_prefix"],
            )
        )
    serve.run_many(targets, wait_for_applications_running=wait)
