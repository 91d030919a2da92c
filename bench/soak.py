"""Soak: N streams for M minutes against a router, mixed requests, some cancelled.

Starts the router itself (``eft serve``, the embedded family, on the in-process backend or
on a private local Ray with ``--local``) so that it can watch its processes, or joins one
at ``--target``. Each stream sends requests back to back: greedy and seeded, plain and
speculative, up-scaled and interpolated, stop strings, short and long; one in
``--cancel-every`` is abandoned after its first chunk. One stream in ``--http-every``
sends its requests through the OpenAI-compatible HTTP API (the official ``openai`` client)
instead of gRPC. Health is polled every second throughout.

It prints errors by status (cancellations it made itself are expected, anything else is
not), p50 and p99 latency and time to first token, health NOT_SERVING counts, and the
resident memory of the router and of every Serve replica (on ``--local``) over time: after
warm-up it should stay flat.

  python bench/soak.py --streams 64 --minutes 10            # in-process backend
  python bench/soak.py --streams 16 --minutes 5 --local     # roles as Serve deployments
  python bench/soak.py --target localhost:50051 --http-target http://localhost:8080/v1 --streams 8 --minutes 1
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import openai

from load import quantile, serve_process
from eft_router.server.client import AsyncEFTClient

QUESTIONS = ["What is the birthplace of Ada Park?", "Who employs Tada Lozo?", "What is the profession of Brennis Ralli?", "Tell me about w1."]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def replica_pids() -> dict[str, int]:
    """Serve replica processes on this machine, by the role their command line names."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ServeReplica:eft-" in cmd:
            role = cmd.split("ServeReplica:eft-", 1)[1].split(":")[0].split("#")[0].split()[0]
            out[f"{role}:{proc.name}"] = int(proc.name)
    return out


def request_params(rng: random.Random) -> dict:
    kind = rng.choice(["greedy", "seeded", "long", "stop", "interpolate"])
    params = dict(max_tokens=rng.choice([8, 16, 32]), k=rng.choice([0, 2, 4]))
    if kind == "greedy":
        params.update(temperature=0.0)
    elif kind == "seeded":
        params.update(temperature=1.0, seed=rng.randrange(1 << 30), top_p=0.9)
    elif kind == "long":
        params.update(temperature=0.8, max_tokens=96, ignore_eos=True)
    elif kind == "stop":
        params.update(temperature=0.0, stop=["is"])
    else:
        params.update(preset="interpolate", deltas={"ft_small": 0.5, "ft_small_safe": 0.5}, temperature=0.7)
    return params


def openai_params(params: dict) -> dict:
    """The same request for the OpenAI-compatible API: standard fields, EFT ones in extra_body."""
    extra = {"speculative": {"k": params.pop("k")}}
    if params.pop("ignore_eos", False):
        extra["ignore_eos"] = True
    if "preset" in params:
        extra["eft"] = {"preset": params.pop("preset"), "deltas": params.pop("deltas")}
    return {**params, "extra_body": extra}


async def soak(target: str, http_target: str | None, streams: int, seconds: float, cancel_every: int, http_every: int, watch, report_every: float) -> None:
    statuses: collections.Counter = collections.Counter()
    latencies, ttfts, health = [], [], collections.Counter()
    done = time.monotonic() + seconds
    http = openai.AsyncOpenAI(base_url=http_target, api_key=os.environ.get("EFT_AUTH_TOKEN", "unused"), max_retries=0, timeout=120) if http_target else None

    async with AsyncEFTClient(target, timeout=120) as client:

        async def chunks(over_http: bool, question: str, params: dict):
            messages = [{"role": "user", "content": question}]
            if not over_http:
                async for chunk in client.stream(messages, **params):
                    yield chunk
                return
            async with await http.chat.completions.create(model="eft", messages=messages, stream=True, **openai_params(params)) as events:
                async for event in events:
                    yield event

        async def stream(i: int) -> None:
            rng = random.Random(i)
            over_http = http is not None and http_every > 0 and i % http_every == http_every - 1
            front = "HTTP" if over_http else "gRPC"
            n = 0
            while time.monotonic() < done:
                n += 1
                started, first = time.monotonic(), None
                cancel = n % cancel_every == 0
                try:
                    async for _ in chunks(over_http, rng.choice(QUESTIONS), request_params(rng)):
                        first = first or time.monotonic()
                        if cancel:
                            break
                    statuses[f"{front} cancelled (by the soak)" if cancel else f"{front} OK"] += 1
                    if not cancel:
                        latencies.append(time.monotonic() - started)
                        ttfts.append((first or time.monotonic()) - started)
                except grpc.RpcError as err:
                    statuses[f"gRPC {err.code().name}"] += 1
                except openai.APIStatusError as err:
                    statuses[f"HTTP {err.status_code}"] += 1
                except openai.APIError as err:
                    statuses[f"HTTP {type(err).__name__}"] += 1

        async def poll_health() -> None:
            while time.monotonic() < done:
                try:
                    health[await client.health(timeout=2)] += 1
                except grpc.RpcError as err:
                    health[f"error {err.code().name}"] += 1
                await asyncio.sleep(1)

        async def report() -> None:
            started = time.monotonic()
            while time.monotonic() < done:
                watch(time.monotonic() - started)
                await asyncio.sleep(report_every)

        await asyncio.gather(*(stream(i) for i in range(streams)), poll_health(), report())
    if http is not None:
        await http.close()

    print()
    print(f"{streams} streams for {seconds / 60:.1f} min: {sum(statuses.values())} requests")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in statuses.most_common()))
    unexpected = sum(v for k, v in statuses.items() if not k.endswith((" OK", "(by the soak)")))
    print(f"unexpected errors: {unexpected}")
    print(f"latency p50 {quantile(latencies, 0.5):.2f} s, p99 {quantile(latencies, 0.99):.2f} s; "
          f"time to first token p50 {quantile(ttfts, 0.5):.2f} s, p99 {quantile(ttfts, 0.99):.2f} s")
    print("health polls: " + ", ".join(f"{k} {v}" for k, v in health.most_common()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--local", action="store_true", help="roles as Serve deployments on a private Ray (default: in-process)")
    parser.add_argument("--target", default=None, help="a running router instead of starting one")
    parser.add_argument("--cancel-every", type=int, default=7, help="abandon every n-th request of a stream after its first chunk")
    parser.add_argument("--http-every", type=int, default=4, help="every n-th stream uses the OpenAI-compatible HTTP API (0: none)")
    parser.add_argument("--http-target", default=None, help="with --target: the router's OpenAI base URL (http://host:8080/v1)")
    parser.add_argument("--report-every", type=float, default=30.0, help="seconds between memory readings")
    args = parser.parse_args()

    with ExitStack() as stack:
        if args.target:
            proc, target, http_target = None, args.target, args.http_target
        else:
            proc, port, http_port = stack.enter_context(serve_process(["--local" if args.local else "--in-process"]))
            target, http_target = f"localhost:{port}", f"http://127.0.0.1:{http_port}/v1"
        run(args, proc, target, http_target)


def run(args: argparse.Namespace, proc: subprocess.Popen | None, target: str, http_target: str | None) -> None:
    rows: list[tuple[float, dict[str, float]]] = []

    def watch(elapsed: float) -> None:
        pids = {"router": proc.pid} if proc else {}
        pids.update(replica_pids())
        reading = {name: rss_mb(pid) for name, pid in pids.items()}
        rows.append((elapsed, {k: v for k, v in reading.items() if v is not None}))
        print(f"  {elapsed:6.0f} s  " + "  ".join(f"{k} {v:.0f} MB" for k, v in rows[-1][1].items()), flush=True)

    print(f"soak: {args.streams} streams for {args.minutes} min against {target} (and {http_target}); resident memory every {args.report_every:.0f} s:")
    asyncio.run(soak(target, http_target, args.streams, 60 * args.minutes, args.cancel_every, args.http_every, watch, args.report_every))
    if len(rows) >= 3:
        warm, last = rows[1][1], rows[-1][1]  # after the first reading (warm-up)
        growth = {k: 100 * (last[k] - warm[k]) / warm[k] for k in last if k in warm}
        print("memory growth after warm-up: " + ", ".join(f"{k} {g:+.1f}%" for k, g in growth.items()))


if __name__ == "__main__":
    main()
