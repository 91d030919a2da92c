"""Starting the whole service and stopping it: Ray, the role deployments, the gRPC router.

``eft serve`` and ``eft demo`` run through here. The router is built on either backend from
the same ensemble config: ``serve`` (each role a Ray Serve deployment, reached by handles)
or ``local`` (every role in the router's process, no Ray).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from contextlib import ExitStack, contextmanager
from typing import Awaitable, Callable, Iterator, Literal, Mapping, Sequence

from transformers import AutoTokenizer

from eft_router.demo import DemoQuestion, DemoReport, run_demo
from eft_router.roles.adapters import check_adapter
from eft_router.roles.local import load_local_roles
from eft_router.roles.models import check_model
from eft_router.roles.serve import aconnect_serve_roles
from eft_router.server.client import EFTClient
from eft_router.server.grpc_server import Router, RouterThread

from .config import EnsembleConfig

log = logging.getLogger(__name__)
Backend = Literal["serve", "local"]


def family_config(paths: Mapping[str, str], num_cpus: float = 0.25) -> EnsembleConfig:
    """One replica per role of a model family on one machine. Tiny models: a quarter of a
    core each (Ray then gives every replica one OpenMP thread) and room for 8 concurrent
    calls per replica."""
    roles = {
        role: {"model": path, "num_replicas": 1, "max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": num_cpus}}
        for role, path in paths.items()
    }
    return EnsembleConfig.model_validate({"roles": roles})


@contextmanager
def ray_session(address: str | None) -> Iterator[bool]:
    """Connect to the Ray cluster at ``address`` (``auto``: the one this machine belongs to),
    or, with None, start a private local one and stop it on exit. Yields whether it started one.

    A private cluster is stopped whole (``ray.shutdown`` ends every process of it, Serve's
    controller and replicas included), without ``serve.shutdown`` first: with Serve's
    throughput-optimized settings that call waits out its 30 s timeout for a controller
    that is already gone."""
    import ray

    if address is None:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        yield address is None
    finally:
        disconnect_ray()


def disconnect_ray() -> None:
    """``ray.shutdown`` for good: Serve's handle routers keep a metrics thread that calls
    ``ray.wait`` after the driver disconnects, and Ray's auto-connect would then join the
    cluster again (or start a new local one), so auto-connect goes off first."""
    import ray
    from ray._private import auto_init_hook

    auto_init_hook.enable_auto_connect = False
    ray.shutdown()


def check_models(config: EnsembleConfig) -> None:
    """Every role's model path, checked here (fast, one line naming what is wrong) before
    replicas on this machine would fail on it one by one."""
    for role, model in config.models().items():
        check_model(role, model, need_tokenizer=config.vocab_size is None)
    for role, adapter in config.adapters().items():
        check_adapter(role, adapter.path, adapter.base, config.model_of(adapter.base))


def deploy(config: EnsembleConfig) -> None:
    """Start Serve (no HTTP proxy: the router reaches roles by handles) and deploy every role,
    waiting until all replicas run."""
    from ray import serve

    from .app import deploy_ensemble

    serve.start(proxy_location="Disabled")
    deploy_ensemble(config)


def router_factory(config: EnsembleConfig, backend: Backend) -> Callable[[], Awaitable[Router]]:
    """An async function that builds the router (on the loop that will run it)."""
    router_config = config.router.with_env()

    async def make() -> Router:
        if backend == "local":
            models = config.models()
            roles, tokenizer = load_local_roles(models, {role: config.worker_args(role) for role in models}, config.adapters())
        else:
            roles = await aconnect_serve_roles(
                list(config.roles), call_timeout_s=router_config.role_timeout_s, app_prefix=config.app_prefix, served_by=config.served_by()
            )
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path())
        return Router(roles, tokenizer, router_config, config.request_defaults(), backend, config.drafter, owns_roles=True)

    return make


async def _serve_until_signalled(make_router: Callable[[], Awaitable[Router]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    router = await make_router()
    port = await router.start()
    http = f", OpenAI-compatible HTTP on {router.config.http_host or router.config.host}:{router.http_port}" if router.http_port else ""
    print(f"EFT router listening on {router.config.host}:{port} (gRPC){http} (Ctrl-C stops it)", flush=True)
    await stop.wait()
    print(f"stopping: in-flight requests get {router.config.grace_s} s", flush=True)
    await router.stop()


def serve_forever(config: EnsembleConfig, backend: Backend, address: str | None, deploy_roles: bool) -> None:
    """``eft serve``: the router (and, with ``deploy_roles``, the role deployments) until
    SIGINT or SIGTERM; then a graceful stop, and Ray shut down if this process started it."""
    if backend == "local":
        asyncio.run(_serve_until_signalled(router_factory(config, "local")))
        return
    if address is None:  # a private Ray on this machine: the replicas read these paths
        check_models(config)
    with ray_session(address):
        if deploy_roles:
            deploy(config)
        asyncio.run(_serve_until_signalled(router_factory(config, "serve")))


def _free_port() -> int:
    """A port for the demo's HTTP API (the HTTP port has no 'any free port' value: 0 is off)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo(config: EnsembleConfig, questions: Sequence[DemoQuestion], backend: Backend | None = None, max_tokens: int = 24, k: int = 4) -> DemoReport:
    """``make demo``: start Ray (private), deploy every role, start the router on a free port,
    run the demo's requests through the gRPC client, and stop everything. ``backend`` None
    is the config's ``router.backend``."""
    backend = backend or config.router.backend
    http_port = config.router.http_port and _free_port()
    config = config.model_copy(update={"router": config.router.model_copy(update={"port": 0, "http_port": http_port})})
    started = time.perf_counter()
    check_models(config)
    with ExitStack() as stack:
        if backend == "serve":
            stack.enter_context(ray_session(None))
            print(f"starting Ray and deploying {len(config.roles)} roles as Serve deployments ...", flush=True)
            deploy(config)
        router = stack.enter_context(RouterThread(router_factory(config, backend)))
        client = stack.enter_context(EFTClient(f"localhost:{router.port}"))
        print(f"ready in {time.perf_counter() - started:.0f} s; health {client.health()}", flush=True)
        base_url = f"http://localhost:{router.router.http_port}/v1" if http_port else None
        report = run_demo(client, questions, max_tokens=max_tokens, k=k, http_base_url=base_url)
        print("\nshutting down ...", flush=True)
    print("done.", flush=True)
    return report
