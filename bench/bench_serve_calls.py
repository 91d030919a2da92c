"""The cost of one Serve handle call under the settings Ray 2.60 offers, side by side.

Each setting runs in a fresh process with its own private Ray (the throughput flag is read
when Ray and Serve start): a deployment whose method returns a ``[5, 1024]`` float32 tensor
(one role's rows for a block of 4 drafts over a 1024-token vocabulary) is called from an
asyncio caller, one call at a time (median latency) and from 16 concurrent callers (calls/s).

* default: Serve's defaults;
* gRPC transport: ``handle.options(_by_reference=False)``;
* router on the caller's loop: ``handle._init(_run_router_in_separate_loop=False)`` before
  the first call (no hop to Serve's router thread per call);
* both handle options;
* the same, and the replica's user code on its main loop
  (``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`` in the replica's runtime environment);
* throughput-optimized: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in every process before Ray
  starts (all of the above, buffered request logs, and more);
* the same without direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=0``) and with Serve's
  4 MiB message cap lifted (``roles.serve.SERVE_ENV``), as the project runs it: a direct-ingress replica reports its own running requests to the autoscaler
  (leaving out the calls that reach it by the gRPC transport), and its graceful shutdown
  runs out Serve's 20 s timeout;
* the same with Serve's per-request access log off (``logging_config`` of the deployment).

Then, in the project's setting, the wire format of the rows: one call returning the rows of
16 requests at k = 4 (``[80, V]`` float32) at V = 1024 and 32,000, as a torch tensor and
as a NumPy array (what the role deployments return: it pickles as one buffer).

  python bench/bench_serve_calls.py
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from eft_router.roles.serve import SERVE_ENV

GRPC, LOOP = {"_by_reference": False}, {"_run_router_in_separate_loop": False}
REPLICA_LOOP = {"ray_actor_options": {"runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}}
PROJECT = "the same, no direct ingress"  # as the project runs Serve
PAYLOADS = [(80, 1024), (80, 32000)]  # the rows of 16 requests at k = 4
PROJECT_ENV = {**SERVE_ENV, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
SETTINGS = {  # name: (environment before Ray starts, handle init options, handle options, deployment options)
    "default": ({}, {}, {}, {}),
    "gRPC handle transport": ({}, {}, GRPC, {}),
    "router on the caller's loop": ({}, LOOP, {}, {}),
    "both handle options": ({}, LOOP, GRPC, {}),
    "both, replica code on its loop": ({}, LOOP, GRPC, REPLICA_LOOP),
    "RAY_SERVE_THROUGHPUT_OPTIMIZED=1": ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, {}, {}, {}),
    PROJECT: (PROJECT_ENV, {}, {}, {}),
    "the same, access log off": (PROJECT_ENV, {}, {}, {"logging_config": {"enable_access_log": False}}),
}


def child(init: dict, options: dict, deployment: dict, calls: int, payloads: bool) -> dict[str, float]:
    import ray
    import torch
    from ray import serve

    @serve.deployment(max_ongoing_requests=64, **deployment)
    class Rows:
        def __init__(self) -> None:
            self.payloads = {shape: torch.randn(*shape) for shape in [(5, 1024), *PAYLOADS]}

        async def rows(self, shape: tuple[int, int] = (5, 1024), numpy: bool = False):
            rows = self.payloads[tuple(shape)]
            return rows.numpy() if numpy else rows

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        serve.run(Rows.bind(), name="rows", route_prefix=None)

        async def measure() -> dict[str, float]:
            handle = serve.get_deployment_handle("Rows", app_name="rows")
            if init:
                handle._init(**init)  # before the first call, on the loop that will use it
            if options:
                handle = handle.options(**options)
            for _ in range(50):
                await handle.rows.remote()
            one = []
            for _ in range(calls):
                started = time.perf_counter()
                await handle.rows.remote()
                one.append(time.perf_counter() - started)

            async def caller() -> None:
                for _ in range(calls // 4):
                    await handle.rows.remote()

            started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(16)))
            result = {"one_ms": 1e3 * statistics.median(one), "calls_per_s": 16 * (calls // 4) / (time.perf_counter() - started)}
            for shape in PAYLOADS if payloads else ():
                for numpy in (False, True):
                    times = []
                    for _ in range(calls // 4):
                        started = time.perf_counter()
                        await handle.rows.remote(shape, numpy)
                        times.append(time.perf_counter() - started)
                    result[f"{shape[0]}x{shape[1]} {'NumPy array' if numpy else 'torch tensor'}"] = 1e3 * statistics.median(times)
            await handle.shutdown_async()  # on this loop: a router bound to it cannot outlive it
            return result

        return asyncio.run(measure())
    finally:
        ray.shutdown()  # the private cluster whole (see services.launch.ray_session)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, init, options, deployment = SETTINGS[sys.argv[2]]
        print(json.dumps(child(init, options, deployment, int(sys.argv[3]), sys.argv[2] == PROJECT)))
        return
    calls = 400
    print(f"a handle call returning a [5, 1024] float32 tensor; median of {calls} single calls, and 16 concurrent callers")
    print(f"{'setting':<36} {'one call ms':>12} {'16 callers calls/s':>19}")
    for name, (env, *_) in SETTINGS.items():
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, str(calls)],
            env={**os.environ, **env}, capture_output=True, text=True, check=True, timeout=600,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<36} {r['one_ms']:>12.2f} {r['calls_per_s']:>19.0f}", flush=True)
        if name == PROJECT:
            formats = {key: ms for key, ms in r.items() if key not in ("one_ms", "calls_per_s")}
    print()
    print(f"the rows' wire format ({PROJECT}): median of {calls // 4} single calls")
    print(f"{'rows':<12} {'torch tensor ms':>16} {'NumPy array ms':>15} {'tensor / array':>15}")
    for rows, cols in PAYLOADS:
        tensor, array = formats[f"{rows}x{cols} torch tensor"], formats[f"{rows}x{cols} NumPy array"]
        print(f"{f'[{rows}, {cols}]':<12} {tensor:>16.2f} {array:>15.2f} {tensor / array:>15.2f}")


if __name__ == "__main__":
    main()
