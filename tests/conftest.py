"""Shared fixtures: tiny random role families built once per test run."""

from __future__ import annotations

import pytest
import torch

# Tiny models run fastest on one thread; more threads than cores slows them many times over.
torch.set_num_threads(1)

from eft_router.decoder import Engine
from eft_router.tiny import TinyModel, build_tiny_family

WORDS = [f"w{i}" for i in range(60)]
# Peaked (init_std 0.3) so that roles disagree visibly and speculative blocks see both
# acceptances and rejections; ft_small has padded embedding rows like many hub models.
ROLES = {
    "base_large": TinyModel(hidden=64, layers=2, seed=1, init_std=0.3),
    "base_small": TinyModel(hidden=32, layers=1, seed=2, init_std=0.3),
    "ft_small": TinyModel(hidden=32, layers=1, seed=3, init_std=0.3, pad_rows=4),
    "ft_safe": TinyModel(hidden=32, layers=1, seed=4, init_std=0.3),
    "ft_large": TinyModel(hidden=64, layers=2, seed=5, init_std=0.3),
}
TINY_VOCAB_WORDS = list("abcdef")  # 8 tokens with <unk> and <eos>
TINY_VOCAB_ROLES = {
    "base_large": TinyModel(hidden=16, layers=1, seed=11, init_std=0.3),
    "base_small": TinyModel(hidden=8, layers=1, heads=2, seed=12, init_std=0.3),
    "ft_small": TinyModel(hidden=8, layers=1, heads=2, seed=13, init_std=0.3),
}


@pytest.fixture(scope="session")
def family_paths(tmp_path_factory) -> dict[str, str]:
    return build_tiny_family(tmp_path_factory.mktemp("family"), WORDS, ROLES)


@pytest.fixture(scope="session")
def engine(family_paths) -> Engine:
    return Engine.local(family_paths)


@pytest.fixture(scope="session")
def tiny_vocab_paths(tmp_path_factory) -> dict[str, str]:
    return build_tiny_family(tmp_path_factory.mktemp("tiny_vocab"), TINY_VOCAB_WORDS, TINY_VOCAB_ROLES)


@pytest.fixture(scope="session")
def tiny_vocab_engine(tiny_vocab_paths) -> Engine:
    return Engine.local(tiny_vocab_paths)
