"""The role worker and its KV cache slots: batched calls equal cold full forward passes,
reuse, rollback to the accepted prefix (a length moves), prefix reuse copied once, LRU
eviction, capacity, release, idle expiry, drafts; and that the slot buffers are updated in
place (the same storage before and after every call)."""

from __future__ import annotations

import pytest
import torch

from eft_router.roles.interface import DraftItem, DraftParams, Role, ScoreItem
from eft_router.roles.kv_cache import CacheFull, SessionTable
from eft_router.roles.worker import RoleWorker, slot_bytes, width_groups

V = 62  # 60 words + <unk> + <eos>
KV = 1 << 23
GREEDY = DraftParams(temperature=0.0)


def cold(worker: RoleWorker, ids: list[int], start: int) -> torch.Tensor:
    """Log-probs of positions start..len(ids) from a full forward pass of a fresh copy of the
    model with its stock attention: no cache, no slots."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(worker.info.model, attn_implementation="eager").eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1 :, :V]
    return torch.log_softmax(logits.float(), dim=-1)


def one(worker: RoleWorker, session: str, ids: list[int], start: int) -> torch.Tensor:
    """Rows for positions start..len(ids) of one session."""
    return worker.score([ScoreItem(session, ids, len(ids) - start + 1)])[0]


def draft(worker: RoleWorker, session: str, ids: list[int], k: int, params: DraftParams = GREEDY):
    return worker.draft([DraftItem(session, ids, k, params, [0.5] * k)])[0]


def test_local_role_implements_the_interface(engine):
    for role in engine.roles.values():
        assert isinstance(role, Role)
        assert role.info.vocab_size == V and role.info.kv_slots >= 16


def test_slots_follow_the_byte_budget(family_paths):
    w = RoleWorker("base_large", family_paths["base_large"], V, kv_cache_bytes=KV, max_seq_len=100)
    per_slot = slot_bytes(w.model.config, 100, torch.float32)
    assert per_slot == 2 * 2 * 4 * 16 * 101 * 4  # keys and values, 2 layers, 4 heads of 16, 100 positions + trash
    assert w.info.kv_slots == KV // per_slot and w.info.slot_length == 100
    with pytest.raises(ValueError, match="kv_cache_bytes 1000 holds no KV slot.*max_seq_len"):
        RoleWorker("base_large", family_paths["base_large"], V, kv_cache_bytes=1000)
    with pytest.raises(ValueError, match="max_seq_len 9999 exceeds the model's context length 512"):
        RoleWorker("base_large", family_paths["base_large"], V, max_seq_len=9999)


def test_reuse_extend_and_roll_back(family_paths):
    w = RoleWorker("base_large", family_paths["base_large"], V, kv_cache_bytes=KV)
    ids = list(range(2, 22))
    assert torch.allclose(one(w, "s", ids, 5), cold(w, ids, 5), atol=1e-5)
    assert w.computed_tokens == 20
    keys = w.kv.keys[0]
    longer = ids + [30, 31, 32]
    assert torch.allclose(one(w, "s", longer, 21), cold(w, longer, 21), atol=1e-5)
    assert w.computed_tokens == 23  # only the three new tokens ran
    # A rejected draft: the next call diverges after position 21 -> the length moves back, 2 recomputed.
    other = ids + [30, 40, 41]
    assert torch.allclose(one(w, "s", other, 22), cold(w, other, 22), atol=1e-5)
    assert w.computed_tokens == 25
    # Asking for rows before the cached end recomputes from start - 1 only.
    assert torch.allclose(one(w, "s", other, 10), cold(w, other, 10), atol=1e-5)
    assert w.computed_tokens == 25 + len(other) - 9
    assert w.kv.keys[0] is keys and w.kv.keys[0].data_ptr() == keys.data_ptr()  # updated in place, never copied


def test_a_batch_of_sessions_of_different_lengths_equals_each_cold(family_paths):
    w = RoleWorker("base_large", family_paths["base_large"], V, kv_cache_bytes=KV)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(2, V, (n,), generator=g).tolist() for n in (5, 9, 3, 40, 1)]
    items = [ScoreItem(f"b{i}", s, min(len(s), 3)) for i, s in enumerate(seqs)]
    for s, out in zip(seqs, w.score(items)):
        assert torch.allclose(out, cold(w, s, len(s) - min(len(s), 3) + 1), atol=1e-5)
    # the next step: every session one token longer (a decode step), and one new session
    seqs = [s + [7] for s in seqs] + [[4, 5, 6]]
    out = w.score([ScoreItem(f"b{i}", s, 1) for i, s in enumerate(seqs)])
    for s, rows in zip(seqs, out):
        assert torch.allclose(rows, cold(w, s, len(s)), atol=1e-5)
    assert w.forward_passes == 3  # the 40-token prefill ran apart from the short rows, then one decode pass


def test_rows_zero_fills_the_cache_only(family_paths):
    w = RoleWorker("base_small", family_paths["base_small"], V, kv_cache_bytes=KV)
    ids = list(range(2, 30))
    (rows,) = w.score([ScoreItem("p", ids[:20], 0)])  # a prefill chunk
    assert rows.shape == (0, V) and w.sessions.tokens_of("p") == ids[:20]
    assert torch.allclose(one(w, "p", ids, len(ids)), cold(w, ids, len(ids)), atol=1e-5)
    assert w.computed_tokens == len(ids)
    (rows,) = w.score([ScoreItem("p", ids, 0)])  # everything cached: nothing runs
    assert rows.shape == (0, V) and w.computed_tokens == len(ids)


def test_width_groups_bound_the_padding():
    assert width_groups([1] * 64) == [list(range(64))]
    groups = width_groups([200] + [1] * 40)  # a long prefill does not pad 40 decodes to its width
    assert len(groups) == 2 and len(groups[0]) < 5
    for widths in ([1] * 10 + [9] * 3, [300, 290, 2, 1], [17, 3, 3, 3, 3, 3], [200, 1, 1, 5, 5]):
        assert sorted(i for g in width_groups(widths) for i in g) == list(range(len(widths)))
        for g in width_groups(widths):
            assert len(g) * max(widths[i] for i in g) <= 2 * sum(widths[i] for i in g) + 16


def test_new_session_copies_the_longest_live_prefix_once(family_paths):
    w = RoleWorker("base_small", family_paths["base_small"], V, kv_cache_bytes=KV)
    system = list(range(2, 40))
    one(w, "a", system + [50], len(system))
    before = w.computed_tokens
    ids = system + [51, 52]
    assert torch.allclose(one(w, "b", ids, len(ids)), cold(w, ids, len(ids)), atol=1e-5)
    assert w.computed_tokens - before == 2
    # The copy does not alias: session a is unchanged and still correct.
    assert w.sessions.tokens_of("a") == system + [50]
    assert torch.allclose(one(w, "a", system + [50], 3), cold(w, system + [50], 3), atol=1e-5)


def test_lru_eviction_and_release(family_paths):
    w = RoleWorker("ft_small", family_paths["ft_small"], V, kv_cache_bytes=KV, max_seq_len=64)
    slots = w.info.kv_slots
    for i in range(slots + 2):
        one(w, f"s{i}", [2 + i % 50] * 10 + [i % 50 + 3], 11)
    assert len(w.sessions) == slots
    assert "s0" not in w.sessions and "s1" not in w.sessions and f"s{slots + 1}" in w.sessions
    one(w, "s2", [4] * 10 + [5], 11)  # touch s2: now s3 is the least recent
    one(w, "new", [9, 9, 9], 3)
    assert "s3" not in w.sessions and "s2" in w.sessions
    # An evicted session is recomputed, correctly.
    assert torch.allclose(one(w, "s0", [2] * 10 + [3], 11), cold(w, [2] * 10 + [3], 11), atol=1e-5)
    w.release(["s0", "never-seen"])
    assert "s0" not in w.sessions


def test_a_call_with_more_sessions_than_slots_fails_alone(family_paths):
    w = RoleWorker("ft_small", family_paths["ft_small"], V, kv_cache_bytes=KV, max_seq_len=256)
    slots = w.info.kv_slots
    with pytest.raises(CacheFull, match=f"all {slots} KV cache slots"):
        w.score([ScoreItem(f"x{i}", [3, 4], 1) for i in range(slots + 1)])
    # nothing half-done: the worker serves the next call
    assert torch.allclose(one(w, "after", [3, 4, 5], 3), cold(w, [3, 4, 5], 3), atol=1e-5)


def test_a_failed_forward_leaves_every_session_consistent(family_paths):
    w = RoleWorker("base_small", family_paths["base_small"], V, kv_cache_bytes=KV)
    ids = list(range(2, 12))
    one(w, "kept", ids, 5)
    with pytest.raises(ValueError, match="token ids must be in"):
        w.score([ScoreItem("kept", ids + [3, 4], 2), ScoreItem("bad", [3, V + 5], 1)])
    assert w.sessions.tokens_of("kept") == ids  # the failed pass wrote nothing it claims to hold
    torch.testing.assert_close(one(w, "copy", ids + [9], 11), cold(w, ids + [9], 11), atol=1e-5, rtol=0)


def test_padded_rows_are_trimmed(family_paths):
    w = RoleWorker("ft_small", family_paths["ft_small"], V, kv_cache_bytes=KV)
    assert w.model.get_output_embeddings().weight.shape[0] == V + 4
    rows = one(w, "p", [3, 4, 5], 1)
    assert rows.shape == (3, V)
    assert torch.allclose(rows.exp().sum(-1), torch.ones(3), atol=1e-5)


def test_draft_returns_its_own_rows(family_paths):
    w = RoleWorker("ft_small", family_paths["ft_small"], V, kv_cache_bytes=KV)
    ids = [3, 4, 5]
    d = draft(w, "d", ids, 4)
    assert len(d.tokens) == 4 and d.logprobs.shape == (5, V)
    full = ids + d.tokens
    assert torch.allclose(d.logprobs, cold(w, full, len(ids)), atol=1e-5)
    assert d.tokens == [int(r.argmax()) for r in d.logprobs[:4]]  # greedy drafts are argmaxes
    assert w.sessions.tokens_of("d") == full


def test_a_batch_of_drafts_equals_each_alone(family_paths):
    """Drafts of different k and sampling parameters in one call: each as it drafts alone."""
    w = RoleWorker("ft_small", family_paths["ft_small"], V, kv_cache_bytes=KV)
    alone = RoleWorker("ft_small", family_paths["ft_small"], V, kv_cache_bytes=KV)
    params = [GREEDY, DraftParams(0.8, 5, 0.9), DraftParams(1.0), DraftParams(1.3, 0, 0.7), GREEDY]
    ks = [4, 6, 0, 3, 1]
    g = torch.Generator().manual_seed(1)
    items = [
        DraftItem(f"d{i}", torch.randint(2, V, (3 + 2 * i,), generator=g).tolist(), k, p, torch.rand(k, generator=g).tolist())
        for i, (k, p) in enumerate(zip(ks, params))
    ]
    for item, got in zip(items, w.draft(items)):
        want = alone.draft([item])[0]
        assert got.tokens == want.tokens and len(got.tokens) == item.k
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)


def test_draft_ends_after_a_stop_token(family_paths):
    w = RoleWorker("ft_small", family_paths["ft_small"], V, kv_cache_bytes=KV)
    ids = [3, 4, 5]
    full = draft(w, "full", ids, 6)
    stop = full.tokens[2]
    first = full.tokens.index(stop)
    d = draft(w, "stopped", ids, 6, DraftParams(temperature=0.0, stop_ids=frozenset({stop, V - 1})))
    assert d.tokens == full.tokens[: first + 1]  # the stop token itself, then nothing
    torch.testing.assert_close(d.logprobs, full.logprobs[: first + 2])  # its row after the stop too
    assert w.sessions.tokens_of("stopped") == ids + d.tokens


def test_draft_ends_before_a_token_it_is_unsure_of(family_paths):
    w = RoleWorker("ft_small", family_paths["ft_small"], V, kv_cache_bytes=KV)
    ids = [9, 4, 17]
    full = draft(w, "full", ids, 6)
    sure = full.logprobs[:6].exp().max(dim=-1).values  # the drafter's top probability per position
    unsure = int(sure.argmin())
    d = draft(w, "unsure", ids, 6, DraftParams(temperature=0.0, confidence=float(sure[unsure]) + 1e-6))
    assert d.tokens == full.tokens[:unsure]  # every position before it is surer
    torch.testing.assert_close(d.logprobs, full.logprobs[: unsure + 1])
    assert draft(w, "any", ids, 6, DraftParams(temperature=0.0, confidence=float(sure.min()) - 1e-6)).tokens == full.tokens


@pytest.mark.parametrize(
    "items,message",
    [
        ([ScoreItem("x", [], 0)], "items\\[0\\].token_ids: must hold at least one token"),
        ([ScoreItem("x", [3, 4], 3)], "items\\[0\\].rows: must be in \\[0, 2\\]"),
        ([ScoreItem("x", [3, 4], -1)], "items\\[0\\].rows"),
        ([ScoreItem("x", [3] * 600, 1)], "items\\[0\\].token_ids: 600 positions exceed .* KV slot length 512"),
        ([ScoreItem("x", [3], 1), ScoreItem("x", [4], 1)], "items\\[1\\].session_id: 'x' appears twice"),
        ([DraftItem("x", [3] * 510, 4, GREEDY, [0.5] * 4)], "items\\[0\\].token_ids: 514 positions exceed"),
        ([DraftItem("x", [3], 4, GREEDY, [0.5])], "items\\[0\\].uniforms: need one per draft"),
        ([DraftItem("x", [3], 1, DraftParams(confidence=2.0), [0.5])], "items\\[0\\].params.confidence"),
    ],
    ids=["empty", "rows-past-start", "rows-negative", "too-long", "twice", "draft-too-long", "uniforms", "confidence"],
)
def test_bad_calls_raise_naming_the_item(family_paths, items, message):
    w = RoleWorker("base_small", family_paths["base_small"], V, kv_cache_bytes=KV)
    call = w.draft if isinstance(items[0], DraftItem) else w.score
    with pytest.raises(ValueError, match=message):
        call(items)
    assert len(w.sessions) == 0


def test_idle_sessions_are_freed(family_paths):
    now = [1000.0]
    w = RoleWorker("base_small", family_paths["base_small"], V, kv_cache_bytes=KV, session_idle_s=30.0, clock=lambda: now[0])
    one(w, "old", [3, 4, 5], 3)
    now[0] += 20
    one(w, "recent", [6, 7, 8], 3)
    now[0] += 15  # "old" idle 35 s, "recent" 15 s
    one(w, "recent", [6, 7, 8, 9], 4)
    assert w.sessions.ids() == ["recent"]
    now[0] += 31
    assert w.expire_idle_sessions() == ["recent"]
    assert w.sessions.ids() == []
    # an expired session is recomputed, correctly
    assert torch.allclose(one(w, "old", [3, 4, 5], 3), cold(w, [3, 4, 5], 3), atol=1e-5)


def test_session_table_takes_the_lowest_free_slot_and_protects_the_call():
    table = SessionTable(3)
    slots = [table.acquire(s, [1, 2], 2, {s})[0].slot for s in "abc"]
    assert slots == [0, 1, 2]
    table.release("b")
    assert table.acquire("d", [5], 1, {"d"})[0].slot == 1
    with pytest.raises(CacheFull):
        table.acquire("e", [5], 1, {"a", "c", "d", "e"})
    assert table.acquire("e", [5], 1, {"c", "d", "e"})[0].slot == 0  # "a", least recent and unprotected, goes
