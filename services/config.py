"""The ensemble config file: which model serves each role, and how each role is deployed.

```yaml
drafter: ft_small                       # optional, must be one of the roles
vocab_size: 32000                       # optional: the shared tokenizer's length
defaults:                               # optional request defaults, validated like requests
  eft: {preset: upscale, beta: 1.0}
  sampling: {temperature: 0.7, top_p: 0.9}
  speculative: {k: 4}
roles:
  base_large:
    model: meta-llama/Llama-2-70b-hf    # local path or hub id
    dtype: bfloat16
    autoscaling_config: {min_replicas: 1, max_replicas: 4}
    ray_actor_options: {num_cpus: 8, num_gpus: 1}
  base_small: {model: meta-llama/Llama-2-7b-hf, num_replicas: 2}
  ft_small: {model: meta-llama/Llama-2-7b-chat-hf, kv_cache_bytes: 8589934592}
  ft_small_safe: {adapter: ./adapters/safe, base: base_small}   # a LoRA adapter, co-served
```

A role given as ``adapter`` (a PEFT LoRA directory) with ``base`` (a role with a model of
its own) has no deployment of its own: the base's deployment loads it beside the base and
answers for both, each forward pass mixing their rows. Its deployment settings are the
base's, so an adapter role sets none.

Every model is strict (unknown fields are refused) and every error names its field: pydantic
reports the location (``roles.base_large.dtype``), and cross-field checks name the fields in
their message. :meth:`EnsembleConfig.to_serve_config` turns the file into a Serve deploy
config (one application ``eft-<role>`` per role) that ``serve deploy`` accepts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from eft_router.core.spec import FT_SMALL, EFTSpec, SamplingParams, SpecError, SpeculativeParams
from eft_router.roles.adapters import Adapter
from eft_router.roles.serve import APP_PREFIX, DEPLOYMENT_NAME, SERVE_ENV
from eft_router.roles.worker import DEFAULT_KV_CACHE_BYTES
from eft_router.server.config import RouterConfig
from eft_router.server.messages import RequestDefaults

DEFAULT_MAX_ONGOING_REQUESTS = 16  # calls one replica holds: a router sends a few per step
IMPORT_PATH = "services.app:role_app"
ROLE_NAME = re.compile(r"^(base_large|base_small|ft_[a-z0-9][a-z0-9_]*)$")
Dtype = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """The config file cannot be read as a mapping (bad YAML, missing file)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActorOptions(_Strict):
    """Ray actor options of each replica (``ray_actor_options`` in Serve)."""

    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)
    memory: float | None = Field(default=None, ge=0)
    resources: dict[str, float] | None = None
    runtime_env: dict[str, Any] | None = None
    accelerator_type: str | None = None
    label_selector: dict[str, str] | None = None

    @model_validator(mode="after")
    def _serve_accepts(self) -> "ActorOptions":
        from ray.serve.schema import RayActorOptionsSchema  # runtime_env URI rules etc.

        RayActorOptionsSchema(**self.to_dict())
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class RoleConfig(_Strict):
    """One role: its model, and how its Serve deployment runs.

    ``num_replicas`` (fixed) and ``autoscaling_config`` (passed to Serve as is, validated by
    Serve's own ``AutoscalingConfig``) are exclusive; with neither, one replica.
    ``kv_cache_bytes`` bounds each replica's KV cache (a tensor-parallel replica's ranks
    share it): it holds ``kv_cache_bytes`` divided by one session's slot (its keys and values
    at ``max_seq_len`` tokens, default the model's context length) sessions; the least
    recently used idle session makes room for a new one. The router runs at most that many
    requests at once (``router.max_num_seqs``), and queues the rest.
    ``session_idle_s`` frees a session's caches on a replica once no call of that session
    came for that long (within 1.5x that time, whether or not other calls come): a client
    that vanished without releasing stops holding memory. Unset: only releases and the
    token bound free caches.
    ``max_ongoing_requests``: calls one replica holds at once (default 16; each router sends
    one call per role and step, carrying every request of the step).
    ``tp_size > 1`` shards the model over that many rank processes per replica (DeepSpeed
    AutoTP, ``services.tensor_parallel``). ``ray_actor_options`` then describes one model
    process: each rank reserves ``num_cpus`` (default 1), ``num_gpus`` and ``memory``; the
    replica itself the same CPUs and memory, no GPU, plus the custom ``resources`` (node
    pinning). The replica reserves it all as one ``STRICT_PACK`` placement group: one node.
    ``health_check_period_s``: how often Serve calls the replica's ``check_health`` (Serve's
    default: 10 s); a failed check (a dead tensor-parallel rank, say) replaces the replica.
    """

    model: str | None = Field(default=None, min_length=1)
    adapter: str | None = Field(default=None, min_length=1)  # a PEFT LoRA directory on ``base``'s model
    base: str | None = None  # the role whose deployment co-serves this adapter
    dtype: Dtype = "float32"
    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    kv_cache_bytes: int = Field(default=DEFAULT_KV_CACHE_BYTES, ge=1)
    max_seq_len: int | None = Field(default=None, ge=1)
    session_idle_s: float | None = Field(default=None, gt=0)
    tp_size: int = Field(default=1, ge=1)
    health_check_period_s: float | None = Field(default=None, gt=0)

    @field_validator("autoscaling_config")
    @classmethod
    def _autoscaling_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from ray.serve.config import AutoscalingConfig

            unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
            if unknown:  # Serve itself ignores unknown keys: a typo would pass silently
                raise ValueError(
                    f"unknown Serve autoscaling option(s) {', '.join(unknown)}; "
                    f"known: {', '.join(AutoscalingConfig.model_fields)}"
                )
            try:
                AutoscalingConfig(**value)
            except ValidationError as err:
                problems = "; ".join(
                    ".".join(map(str, e["loc"])) + ": " + e["msg"] if e["loc"] else e["msg"] for e in err.errors()
                )
                raise ValueError(f"not a valid Serve autoscaling config: {problems}") from None
        return value

    @model_validator(mode="after")
    def _model_or_adapter(self) -> "RoleConfig":
        if (self.model is None) == (self.adapter is None):
            raise ValueError("model and adapter: give one of them (an adapter also names its base)")
        if (self.adapter is None) != (self.base is None):
            raise ValueError("adapter and base: an adapter role gives both, a model role neither")
        if self.adapter is not None:
            own = sorted(f for f in self.model_fields_set if f not in ("adapter", "base"))
            if own:
                raise ValueError(
                    f"{', '.join(own)}: an adapter role is served by its base's deployment ({self.base}); set them there"
                )
        return self

    @model_validator(mode="after")
    def _replicas_exclusive(self) -> "RoleConfig":
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("num_replicas and autoscaling_config: give one of them, not both")
        return self

    @model_validator(mode="after")
    def _ranks_own_gpus(self) -> "RoleConfig":
        gpus = self.ray_actor_options.num_gpus
        if self.tp_size > 1 and gpus is not None and gpus != int(gpus):
            raise ValueError(
                f"tp_size {self.tp_size} with ray_actor_options.num_gpus {gpus}: each rank needs whole GPUs "
                "(nccl refuses two ranks on one GPU)"
            )
        return self

    def _bundles(self, replica: dict[str, Any], gpus: float) -> list[dict[str, float]]:
        """Placement group bundles: 0 for the replica, 1..tp_size for the ranks."""
        cpus = replica.get("num_cpus") or 1  # a bundle may not be all zeros
        memory = {"memory": replica["memory"]} if "memory" in replica else {}
        rank = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **memory}
        return [{"CPU": cpus, **memory, **replica.get("resources", {})}] + [dict(rank) for _ in range(self.tp_size)]

    def deployment_options(self) -> dict[str, Any]:
        """The Serve deployment options of this role (``Deployment.options`` keywords)."""
        options: dict[str, Any] = {}
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            options["num_replicas"] = self.num_replicas or 1
        actor = self.ray_actor_options.to_dict()
        # Serve's throughput-optimized settings in every replica (user code on the replica's
        # event loop, the gRPC handle transport, buffered request logs): measured in
        # bench/bench_serve_calls.py; and room for large replies (roles.serve.SERVE_ENV). They also turn on direct ingress, which the router has
        # no use for (it reaches roles by handles only) and which costs twice: its replicas
        # report their own running requests to the autoscaler, leaving out the calls that
        # reach them by the gRPC transport (an autoscaled role under load never scaled up),
        # and each replica's graceful shutdown runs out its 20 s timeout (a deleted,
        # redeployed or scaled-down replica took 21 s to go, 3 s without). Handle calls are
        # as fast without it.
        env = {**SERVE_ENV, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
        runtime_env = actor.get("runtime_env") or {}
        actor["runtime_env"] = {**runtime_env, "env_vars": {**env, **runtime_env.get("env_vars", {})}}
        if self.tp_size > 1:
            options["placement_group_bundles"] = self._bundles(actor, actor.pop("num_gpus", 0))
            options["placement_group_strategy"] = "STRICT_PACK"  # the ranks rendezvous on the replica's node
        if actor:
            options["ray_actor_options"] = actor
        options["max_ongoing_requests"] = self.max_ongoing_requests or DEFAULT_MAX_ONGOING_REQUESTS
        if self.health_check_period_s is not None:
            options["health_check_period_s"] = self.health_check_period_s
        return options


class Defaults(_Strict):
    """Request defaults, checked with the same validation as requests (``eft_router.spec``)."""

    eft: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None
    speculative: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _valid_specs(self) -> "Defaults":
        for name, cls in (("eft", EFTSpec), ("sampling", SamplingParams), ("speculative", SpeculativeParams)):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                cls(**value)
            except SpecError as err:
                field = err.field if err.field.startswith(f"{name}.") else f"{name}.{err.field}"
                raise ValueError(f"defaults.{field}: {err.message}") from None
            except TypeError as err:  # an unknown keyword
                raise ValueError(f"defaults.{name}: {err}") from None
        return self


class EnsembleConfig(_Strict):
    """The whole file: ``roles`` (role name -> :class:`RoleConfig`), the default ``drafter``,
    optional ``vocab_size`` (the shared tokenizer's length; each replica computes it from
    its model's tokenizer when absent) and optional request ``defaults``."""

    roles: dict[str, RoleConfig] = Field(min_length=1)
    drafter: str = FT_SMALL
    vocab_size: int | None = Field(default=None, ge=1)
    defaults: Defaults | None = None
    tokenizer: str | None = None  # the shared tokenizer for the router (default: the drafter's model)
    app_prefix: str = Field(default=APP_PREFIX, pattern=r"^[a-z0-9][a-z0-9-]*$")  # role r: application <app_prefix><r>
    router: RouterConfig = Field(default_factory=RouterConfig)

    @field_validator("roles")
    @classmethod
    def _role_names(cls, roles: dict[str, RoleConfig]) -> dict[str, RoleConfig]:
        for name in roles:
            if not ROLE_NAME.match(name):
                raise ValueError(
                    f"role {name!r}: role names are base_large, base_small, ft_small, ft_large "
                    "or ft_<name> (lower case letters, digits, underscores)"
                )
        return roles

    @field_validator("roles")
    @classmethod
    def _adapters_have_bases(cls, roles: dict[str, RoleConfig]) -> dict[str, RoleConfig]:
        for name, rc in roles.items():
            if rc.base is None:
                continue
            base = roles.get(rc.base)
            if base is None or base.model is None:
                full = [r for r, c in roles.items() if c.model is not None]
                raise ValueError(f"role {name!r}: base must be a role with a model of its own ({', '.join(full)}), got {rc.base!r}")
            if base.tp_size > 1:
                raise ValueError(f"role {name!r}: base role {rc.base!r} has tp_size {base.tp_size}; adapters are co-served only with an unsharded base")
        return roles

    @field_validator("drafter")
    @classmethod
    def _drafter_served(cls, drafter: str, info: ValidationInfo) -> str:
        roles = info.data.get("roles")  # absent when roles itself was invalid
        if roles is not None and drafter not in roles:
            raise ValueError(f"must be one of the roles ({', '.join(roles)}), got {drafter!r}")
        return drafter

    @field_validator("defaults")
    @classmethod
    def _defaults_fit_roles(cls, defaults: Defaults | None, info: ValidationInfo) -> Defaults | None:
        roles = info.data.get("roles")
        if defaults is None or roles is None:
            return defaults
        if defaults.eft is not None:
            try:
                EFTSpec(**defaults.eft).resolve(list(roles))
            except SpecError as err:
                raise ValueError(f"defaults.{err.field}: {err.message}") from None
        drafter = (defaults.speculative or {}).get("drafter")
        if drafter is not None and drafter not in roles:
            raise ValueError(
                f"defaults.speculative.drafter: must be one of the roles ({', '.join(roles)}), got {drafter!r}"
            )
        return defaults

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EnsembleConfig":
        """Read and validate a YAML file; pydantic's ``ValidationError`` names bad fields,
        :class:`ConfigError` an unreadable file."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the ensemble config: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the ensemble config must be a mapping with a 'roles' key")
        return cls.model_validate(data)

    def request_defaults(self) -> RequestDefaults:
        """What unset request fields mean on the router (validated at load time)."""
        d = self.defaults or Defaults()
        return RequestDefaults.from_dicts(d.eft, d.sampling, d.speculative)

    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model_of(self.drafter)

    def model_of(self, role: str) -> str:
        """The model a role runs: its own, or its base's (an adapter role)."""
        rc = self.roles[role]
        return rc.model if rc.model is not None else self.roles[rc.base].model

    def models(self) -> dict[str, str]:
        """The roles with a model of their own (each a deployment), role -> model."""
        return {role: rc.model for role, rc in self.roles.items() if rc.model is not None}

    def adapters(self) -> dict[str, Adapter]:
        """The adapter roles, each co-served with its base."""
        return {role: Adapter(rc.adapter, rc.base) for role, rc in self.roles.items() if rc.adapter is not None}

    def served_by(self) -> dict[str, str]:
        """Adapter role -> the role whose deployment serves it."""
        return {role: a.base for role, a in self.adapters().items()}

    def worker_args(self, role: str) -> dict[str, Any]:
        """The role worker's settings that the config sets (dtype, KV cache, idle timeout)."""
        rc = self.roles[role]
        args: dict[str, Any] = {"dtype": rc.dtype, "kv_cache_bytes": rc.kv_cache_bytes}
        for name in ("max_seq_len", "session_idle_s"):
            if getattr(rc, name) is not None:
                args[name] = getattr(rc, name)
        return args

    def app_args(self, role: str) -> dict[str, Any]:
        """The arguments of role ``role``'s Serve application builder."""
        rc = self.roles[role]
        args: dict[str, Any] = {"role": role, "model": rc.model, **self.worker_args(role)}
        adapters = {r: a.path for r, a in self.adapters().items() if a.base == role}
        if adapters:
            args["adapters"] = adapters
        if rc.tp_size > 1:
            args["tp_size"] = rc.tp_size
        if self.vocab_size is not None:
            args["vocab_size"] = self.vocab_size
        return args

    def to_serve_config(self) -> dict[str, Any]:
        """A Serve deploy config (``ServeDeploySchema``): one application per role with a
        model (its adapter roles are served by it)."""
        apps = []
        for role, rc in self.roles.items():
            if rc.model is None:
                continue
            apps.append(
                {
                    "name": f"{self.app_prefix}{role}",
                    "import_path": IMPORT_PATH,
                    "route_prefix": None,
                    "args": self.app_args(role),
                    "deployments": [{"name": DEPLOYMENT_NAME, **rc.deployment_options()}],
                }
            )
        return {"applications": apps}
