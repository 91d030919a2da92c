"""The router's own settings: where it listens, TLS, bearer tokens, limits, metrics.

They come from the ``router:`` section of the ensemble config file, and then from the
environment, which wins (so a Kubernetes Secret can supply tokens and certificates without
a new config file):

==============================  ==========================================================
``EFT_ROUTER_HOST``             host
``EFT_ROUTER_PORT``             port
``EFT_AUTH_TOKENS``             comma-separated bearer tokens (replaces ``auth_tokens``)
``EFT_AUTH_TOKEN_FILE``         a file with one token per line
``EFT_TLS_CERT`` / ``EFT_TLS_KEY``  server certificate chain and key (PEM files)
``EFT_TLS_CLIENT_CA``           CA bundle: client certificates signed by it are required
``EFT_METRICS_PORT``            Prometheus metrics port (0 picks one)
``EFT_HTTP_HOST``               host of the OpenAI-compatible HTTP API
``EFT_HTTP_PORT``               its port (0 turns the HTTP API off)
==============================  ==========================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from ..engine.scheduler import SchedulerConfig

DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8080


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Strict):
    """Server TLS. With ``client_ca_file`` the server requires client certificates (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @model_validator(mode="after")
    def _files_exist(self) -> "TLSConfig":
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"tls.{name}: no such file: {path}")
        return self


class RouterConfig(_Strict):
    """Every field has a default: an empty ``router:`` section is a plain local server on
    127.0.0.1:50051 with no TLS and no authentication."""

    backend: Literal["serve", "local"] = "serve"  # roles as Serve deployments, or in the router's process
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)  # 0: any free port
    max_concurrent_requests: int = Field(default=256, ge=1)  # calls in flight, beyond it RESOURCE_EXHAUSTED
    max_num_seqs: int = Field(default=64, ge=1)  # requests the engine runs at once (also bounded by the roles' KV slots)
    max_num_batched_tokens: int = Field(default=512, ge=1)  # tokens one step feeds the roles; longer prompts are chunked
    max_queued_requests: int = Field(default=256, ge=1)  # requests waiting for admission, beyond it RESOURCE_EXHAUSTED
    max_message_bytes: int = Field(default=4 << 20, ge=1024, le=1 << 30)
    grace_s: float = Field(default=5.0, ge=0)  # in-flight work gets this long at shutdown
    role_timeout_s: float | None = Field(default=120.0, gt=0)  # per role call (Serve backend)
    health_interval_s: float = Field(default=5.0, gt=0)  # how often the roles are probed
    health_timeout_s: float = Field(default=2.0, gt=0)  # a replica that does not answer a probe this fast: NOT_SERVING
    auth_tokens: list[SecretStr] = Field(default_factory=list)
    auth_token_file: Path | None = None
    tls: TLSConfig | None = None
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    http_host: str | None = None  # the OpenAI-compatible HTTP API's host (default: ``host``)
    http_port: int = Field(default=DEFAULT_HTTP_PORT, ge=0, le=65535)  # 0: no HTTP API

    @model_validator(mode="after")
    def _token_file_exists(self) -> "RouterConfig":
        if self.auth_token_file is not None and not self.auth_token_file.is_file():
            raise ValueError(f"auth_token_file: no such file: {self.auth_token_file}")
        return self

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_queued_requests)

    def tokens(self) -> list[str]:
        """Every accepted bearer token (empty: authentication is off)."""
        tokens = [t.get_secret_value() for t in self.auth_tokens]
        if self.auth_token_file is not None:
            tokens += [line.strip() for line in self.auth_token_file.read_text().splitlines() if line.strip()]
        return tokens

    def with_env(self, env: Mapping[str, str] | None = None) -> "RouterConfig":
        """This config with the ``EFT_*`` environment variables applied (validated again)."""
        env = os.environ if env is None else env
        data = self.model_dump()
        data["auth_tokens"] = [t.get_secret_value() for t in self.auth_tokens]
        for var, key, cast in (
            ("EFT_ROUTER_HOST", "host", str),
            ("EFT_ROUTER_PORT", "port", int),
            ("EFT_METRICS_PORT", "metrics_port", int),
            ("EFT_HTTP_HOST", "http_host", str),
            ("EFT_HTTP_PORT", "http_port", int),
            ("EFT_AUTH_TOKEN_FILE", "auth_token_file", str),
        ):
            if env.get(var):
                data[key] = cast(env[var])
        if env.get("EFT_AUTH_TOKENS"):
            data["auth_tokens"] = [t.strip() for t in env["EFT_AUTH_TOKENS"].split(",") if t.strip()]
        if env.get("EFT_TLS_CERT") or env.get("EFT_TLS_KEY"):
            data["tls"] = {"cert_file": env.get("EFT_TLS_CERT"), "key_file": env.get("EFT_TLS_KEY"), "client_ca_file": env.get("EFT_TLS_CLIENT_CA")}
        elif env.get("EFT_TLS_CLIENT_CA") and data["tls"] is not None:
            data["tls"]["client_ca_file"] = env["EFT_TLS_CLIENT_CA"]
        return RouterConfig.model_validate(data)
