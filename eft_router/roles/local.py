"""The in-process backend: role workers in this process behind the :class:`Role` interface.

For tests, notebooks and one machine. Every role's calls run on one compute thread shared
by the process, in the order they were made, so the event loop stays free for the fronts:
at 64 gRPC streams on the embedded family, health answered in p50 3 ms (456 ms with the
forward passes inline on the loop), time to first token fell from p50 3.9 s to 0.31 s and
2.3x more requests finished. One thread, not one per role: the models' forward passes are
mostly Python, so threads per role would only take turns under the GIL (measured slower,
one stream 50-53 against 71-79 tokens/s inline). A bare engine with no front pays a little
for the hop (bench_fronts: 1-20% fewer tokens/s in-process).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..core.vocab import check_shared_vocabulary
from .interface import Draft, DraftItem, RoleInfo, ScoreItem
from .models import check_model
from .worker import RoleWorker


_COMPUTE = ThreadPoolExecutor(1, thread_name_prefix="eft-compute")


class LocalRole:
    """A :class:`~eft_router.roles.interface.Role` over a :class:`RoleWorker` in this process."""

    def __init__(self, worker: RoleWorker) -> None:
        self.worker = worker
        self.info: RoleInfo = worker.info

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(_COMPUTE, fn, *args)

    async def score(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        return await self._run(self.worker.score, items)

    async def draft(self, items: Sequence[DraftItem]) -> list[Draft]:
        return await self._run(self.worker.draft, items)

    async def release(self, session_ids: Sequence[str]) -> None:
        await self._run(self.worker.release, session_ids)

    async def probe(self, timeout_s: float) -> None:
        """In this process the role answers whenever the process does."""


def load_local_roles(
    models: Mapping[str, str], per_role: Mapping[str, Mapping[str, Any]] | None = None, **worker_kwargs: Any
) -> tuple[dict[str, LocalRole], PreTrainedTokenizerBase]:
    """Load each role's tokenizer and model (local path or hub id), check that they share
    one vocabulary, and return the roles with the shared tokenizer (the first role's).
    ``worker_kwargs`` go to every :class:`RoleWorker` (``dtype``, ``device``,
    ``kv_cache_bytes``, ``max_seq_len``...), ``per_role[role]`` to that role's only."""
    for role, path in models.items():
        check_model(role, path)
    tokenizers = {role: AutoTokenizer.from_pretrained(path) for role, path in models.items()}
    vocab_size = check_shared_vocabulary(tokenizers)
    per_role = per_role or {}
    roles = {
        role: LocalRole(RoleWorker(role, path, vocab_size, **{**worker_kwargs, **per_role.get(role, {})}))
        for role, path in models.items()
    }
    return roles, next(iter(tokenizers.values()))
