"""Wait until a Ray cluster runs every role of an ensemble config, then run a command.

The ``eft-router`` sidecar of deploy/rayservice.yaml starts together with the Ray head, but
KubeRay deploys the roles (``spec.serveConfigV2``) only once the head pod is ready, and the
replicas take a while to load. ``eft serve`` without ``--deploy`` needs every role's Serve
application running when it starts (it exits otherwise), so the sidecar runs

    python /app/deploy/wait_for_roles.py --config /app/deploy/ensemble.yaml -- \\
        eft serve --config /app/deploy/ensemble.yaml --address 127.0.0.1:6379

This polls the Ray dashboard's Serve REST API (``GET /api/serve/applications/``, what
KubeRay and ``serve status`` read; bearer token from ``RAY_AUTH_TOKEN`` when set) until
every ``eft-<role>`` application of the config is RUNNING, then replaces itself with the
command, which thus receives Kubernetes' SIGTERM directly. A refused token (401/403) ends
it with an error instead of waiting forever. Exit status 0 without a command.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Mapping, Sequence

RUNNING = "RUNNING"


class AuthRefused(RuntimeError):
    """The dashboard refused the token: waiting longer cannot help."""


def app_names(config_path: str) -> list[str]:
    """The Serve applications of the ensemble config (validated as ``eft serve`` would)."""
    from services.config import EnsembleConfig

    return [app["name"] for app in EnsembleConfig.from_yaml(config_path).to_serve_config()["applications"]]


def fetch_statuses(dashboard: str, token: str | None, timeout_s: float = 5.0) -> dict[str, str]:
    """Application name -> status, from the dashboard (empty while Serve is not running)."""
    request = urllib.request.Request(dashboard.rstrip("/") + "/api/serve/applications/")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            details = json.load(response)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise AuthRefused(f"the Ray dashboard at {dashboard} refused the token (HTTP {err.code}); check RAY_AUTH_TOKEN") from err
        raise
    return {name: str(app.get("status")) for name, app in (details.get("applications") or {}).items()}


def not_running(wanted: Sequence[str], statuses: Mapping[str, str]) -> dict[str, str]:
    """The wanted applications that are not RUNNING, with their status."""
    return {name: statuses.get(name, "NOT_DEPLOYED") for name in wanted if statuses.get(name) != RUNNING}


def wait_for(
    wanted: Sequence[str],
    fetch: Callable[[], Mapping[str, str]],
    interval_s: float = 5.0,
    timeout_s: float | None = None,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Poll ``fetch`` until every wanted application is RUNNING; logs each change of state."""
    deadline = None if timeout_s is None else clock() + timeout_s
    last = None
    while True:
        try:
            state = not_running(wanted, fetch())
        except AuthRefused:
            raise
        except Exception as err:  # dashboard not up yet, GCS restarting, ...
            state = {"dashboard": f"unreachable ({type(err).__name__}: {err})"}
        if not state:
            log(f"all {len(wanted)} role applications are RUNNING")
            return
        text = ", ".join(f"{k}={v}" for k, v in state.items())
        if text != last:
            log(f"waiting for role applications: {text}")
            last = text
        if deadline is not None and clock() >= deadline:
            raise TimeoutError(f"role applications not RUNNING after {timeout_s} s: {text}")
        sleep(interval_s)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s --config FILE [options] [-- COMMAND ...]")
    parser.add_argument("--config", required=True, help="ensemble config YAML (its roles are waited for)")
    parser.add_argument("--dashboard", default=os.environ.get("EFT_RAY_DASHBOARD", "http://127.0.0.1:8265"))
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: never)")
    args = parser.parse_args(argv)

    # PID 1 of a container ignores SIGTERM unless it handles it: stop waiting when told to.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    wanted = app_names(args.config)
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip() or None
    log = lambda line: print(f"wait_for_roles: {line}", flush=True)  # noqa: E731
    try:
        wait_for(wanted, lambda: fetch_statuses(args.dashboard, token), args.interval, args.timeout, log)
    except (AuthRefused, TimeoutError) as err:
        log(f"error: {err}")
        return 1
    if command:
        log(f"exec {' '.join(command)}")
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
