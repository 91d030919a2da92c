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
from .adapters import Adapter, read_adapter_config
from .interface import Draft, DraftItem, Role, RoleInfo, ScoreItem, members
from .models import check_model
from .worker import RoleWorker


_COMPUTE = ThreadPoolExecutor(1, thread_name_prefix="eft-compute")


class LocalRole:
    """A :class:`~eft_router.roles.interface.Role` over a :class:`RoleWorker` in this process
    (all the roles of its group, when it has adapters)."""

    def __init__(self, worker: RoleWorker) -> None:
        self.worker = worker
        self.info: RoleInfo = worker.info
        self.infos: dict[str, RoleInfo] = worker.infos

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
    models: Mapping[str, str],
    per_role: Mapping[str, Mapping[str, Any]] | None = None,
    adapters: Mapping[str, Adapter] | None = None,
    **worker_kwargs: Any,
) -> tuple[dict[str, Role], PreTrainedTokenizerBase]:
    """Load each role's tokenizer and model (local path or hub id), check that they share
    one vocabulary, and return the roles with the shared tokenizer (the first role's).
    ``adapters`` (role -> :class:`Adapter`) are LoRA roles, each loaded into its base role's
    worker: a group whose members come back as :class:`~eft_router.roles.interface.Member`
    views of one backend. ``worker_kwargs`` go to every :class:`RoleWorker` (``dtype``,
    ``device``, ``kv_cache_bytes``, ``max_seq_len``...), ``per_role[role]`` to that role's
    only (an adapter's group takes its base's)."""
    adapters = dict(adapters or {})
    for role, path in models.items():
        check_model(role, path)
    for role, adapter in adapters.items():
        if role in models:
            raise ValueError(f"role {role!r}: give a model or an adapter, not both")
        if adapter.base not in models:
            raise ValueError(f"role {role!r}: base must be a role with a model of its own ({', '.join(models)}), got {adapter.base!r}")
        read_adapter_config(role, adapter.path)
    tokenizers = {role: AutoTokenizer.from_pretrained(path) for role, path in models.items()}
    vocab_size = check_shared_vocabulary(tokenizers)
    per_role = per_role or {}
    roles: dict[str, Role] = {}
    for role, path in models.items():
        group = {name: a.path for name, a in adapters.items() if a.base == role}
        worker = RoleWorker(role, path, vocab_size, **{**worker_kwargs, **per_role.get(role, {})}, adapters=group)
        roles.update(members(LocalRole(worker)))
    return {role: roles[role] for role in [*models, *adapters]}, next(iter(tokenizers.values()))
