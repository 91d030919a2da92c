"""The role worker's caches: reuse, cropping to the accepted prefix, the LRU token bound,
release; and that cached log-probs equal a cold full forward pass."""

from __future__ import annotations

import pytest
import torch

from eft_router.roles import Role
from eft_router.spec import SamplingParams
from eft_router.worker import RoleWorker

V = 62  # 60 words + <unk> + <eos>


def cold(worker: RoleWorker, ids: list[int], start: int) -> torch.Tensor:
    """Log-probs from a full forward pass without any cache."""
    with torch.inference_mode():
        logits = worker.model(input_ids=torch.tensor([ids])).logits[0, start - 1 :, :V]
    return torch.log_softmax(logits.float(), dim=-1)


def test_local_role_implements_the_interface(engine):
    for role in engine.roles.values():
        assert isinstance(role, Role)
        assert role.info.vocab_size == V


def test_reuse_extend_and_crop(family_paths):
    w = RoleWorker("base_large", family_paths["base_large"], V)
    ids = list(range(2, 22))
    assert torch.allclose(w.score("s", ids, 5), cold(w, ids, 5), atol=1e-5)
    assert w.computed_tokens == 20
    longer = ids + [30, 31, 32]
    assert torch.allclose(w.score("s", longer, 21), cold(w, longer, 21), atol=1e-5)
    assert w.computed_tokens == 23  # only the three new tokens ran
    # A rejected draft: the next request diverges after position 21 -> crop, recompute 2.
    other = ids + [30, 40, 41]
    assert torch.allclose(w.score("s", other, 22), cold(w, other, 22), atol=1e-5)
    assert w.computed_tokens == 25
    # Asking for rows before the cached end recomputes from start - 1 only.
    assert torch.allclose(w.score("s", other, 10), cold(w, other, 10), atol=1e-5)
    assert w.computed_tokens == 25 + len(other) - 9


def test_new_session_copies_the_longest_live_prefix(family_paths):
    w = RoleWorker("base_small", family_paths["base_small"], V)
    system = list(range(2, 40))
    w.score("a", system + [50], len(system))
    before = w.computed_tokens
    ids = system + [51, 52]
    assert torch.allclose(w.score("b", ids, len(ids)), cold(w, ids, len(ids)), atol=1e-5)
    assert w.computed_tokens - before == 2
    # The copy does not alias: session a is unchanged and still correct.
    assert w.caches.tokens_of("a") == system + [50]
    assert torch.allclose(w.score("a", system + [50], 3), cold(w, system + [50], 3), atol=1e-5)


def test_lru_bound_and_release(family_paths):
    w = RoleWorker("ft_small", family_paths["ft_small"], V, max_cached_tokens=50)
    for i in range(4):
        w.score(f"s{i}", [2 + i] * 20, 20)
    assert w.caches.cached_tokens <= 50
    assert "s3" in w.caches and "s2" in w.caches and "s0" not in w.caches
    w.score("s2", [4] * 20, 20)  # touch s2: now s3 is the least recent
    w.score("s4", [9] * 20, 20)
    assert "s3" not in w.caches and "s2" in w.caches
    # An evicted session is recomputed, correctly.
    assert torch.allclose(w.score("s0", [2] * 20, 20), cold(w, [2] * 20, 20), atol=1e-5)
    w.release("s0")
    w.release("never-seen")
    assert "s0" not in w.caches


def test_padded_rows_are_trimmed(family_paths):
    w = RoleWorker("ft_small", family_paths["ft_small"], V)
    assert w.model.get_output_embeddings().weight.shape[0] == V + 4
    rows = w.score("p", [3, 4, 5], 1)
    assert rows.shape == (3, V)
    assert torch.allclose(rows.exp().sum(-1), torch.ones(3), atol=1e-5)


def test_draft_returns_its_own_rows(family_paths):
    w = RoleWorker("ft_small", family_paths["ft_small"], V)
    ids = [3, 4, 5]
    d = w.draft("d", ids, 4, SamplingParams(temperature=0.0), [0.5] * 4)
    assert len(d.tokens) == 4 and d.logprobs.shape == (5, V)
    full = ids + d.tokens
    assert torch.allclose(d.logprobs, cold(w, full, len(ids)), atol=1e-5)
    assert d.tokens == [int(r.argmax()) for r in d.logprobs[:4]]  # greedy drafts are argmaxes
    assert w.caches.tokens_of("d") == full


def test_draft_ends_after_a_stop_token(family_paths):
    w = RoleWorker("ft_small", family_paths["ft_small"], V)
    ids, greedy = [3, 4, 5], SamplingParams(temperature=0.0)
    full = w.draft("full", ids, 6, greedy, [0.5] * 6)
    stop = full.tokens[2]
    first = full.tokens.index(stop)
    d = w.draft("stopped", ids, 6, greedy, [0.5] * 6, stop_ids={stop, V - 1})
    assert d.tokens == full.tokens[: first + 1]  # the stop token itself, then nothing
    torch.testing.assert_close(d.logprobs, full.logprobs[: first + 2])  # its row after the stop too
    assert w.caches.tokens_of("stopped") == ids + d.tokens


def test_draft_ends_before_a_token_it_is_unsure_of(family_paths):
    w = RoleWorker("ft_small", family_paths["ft_small"], V)
    ids, greedy = [9, 4, 17], SamplingParams(temperature=0.0)
    full = w.draft("full", ids, 6, greedy, [0.5] * 6)
    sure = full.logprobs[:6].exp().max(dim=-1).values  # the drafter's top probability per position
    unsure = int(sure.argmin())
    d = w.draft("unsure", ids, 6, greedy, [0.5] * 6, confidence=float(sure[unsure]) + 1e-6)
    assert d.tokens == full.tokens[:unsure]  # every position before it is surer
    torch.testing.assert_close(d.logprobs, full.logprobs[: unsure + 1])
    assert w.draft("any", ids, 6, greedy, [0.5] * 6, confidence=float(sure.min()) - 1e-6).tokens == full.tokens


@pytest.mark.parametrize(
    "ids,start,message",
    [([], 1, "start"), ([3, 4], 0, "start"), ([3, 4], 3, "start"), ([3] * 600, 600, "context length")],
    ids=["empty", "start-0", "start-past-end", "too-long"],
)
def test_bad_calls_raise(family_paths, ids, start, message):
    w = RoleWorker("base_small", family_paths["base_small"], V)
    with pytest.raises(ValueError, match=message):
        w.score("x", ids, start)


def test_idle_sessions_are_freed(family_paths):
    now = [1000.0]
    w = RoleWorker("base_small", family_paths["base_small"], V, session_idle_s=30.0)
    w.caches.clock = lambda: now[0]
    w.score("old", [3, 4, 5], 3)
    now[0] += 20
    w.score("recent", [6, 7, 8], 3)
    now[0] += 15  # "old" idle 35 s, "recent" 15 s
    w.score("recent", [6, 7, 8, 9], 4)
    assert w.caches.ids() == ["recent"]
    now[0] += 31
    w.caches.expire()
    assert w.caches.ids() == []
    # an expired session is recomputed, correctly
    assert torch.allclose(w.score("old", [3, 4, 5], 3), cold(w, [3, 4, 5], 3), atol=1e-5)
