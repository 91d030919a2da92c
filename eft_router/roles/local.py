"""The in-process backend: role workers in this process behind the :class:`Role` interface.

For tests, notebooks and one machine. Calls compute inline on the event loop. Measured on
the embedded family (2 cores), inline is faster than a thread per role at every load (one
stream: 71-79 against 50-53 tokens/s; 16 streams: 785-993 against 583-635): the forward
passes of these models are mostly Python, so threads would take turns under the GIL anyway,
and every hop costs. The engine awaits each role call as its own task, so other work on the
loop (health checks, new requests, a cancelled client) waits at most one forward pass.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

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

    async def score(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        return self.worker.score(items)

    async def draft(self, items: Sequence[DraftItem]) -> list[Draft]:
        return self.worker.draft(items)

    async def release(self, session_ids: Sequence[str]) -> None:
        self.worker.release(session_ids)

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
