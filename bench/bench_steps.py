"""Batched decode step time against context length: the copying term is gone.

A synthetic base_large with a 2048-token context (the embedded family's is 256), on the role
worker directly. For sessions of 32, 256 and 1024 tokens of context: one session's cached
decode step, 8 sessions' batched decode step, and their ratio. With KV slots updated in place,
a batched step grows with context only through attention reading each session's own keys and
values, as a single session's step does.

For comparison, the last column times what the previous worker's batching copied per step and
no longer does: every session's keys and values stacked into a padded batch cache, and each
row copied back out after the forward (the same tensor shapes, the copies alone).

  python bench/bench_steps.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from eft_router.roles.interface import ScoreItem
from eft_router.roles.worker import RoleWorker, slot_bytes
from eft_router.tiny import TinyModel, build_tiny_family

CONTEXT = 2048
MODEL = TinyModel(hidden=512, layers=8, heads=8, seed=1, init_std=0.02)


def step_seconds(worker: RoleWorker, contexts: list[list[int]], repeats: int) -> float:
    """Median seconds of one decode step of every session in ``contexts`` at once (each
    step's token is rolled back by the next step, which feeds another one)."""
    worker.score([ScoreItem(f"s{i}", c, 1) for i, c in enumerate(contexts)])
    times = []
    for r in range(repeats):
        items = [ScoreItem(f"s{i}", c + [2 + (r % 50)], 1) for i, c in enumerate(contexts)]
        started = time.perf_counter()
        worker.score(items)
        times.append(time.perf_counter() - started)
    worker.release([f"s{i}" for i in range(len(contexts))])
    return statistics.median(times)


def copy_seconds(worker: RoleWorker, sessions: int, length: int, repeats: int) -> float:
    """The previous batching's per-step copies for ``sessions`` caches of ``length`` tokens:
    stack into a padded batch, then copy every row back out (per layer, keys and values)."""
    config = worker.model.config
    heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    caches = [[torch.randn(1, heads, length, head_dim) for _ in range(2)] for _ in range(sessions)]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _layer in range(config.num_hidden_layers):
            for kv in range(2):
                batch = caches[0][kv].new_zeros(sessions, heads, length + 1, head_dim)
                for i, cache in enumerate(caches):
                    batch[i, :, :length] = cache[kv][0]
                for i in range(sessions):
                    caches[i][kv] = batch[i : i + 1, :, : length + 1].clone()[:, :, :length]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_family(tmp, [f"w{i}" for i in range(200)], {"base_large": MODEL}, context_length=CONTEXT)["base_large"]
        from transformers import AutoConfig

        per_slot = slot_bytes(AutoConfig.from_pretrained(path), CONTEXT, torch.float32)
        worker = RoleWorker("base_large", path, 202, kv_cache_bytes=(args.sessions + 1) * per_slot)
        g = torch.Generator().manual_seed(0)
        print(f"synthetic base_large: hidden {MODEL.hidden}, {MODEL.layers} layers, {CONTEXT}-token context; "
              f"{args.sessions} sessions per batched step; medians of {args.repeats} steps")
        print(f"{'context':>8} {'1 session ms':>13} {f'{args.sessions} sessions ms':>14} {'ratio':>6} {'per session ms':>15} {'old copies ms':>14}")
        for length in args.lengths:
            contexts = [torch.randint(2, 202, (length,), generator=g).tolist() for _ in range(args.sessions)]
            one = step_seconds(worker, contexts[:1], args.repeats)
            many = step_seconds(worker, contexts, args.repeats)
            copies = copy_seconds(worker, args.sessions, length, max(3, args.repeats // 4))
            print(f"{length:>8} {1e3 * one:>13.2f} {1e3 * many:>14.2f} {many / one:>6.2f} {1e3 * many / args.sessions:>15.2f} {1e3 * copies:>14.2f}")


if __name__ == "__main__":
    main()
