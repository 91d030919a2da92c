"""The in-process backend: role workers in this process behind the :class:`Role` interface.

For tests, notebooks and one machine. Each role's calls run on a thread of its own, in
arrival order (a worker is single-threaded by design): the event loop stays free to answer
health checks and new requests while a forward pass runs, and the roles of one step compute
at the same time (torch releases the GIL inside its kernels).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..core.vocab import check_shared_vocabulary
from .interface import Draft, DraftItem, RoleInfo, ScoreItem
from .models import check_model
from .worker import RoleWorker

class LocalRole:
    """A :class:`~eft_router.roles.interface.Role` over a :class:`RoleWorker` in this process."""

    def __init__(self, worker: RoleWorker) -> None:
        self.worker = worker
        self.info: RoleInfo = worker.info
        # torch's thread count is per thread (OpenMP): the role's thread takes its creator's
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"role-{worker.info.name}",
            initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),),
        )

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def score(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        return await self._run(self.worker.score, items)

    async def draft(self, items: Sequence[DraftItem]) -> list[Draft]:
        return await self._run(self.worker.draft, items)

    async def release(self, session_ids: Sequence[str]) -> None:
        await self._run(self.worker.release, list(session_ids))

    async def probe(self, timeout_s: float) -> None:
        """In this process the role answers whenever the process does (a forward pass may
        hold its thread, which is work, not an outage)."""

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


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
