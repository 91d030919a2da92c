"""The cost of one Serve handle call under the settings Ray 2.60 offers, side by side.

Each setting runs in a fresh process with its own private Ray (the throughput flag is read
when Ray and Serve start): a deployment whose method returns a ``[5, 1024]`` float32 tensor
(one role's rows for a block of 4 drafts over a 1024-token vocabulary) is called from an
asyncio caller, one call at a time (median latency) and from 16 concurrent callers (calls/s).

* default: Serve's defaults;
* gRPC transport: ``handle.options(_by_reference=False)``;
* throughput-optimized: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in every process before Ray
  starts (user code and the handle's router on the callers' event loops, gRPC transport,
  buffered request logs);
* both.

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

SETTINGS = {
    "default": ({}, True),
    "gRPC handle transport": ({}, False),
    "RAY_SERVE_THROUGHPUT_OPTIMIZED=1": ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, True),
}


def child(by_reference: bool, calls: int) -> dict[str, float]:
    import ray
    import torch
    from ray import serve

    @serve.deployment(max_ongoing_requests=64)
    class Rows:
        async def rows(self) -> torch.Tensor:
            return torch.zeros(5, 1024)

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(Rows.bind(), name="rows", route_prefix=None)
        if not by_reference:
            handle = handle.options(_by_reference=False)

        async def measure() -> dict[str, float]:
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
            return {"one_ms": 1e3 * statistics.median(one), "calls_per_s": 16 * (calls // 4) / (time.perf_counter() - started)}

        result = asyncio.run(measure())
        serve.shutdown()
        return result
    finally:
        ray.shutdown()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2] == "1", int(sys.argv[3]))))
        return
    calls = 400
    print(f"a handle call returning a [5, 1024] float32 tensor; median of {calls} single calls, and 16 concurrent callers")
    print(f"{'setting':<36} {'one call ms':>12} {'16 callers calls/s':>19}")
    for name, (env, by_reference) in SETTINGS.items():
        out = subprocess.run(
            [sys.executable, __file__, "--child", "1" if by_reference else "0", str(calls)],
            env={**os.environ, **env}, capture_output=True, text=True, check=True, timeout=600,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<36} {r['one_ms']:>12.2f} {r['calls_per_s']:>19.0f}", flush=True)


if __name__ == "__main__":
    main()
