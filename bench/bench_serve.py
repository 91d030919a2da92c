"""EFT through Ray Serve against the in-process engine: tokens/s, per-block time split, bytes per block.

One run starts a private local Ray, deploys base_large, base_small and ft_small as Serve
deployments (``services.launch.family_config``: one replica per role, a quarter core each)
and loads the same three models in this process (``Engine.local``). The same decoder runs
on both backends: plain EFT (k=0) and speculative EFT (k=4 by default), greedy, EOS
ignored, a fixed number of new tokens per session, at 1 and 8 concurrent sessions
(``asyncio.gather`` of ``Engine.generate``). Every configuration runs once per round, rounds
interleaved, and the tables report medians over rounds: read the ratio column
(Serve / in-process), not absolute numbers (the machine is shared and noisy).

Per-block split, measured from outside the decoder (which is not changed for this):

* every role is wrapped in a timing wrapper that records (start, end) of each ``draft`` and
  ``score`` call into the current block's record (a context variable, which the decoder's
  ``asyncio.gather`` copies into its child tasks, so concurrent sessions never mix);
* the engine is a subclass whose ``_block`` times ``Engine._block`` (one draft + verify +
  combine + accept) and opens that record;
* draft = the drafter's draft call; verify = wall time of the concurrent score calls
  (latest end minus earliest start);
* combine = from the block's first call of the decoder's ``combine`` (the session resumes
  after the verify gather; found by wrapping ``eft_router.decoder.combine`` in this process
  for the run, the file unchanged) to the end of the block: combining the roles' log-probs,
  the target and drafter distributions, acceptance;
* wait = block wall - draft - verify - combine: the session was ready but the event loop
  was running something else (other sessions' turns). "combine + wait" is block wall minus
  draft and verify.

At 8 sessions the Serve calls include waiting on batching and on other sessions' calls in
the replicas; in-process, roles run inline on this one event loop, so sessions take turns
and the other sessions' turns show up as wait. Figures are per block: the mean over that
round's blocks, taken from the round whose mean block time is the median one (so the
parts add up to the block). The wrappers add a few clock reads per call to both paths alike.

Bytes per block are ``eft_router.serve_backend.block_bytes`` (what the replicas return per
block, pickled as Ray ships it) for the benchmarked k and vocabulary, and per generated token
at the measured tokens per block.

  python bench/bench_serve.py               # synthetic tiny family (as bench_engine.py)
  python bench/bench_serve.py --family      # the embedded family (eft family build)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import statistics
import tempfile
import time
from typing import Any, Awaitable, Sequence, TypeVar

import torch

from bench_engine import ROLES, bench_models, bench_prompts, concurrency_parser
from eft_router.engine import engine as decoder
from eft_router.engine import Engine
from eft_router.roles.serve import aconnect_serve_roles, block_bytes
from eft_router.core.spec import SamplingParams, SpeculativeParams

T = TypeVar("T")
_BLOCK: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bench_block", default=None)


class BlockTimedRole:
    """A role that records (start, end) of its draft and score calls into the current block."""

    def __init__(self, role: Any) -> None:
        self.role = role
        self.info = role.info

    async def _timed(self, call: str, result: Awaitable[T]) -> T:
        record = _BLOCK.get()
        started = time.perf_counter()
        try:
            return await result
        finally:
            if record is not None:
                record[call].append((started, time.perf_counter()))

    async def score(self, session_id: str, token_ids: Sequence[int], start: int) -> torch.Tensor:
        return await self._timed("score", self.role.score(session_id, token_ids, start))

    async def draft(self, *args: Any) -> Any:
        return await self._timed("draft", self.role.draft(*args))

    async def release(self, session_id: str) -> None:
        await self.role.release(session_id)


class BlockTimedEngine(Engine):
    """The unchanged decoder, with each block's wall time and role-call times recorded."""

    def __init__(self, roles: dict[str, Any], tokenizer: Any) -> None:
        super().__init__({r: BlockTimedRole(role) for r, role in roles.items()}, tokenizer)
        self.blocks: list[dict] = []

    async def _block(self, *args: Any, **kwargs: Any):
        record: dict = {"draft": [], "score": []}
        token = _BLOCK.set(record)
        started = time.perf_counter()
        try:
            return await super()._block(*args, **kwargs)
        finally:
            record["end"] = time.perf_counter()
            record["wall"] = record["end"] - started
            _BLOCK.reset(token)
            self.blocks.append(record)


@contextlib.contextmanager
def combine_marked():
    """For the run, the decoder's ``combine`` also marks in the current block record when it
    is first called (the session resumed after verify); the decoder's file is not changed."""
    original = decoder.combine

    def marked(*args: Any, **kwargs: Any):
        record = _BLOCK.get()
        if record is not None and "resumed" not in record:
            record["resumed"] = time.perf_counter()
        return original(*args, **kwargs)

    decoder.combine = marked
    try:
        yield
    finally:
        decoder.combine = original


def split(blocks: list[dict]) -> tuple[float, float, float, float, float]:
    """Mean (block, draft, verify, combine, wait) seconds per block."""
    walls, drafts, verifies, combines = [], [], [], []
    for b in blocks:
        walls.append(b["wall"])
        drafts.append(sum(e - s for s, e in b["draft"]))
        verifies.append(max(e for _, e in b["score"]) - min(s for s, _ in b["score"]) if b["score"] else 0.0)
        # No mark (a decoder that no longer calls ``combine`` in a block): all of the rest is combine.
        combines.append(b["end"] - b["resumed"] if "resumed" in b else walls[-1] - drafts[-1] - verifies[-1])
    waits = [w - d - v - c for w, d, v, c in zip(walls, drafts, verifies, combines)]
    return tuple(statistics.fmean(x) for x in (walls, drafts, verifies, combines, waits))  # type: ignore[return-value]


async def run(engine: BlockTimedEngine, prompts: list[list[int]], k: int, max_tokens: int) -> dict:
    """All sessions at once: tokens/s, the per-block split, tokens per block, the outputs."""
    engine.blocks = []
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    gens = await asyncio.gather(*(engine.generate(p, sampling=sampling, speculative=SpeculativeParams(k=k)) for p in prompts))
    seconds = time.perf_counter() - started
    tokens = sum(len(g.token_ids) for g in gens)
    return {
        "tps": tokens / seconds,
        "split": split(engine.blocks),
        "tok_per_block": tokens / sum(g.stats.blocks for g in gens),
        "outputs": [g.token_ids for g in gens],
    }


async def bench(paths: dict[str, str], args: argparse.Namespace) -> None:
    local = Engine.local(paths)
    tokenizer = local.tokenizer
    prompts = bench_prompts(local, args.family)
    engines = {
        "in-process": BlockTimedEngine(local.roles, tokenizer),
        "Serve": BlockTimedEngine(await aconnect_serve_roles(list(ROLES)), tokenizer),
    }
    ks = (0, args.k)
    configs = [(n, k, path) for n in args.sessions for k in ks for path in engines]

    for n, k, path in configs:  # warm-up: first calls, batch queues, caches
        await run(engines[path], [prompts[i % len(prompts)] for i in range(n)], k, 8)

    samples: dict[tuple, list[dict]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for n, k, path in configs:
            batch = [prompts[i % len(prompts)] for i in range(n)]
            samples[(n, k, path)].append(await run(engines[path], batch, k, args.max_tokens))

    same = all(
        s["outputs"] == l["outputs"]
        for n in args.sessions
        for k in ks
        for s, l in zip(samples[(n, k, "Serve")], samples[(n, k, "in-process")])
    )
    ref_tokens = {k: samples[(args.sessions[0], k, "in-process")][0]["outputs"][0] for k in ks}
    same_spec = ref_tokens[0] == ref_tokens[args.k]

    def med(c: tuple, f) -> float:
        return statistics.median(f(s) for s in samples[c])

    vocab = local.vocab_size
    print(
        f"{'family' if args.family else 'synthetic'} roles ({', '.join(ROLES)}; vocabulary {vocab}), "
        f"{args.max_tokens} tokens per session, greedy, medians of {args.rounds} rounds"
    )
    print(f"greedy outputs through Serve == in-process, every run: {'yes' if same else 'NO'}; "
          f"speculative == plain: {'yes' if same_spec else 'NO'}")
    print()
    print(f"{'sessions':>8} {'mode':>10} {'in-process tok/s':>17} {'Serve tok/s':>12} {'ratio':>6} {'tok/block':>10}")
    for n in args.sessions:
        for k in ks:
            lo, sv = med((n, k, "in-process"), lambda s: s["tps"]), med((n, k, "Serve"), lambda s: s["tps"])
            mode = "plain" if k == 0 else f"spec k={k}"
            tpb = med((n, k, "in-process"), lambda s: s["tok_per_block"])
            print(f"{n:>8} {mode:>10} {lo:>17.1f} {sv:>12.1f} {sv / lo:>6.2f} {tpb:>10.2f}")

    print()
    print("per-block round trip, ms (mean per block, in the round of median block time): block = draft + verify + combine + wait")
    print(f"{'sessions':>8} {'mode':>10} {'path':>11} {'block':>8} {'draft':>8} {'verify':>8} {'combine':>8} {'wait':>8}")
    for n in args.sessions:
        for k in ks:
            for path in engines:
                runs = sorted(samples[(n, k, path)], key=lambda s: s["split"][0])
                parts = [1000 * x for x in runs[(len(runs) - 1) // 2]["split"]]
                mode = "plain" if k == 0 else f"spec k={k}"
                print(f"{n:>8} {mode:>10} {path:>11} " + " ".join(f"{p:>8.2f}" for p in parts))

    print()
    print(f"bytes per block returned by the replicas (block_bytes, vocabulary {vocab}, float32 rows; "
          f"per token: at {args.sessions[0]} session(s)' tokens/block):")
    print(f"{'mode':>10} " + " ".join(f"{r:>11}" for r in ROLES) + f" {'total':>11} {'per token':>10}")
    for k in ks:
        sizes = block_bytes(list(ROLES), "ft_small" if k else None, k, vocab)
        tpb = med((args.sessions[0], k, "in-process"), lambda s: s["tok_per_block"])
        mode = "plain" if k == 0 else f"spec k={k}"
        print(f"{mode:>10} " + " ".join(f"{sizes[r]:>11}" for r in ROLES) + f" {sizes['total']:>11} {sizes['total'] / tpb:>10.0f}")


def main() -> None:
    args = concurrency_parser(__doc__.splitlines()[0], "sessions", [1, 8]).parse_args()
    torch.set_num_threads(1)

    import ray
    from ray import serve

    from services.app import deploy_ensemble
    from services.launch import family_config

    with tempfile.TemporaryDirectory() as tmp:
        paths = bench_models(args.family, tmp)
        started = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            serve.start(proxy_location="Disabled")
            deploy_ensemble(family_config(paths))
            print(f"Ray started and {len(ROLES)} roles deployed in {time.perf_counter() - started:.0f} s", flush=True)
            with combine_marked():
                asyncio.run(bench(paths, args))
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
