"""The router: ``eft.v1.EFTService`` over gRPC and the OpenAI-compatible HTTP API (on its own
port, ``router.http_port``), both over one :class:`Engine`, with the standard health and
reflection services, optional TLS (gRPC) and bearer-token authentication (both), one
concurrency limit and one set of metrics.

The backend (Ray Serve deployments or in-process roles) is whatever the roles are; the
router builds its engine over them, each role wrapped to time its calls, with the scheduler
limits of its config. Health is NOT_SERVING until every role has answered a probe, and is
kept current by probing every ``health_interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Awaitable, Callable, Iterator, Mapping

import uvicorn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import PreTrainedTokenizerBase

from ..api import eft_pb2, eft_pb2_grpc
from ..core.spec import FT_SMALL, SpecError
from ..engine import Engine, StepStats
from ..roles.interface import Role, backends, wrap_backends
from .auth import BearerAuthInterceptor
from .config import RouterConfig
from .front import Admission
from .messages import RequestDefaults
from .metrics import Metrics, TimedRole
from .openai_api import OpenAIFront, create_app
from .servicer import EFTServicer

log = logging.getLogger(__name__)

SERVICE_NAME = eft_pb2.DESCRIPTOR.services_by_name["EFTService"].full_name  # "eft.v1.EFTService"


def _credentials(config: RouterConfig) -> grpc.ServerCredentials | None:
    tls = config.tls
    if tls is None:
        return None
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _check_defaults(defaults: RequestDefaults, roles: Mapping[str, Role], drafter: str | None) -> None:
    """Refuse a server whose own defaults it cannot serve: every request that relies on
    them would fail."""
    try:
        defaults.eft.resolve(list(roles))
    except SpecError as err:
        raise ValueError(
            f"the server's default EFT spec cannot be served: {err}; add the role or set defaults.eft"
        ) from None
    if defaults.speculative.k > 0:
        name = defaults.speculative.drafter or drafter
        if name not in roles:
            raise ValueError(
                f"the server's default speculative drafter {name!r} is not served (served: {', '.join(roles)}); "
                "set defaults.speculative.drafter or add the role"
            )


class Router:
    """One gRPC server over an engine on ``roles``. ``start`` binds and serves; ``stop``
    drains within the grace period."""

    def __init__(
        self,
        roles: Mapping[str, Role],
        tokenizer: PreTrainedTokenizerBase,
        config: RouterConfig = RouterConfig(),
        defaults: RequestDefaults = RequestDefaults(),
        backend: str = "local",
        drafter: str | None = FT_SMALL,
        owns_roles: bool = False,
    ) -> None:
        _check_defaults(defaults, roles, drafter)
        self.roles = dict(roles)
        self.owns_roles = owns_roles  # close them when the router stops (the router built them)
        self.config = config
        self.metrics = Metrics()
        timed = wrap_backends(roles, lambda backend: TimedRole(backend, self.metrics))
        self.engine = Engine(timed, tokenizer, drafter, config.scheduler(), on_step=self._observe)
        self.admission = Admission(config.max_concurrent_requests, self.metrics)
        self.servicer = EFTServicer(self.engine, defaults, self.metrics, backend, self.admission, config.max_message_bytes)
        self.health = health.aio.HealthServicer()
        self.serving = False  # what health says (the HTTP API's /health reads it too)
        self.openai = OpenAIFront(self.engine, defaults, self.admission, self.metrics, config.tokens(), lambda: self.serving)
        self.port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._http: _HTTPServer | None = None
        self._http_task: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._metrics_http = None

    async def start(self) -> int:
        """Bind, serve, and wait until every role answers (health SERVING); returns the port."""
        tokens = self.config.tokens()
        self._server = server = grpc.aio.server(
            interceptors=[BearerAuthInterceptor(tokens)] if tokens else [],
            options=[("grpc.max_receive_message_length", self.config.max_message_bytes), ("grpc.so_reuseport", 0)],
        )
        eft_pb2_grpc.add_EFTServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.config.host}:{self.config.port}"
        credentials = _credentials(self.config)
        self.port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        try:
            if self.config.http_port:
                await self._start_http()
            if self.config.metrics_port is not None:
                from prometheus_client import start_http_server

                self._metrics_http, _ = start_http_server(self.config.metrics_port, self.config.host, self.metrics.registry)
                self.metrics_port = self._metrics_http.server_port
            # replicas may still be starting: the first probe waits longer than later ones
            await self._probe_roles(self.config.health_interval_s * 6, raise_errors=True)
        except BaseException:
            await self.stop(grace_s=0)  # nothing stays bound or running behind a failed start
            raise
        self._watch = asyncio.create_task(self._watch_roles())
        log.info("EFT router serving on %s (port %d, %s)", self.config.host, self.port, "TLS" if credentials else "plaintext")
        return self.port

    async def _start_http(self) -> None:
        """The OpenAI-compatible API on its own port (a socket bound here, so that a port in
        use fails the start at once)."""
        host = self.config.http_host or self.config.host
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without
        # it a stream's small writes waited for delayed ACKs (~40 ms each)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, self.config.http_port))
        except OSError as err:
            sock.close()
            raise OSError(f"cannot listen for HTTP on {host}:{self.config.http_port}: {err}") from None
        sock.listen(1024)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.openai), lifespan="off", log_level="warning", access_log=False,
            timeout_graceful_shutdown=max(self.config.grace_s, 0.1),
        )
        self._http = _HTTPServer(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises what stopped it
            await asyncio.sleep(0.01)

    def _observe(self, step: StepStats) -> None:
        self.metrics.step_seconds.observe(step.seconds)
        self.metrics.step_requests.observe(step.requests)
        self.metrics.waiting.set(step.waiting)

    async def _set_health(self, status: int) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _probe_roles(self, timeout_s: float, raise_errors: bool = False) -> None:
        """Every role (on Serve: every replica) answers a no-op call within ``timeout_s``,
        or health is NOT_SERVING: a client would get UNAVAILABLE from a role that cannot."""
        try:
            await asyncio.gather(*(b.probe(timeout_s) for b in backends(self.engine.roles)))
        except Exception as err:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            if raise_errors:
                raise
            log.warning("health: NOT_SERVING: %s", err)
        else:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _watch_roles(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self._probe_roles(self.config.health_timeout_s)

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, give in-flight ones ``grace_s`` (default: the config's), then
        cancel them (their sessions are released as they unwind)."""
        if self._watch is not None:
            self._watch.cancel()
        grace = self.config.grace_s if grace_s is None else grace_s
        self.serving = False
        stopping = []
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            stopping.append(self._server.stop(grace))
        if self._http is not None:
            self._http.should_exit = True  # drains its requests for grace_s, then cancels them
            stopping.append(asyncio.wait_for(asyncio.shield(self._http_task), grace + 5))
            self._http = None
        await asyncio.gather(*stopping, return_exceptions=True)
        await self.engine.close()
        if self.owns_roles:
            await asyncio.gather(*(b.close() for b in backends(self.roles) if hasattr(b, "close")))
            self.owns_roles = False
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


class _HTTPServer(uvicorn.Server):
    """uvicorn without its signal handlers: the router's process owns its signals (``eft
    serve`` stops gRPC and HTTP together, gracefully)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RouterThread:
    """A router on its own event loop in a background thread (tests, the demo, notebooks).

    ``make_router`` runs on that loop, so engines whose roles are bound to a loop (Serve
    handles connected with ``aconnect_serve_roles``) are built where they are used.
    """

    def __init__(self, make_router: Callable[[], Awaitable[Router]]) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"eft-router-{uuid.uuid4().hex[:6]}", daemon=True)
        self._thread.start()
        try:
            self.router: Router = self.run(make_router())
            self.port: int = self.run(self.router.start())
        except BaseException:
            self.close(stop_router=False)
            raise

    def run(self, coro: Awaitable, timeout: float | None = None):
        """Run ``coro`` on the router's loop and wait for its result."""
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def close(self, grace_s: float | None = None, stop_router: bool = True) -> None:
        if stop_router:
            self.run(self.router.stop(grace_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def __enter__(self) -> "RouterThread":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
