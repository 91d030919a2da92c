"""The in-process backend: role workers in this process behind the :class:`Role` interface.

For tests, notebooks and one machine. Calls run inline on the event loop: on a CPU the
forward passes would contend for the same cores anyway, and inline calls keep the engine's
own per-step overhead (which dominates small models) as low as it goes.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .roles import Draft, RoleInfo
from .spec import SamplingParams
from .vocab import check_shared_vocabulary
from .worker import DEFAULT_MAX_CACHED_TOKENS, RoleWorker


class LocalRole:
    """A :class:`~eft_router.roles.Role` over a :class:`RoleWorker` in this process."""

    inline = True  # calls compute without suspending: the decoder awaits them in turn

    def __init__(self, worker: RoleWorker) -> None:
        self.worker = worker
        self.info: RoleInfo = worker.info

    async def score(self, session_id: str, token_ids: Sequence[int], start: int) -> torch.Tensor:
        return self.worker.score(session_id, token_ids, start)

    async def draft(
        self, session_id: str, token_ids: Sequence[int], k: int, sampling: SamplingParams, uniforms: Sequence[float],
        stop_ids: Collection[int] = (), confidence: float = 0.0,
    ) -> Draft:
        return self.worker.draft(session_id, token_ids, k, sampling, uniforms, stop_ids, confidence)

    async def release(self, session_id: str) -> None:
        self.worker.release(session_id)


def load_local_roles(
    models: Mapping[str, str],
    dtype: str = "float32",
    device: str = "cpu",
    max_cached_tokens: int = DEFAULT_MAX_CACHED_TOKENS,
) -> tuple[dict[str, LocalRole], PreTrainedTokenizerBase]:
    """Load each role's tokenizer and model (local path or hub id), check that they share
    one vocabulary, and return the roles with the shared tokenizer (the first role's)."""
    tokenizers = {role: AutoTokenizer.from_pretrained(path) for role, path in models.items()}
    vocab_size = check_shared_vocabulary(tokenizers)
    roles = {
        role: LocalRole(RoleWorker(role, path, vocab_size, dtype, device, max_cached_tokens))
        for role, path in models.items()
    }
    return roles, next(iter(tokenizers.values()))
