"""Token trees: a draft tree scored in one forward pass (tree attention mask, explicit
positions) equals each of its paths scored cold; the next call keeps exactly the accepted
path in the KV cache (moved, not recomputed); a drafted tree's rows are its paths' rows; and
SpecInfer's multi-step acceptance over a tree emits p-distributed tokens (Monte Carlo
G-tests on the pure function; the engine's end-to-end G-tests are in
``test_speculative_exact.py``)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import power_divergence

from conftest import first_positive_branch
from eft_router.core.acceptance import accept_blocks, accept_tree
from eft_router.core.sampling import sampling_probs
from eft_router.roles.interface import DraftItem, DraftParams, ScoreItem
from eft_router.roles.worker import RoleWorker

V = 62
KV = 1 << 23
# float32 rows of a masked attention over the whole tree against a pass over one path: the
# same maths summed in another order (a wrong mask or position is off by 0.1 or more)
ATOL = 5e-5
CONTEXT = [5, 9, 14, 3, 22]
# a tree after CONTEXT: node i is TOKENS[i], a child of PARENTS[i] (-1: the root)
TOKENS = [7, 11, 30, 8, 12, 40, 41]
PARENTS = (-1, -1, 0, 0, 1, 2, 4)


def cold_last(worker: RoleWorker, ids: list[int]) -> torch.Tensor:
    """The distribution after ``ids`` from a full forward pass of a fresh copy of the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(worker.info.model, attn_implementation="eager").eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1, :V]
    return torch.log_softmax(logits.float(), dim=-1)


def path_of(parents: tuple[int, ...], node: int) -> list[int]:
    """The nodes from the root down to ``node``."""
    return path_of(parents, parents[node]) + [node] if node >= 0 else []


def path_tokens(tokens: list[int], parents: tuple[int, ...], node: int) -> list[int]:
    return [tokens[i] for i in path_of(parents, node)]


@pytest.fixture(scope="module")
def worker(family_paths) -> RoleWorker:
    return RoleWorker("base_large", family_paths["base_large"], V, kv_cache_bytes=KV)


def test_a_tree_in_one_pass_equals_each_path_cold(worker):
    """Batched with a plain session of another length, so masks and positions of rows that
    are trees and rows that are not share the pass."""
    before = worker.forward_passes
    tree, plain = worker.score([
        ScoreItem("tree", CONTEXT + TOKENS, len(TOKENS) + 1, tree=PARENTS),
        ScoreItem("plain", [4, 4, 6, 8, 10, 12, 14, 16, 18, 20], 3),
    ])
    assert worker.forward_passes == before + 1
    torch.testing.assert_close(tree[0], cold_last(worker, CONTEXT), atol=ATOL, rtol=0)
    for node in range(len(TOKENS)):
        want = cold_last(worker, CONTEXT + path_tokens(TOKENS, PARENTS, node))
        torch.testing.assert_close(tree[node + 1], want, atol=ATOL, rtol=0, msg=f"node {node}")
    torch.testing.assert_close(plain[-1], cold_last(worker, [4, 4, 6, 8, 10, 12, 14, 16, 18, 20]), atol=ATOL, rtol=0)
    worker.release(["tree", "plain"])


def slot_kv(worker: RoleWorker, session: str, length: int) -> list[torch.Tensor]:
    slot = worker.sessions._sessions[session].slot
    return [buf[slot, :, :length].clone() for buf in worker.kv.keys + worker.kv.values]


@pytest.mark.parametrize("accepted", [[1, 4, 6], [0, 3], [], [0, 2, 5]], ids=["deep-branch", "second-child", "none", "first-chain"])
def test_the_next_call_keeps_exactly_the_accepted_path(worker, family_paths, accepted):
    """After a tree, the session's next call (its context: the accepted path and one more
    token) finds the path's keys and values moved into place after the context: only the new
    token is computed, the cache holds exactly the context and the path, equal to a fresh
    session fed those tokens, and its rows equal cold ones."""
    worker.score([ScoreItem("t", CONTEXT + TOKENS, len(TOKENS) + 1, tree=PARENTS)])
    path = [TOKENS[i] for i in accepted]
    assert accepted == [] or path_of(PARENTS, accepted[-1]) == accepted
    follow = CONTEXT + path + [50]
    computed = worker.computed_tokens
    rows = worker.score([ScoreItem("t", follow, 1)])[0]
    assert worker.computed_tokens == computed + 1  # the path was moved, not recomputed
    assert worker.sessions.tokens_of("t") == follow and worker.sessions._sessions["t"].tree is None
    torch.testing.assert_close(rows[-1], cold_last(worker, follow), atol=ATOL, rtol=0)
    fresh = RoleWorker("base_large", family_paths["base_large"], V, kv_cache_bytes=KV)
    fresh.score([ScoreItem("t", follow, 1)])
    for got, want in zip(slot_kv(worker, "t", len(follow)), slot_kv(fresh, "t", len(follow))):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    worker.release(["t"])


def test_a_new_session_copies_only_the_context_of_a_session_that_ends_in_a_tree(worker):
    """Prefix reuse reads a live session's sequence, never the nodes of its tree."""
    worker.score([ScoreItem("t", CONTEXT + TOKENS, len(TOKENS) + 1, tree=PARENTS)])
    follow = CONTEXT + TOKENS[:3]  # a sequence that only looks like the tree's flattened nodes
    rows = worker.score([ScoreItem("u", follow, 1)])[0]
    assert worker.sessions.tokens_of("u") == follow
    torch.testing.assert_close(rows[0], cold_last(worker, follow), atol=ATOL, rtol=0)
    worker.release(["t", "u"])


def test_a_drafted_tree_is_its_paths(family_paths):
    """Where the drafter is unsure (the root, at a confidence just above its top probability
    there) it branches into its top tokens, once, and each branch drafts on as a chain would,
    ending where the drafter is unsure again or at depth k: node rows are the cold rows of
    their paths, the first head is the token a chain samples there (greedy: the argmax) and
    the others the next most likely (not sampled), the branches' tokens are greedy argmaxes
    (sampled), and a tree and a chain share one call."""
    w = RoleWorker("ft_small", family_paths["ft_small"], V, kv_cache_bytes=KV)
    k, m = 4, 3
    root = w.score([ScoreItem("probe", CONTEXT, 1)])[0][0].exp()
    confidence = float(root.max()) + 1e-6
    params = DraftParams(temperature=0.0, confidence=confidence, tree_width=m)
    tree, chain = w.draft([
        DraftItem("tree", CONTEXT, k, params, [0.5] * (k * m)),
        DraftItem("chain", [4, 8, 15, 16], 4, DraftParams(temperature=0.0), [0.5] * 4),
    ])
    assert tree.parents is not None and chain.parents is None and len(chain.tokens) == 4
    heads = [i for i, p in enumerate(tree.parents) if p == -1]
    assert [tree.tokens[i] for i in heads] == torch.topk(tree.logprobs[0], m).indices.tolist()
    assert tree.sampled == tuple(p != -1 or i == heads[0] for i, p in enumerate(tree.parents))
    assert len(tree.tokens) > m and tree.logprobs.shape == (len(tree.tokens) + 1, V)  # some branch went on
    for node in range(len(tree.tokens)):
        path = path_tokens(tree.tokens, tree.parents, node)
        assert len(path) <= k
        torch.testing.assert_close(tree.logprobs[node + 1], cold_last(w, CONTEXT + path), atol=ATOL, rtol=0)
        sure = float(tree.logprobs[node + 1].exp().max()) >= confidence
        has_child = node in tree.parents
        assert has_child == (sure and len(path) < k), node  # a branch goes on exactly while sure
        if tree.sampled[node]:
            assert tree.tokens[node] == int(tree.logprobs[tree.parents[node] + 1].argmax())
    # the drafter's next call keeps the path it is given, as a verifier's does
    branch = next(i for i in heads if i in tree.parents)
    child = tree.parents.index(branch)
    follow = CONTEXT + [tree.tokens[branch], tree.tokens[child]]
    again = w.draft([DraftItem("tree", follow, 1, DraftParams(temperature=0.0), [0.5])])[0]
    torch.testing.assert_close(again.logprobs[0], cold_last(w, follow), atol=ATOL, rtol=0)
    assert w.sessions.tokens_of("tree") == follow + again.tokens


# -- the acceptance rule over a tree -------------------------------------------------------------


def random_tree(g: torch.Generator, vocab: int, width: int, temperature: float):
    """A root with ``width`` heads as the drafter branches (a token sampled from q, then q's
    most likely others), each with one sampled child; the target a row per position (its own
    random distribution, as a path-dependent model gives), the drafter close to it."""
    rows = 1 + 2 * width
    p = sampling_probs(torch.randn(rows, vocab, generator=g), temperature)
    q = sampling_probs(torch.randn(rows, vocab, generator=g) + 0.5 * torch.log(p.clamp_min(1e-9)), temperature)
    tokens, parents, sampled = [0] * width, [-1] * width, [True] + [False] * (width - 1)
    for h in range(width):
        tokens.append(0)
        parents.append(h)
        sampled.append(True)
    return p, q, tokens, parents, sampled


def draw_tree(g: torch.Generator, q: torch.Tensor, tokens: list[int], width: int) -> None:
    """Fresh sampled tokens for ``random_tree``'s nodes: the first head from q at the root
    (the other heads, q's most likely tokens but it, follow it) and each head's child."""
    head = int(torch.multinomial(q[0], 1, generator=g))
    tokens[:width] = [head] + [t for t in torch.topk(q[0], width).indices.tolist() if t != head][: width - 1]
    for h in range(width):
        tokens[width + h] = int(torch.multinomial(q[h + 1], 1, generator=g))


def g_pvalue(counts: Counter, probs: np.ndarray) -> float:
    n = sum(counts.values())
    probs = probs / probs.sum()
    keep = probs * n >= 5
    observed = np.array([counts.get(i, 0) for i in range(len(probs))], dtype=float)
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(probs[keep] * n, probs[~keep].sum() * n)
    mask = exp > 0
    assert obs[~mask].sum() == 0  # nothing where p has no mass
    exp = exp[mask] * obs[mask].sum() / exp[mask].sum()
    return float(power_divergence(obs[mask], exp, lambda_="log-likelihood").pvalue)


def tree_samples(rule, width: int, n: int) -> tuple[float, list[float], list[int]]:
    """G-test p-values of ``rule``'s first emitted token against p at the root, and of the
    token after each head h (when h was accepted) against p at h; and how many such samples
    each head had (the seed's tree has every head accepted often enough to test after it)."""
    g = torch.Generator().manual_seed(9)
    p, q, tokens, parents, sampled = random_tree(g, 6, width, 1.0)
    first, second = Counter(), {h: Counter() for h in range(width)}
    for _ in range(n):
        draw_tree(g, q, tokens, width)
        u = torch.rand(len(tokens) + 1, generator=g, dtype=torch.float64).tolist()
        out = rule(p, q, tokens, parents, sampled, u[:-1], u[-1])
        first[out.tokens[0]] += 1
        if out.accepted:
            second[out.rows[1] - 1][out.tokens[1]] += 1
    seconds = [g_pvalue(second[h], p[h + 1].double().numpy()) if second[h] else 1.0 for h in range(width)]
    return g_pvalue(first, p[0].double().numpy()), seconds, [sum(second[h].values()) for h in range(width)]


@pytest.mark.parametrize("width", [2, 4])
def test_tree_acceptance_emits_p_distributed_tokens(width):
    """With the tree and its rows fixed, the first emitted token is p_root-distributed, and
    after a head h the next one is p at h (its branch's chain is then verified as a chain:
    its sampled child is drawn from q there, fresh per sample)."""
    first, seconds, counts = tree_samples(accept_tree, width, 20_000)
    assert first > 1e-3
    assert min(counts) > 200, counts
    assert min(seconds) > 1e-3, seconds


def test_the_tree_test_has_power():
    """The same test rejects a wrong multi-draft rule: accepting the first branch that has
    p > 0 instead of trying the branches in turn against the residual."""
    first, _, _ = tree_samples(first_positive_branch, 4, 5_000)
    assert first < 1e-6


def test_greedy_takes_the_branch_that_matches_and_a_chain_is_the_chain_rule():
    g = torch.Generator().manual_seed(2)
    vocab = 7
    p = sampling_probs(torch.randn(5, vocab, generator=g), 0.0)
    tokens = [int(p[0].argmax()) + 1 if int(p[0].argmax()) + 1 < vocab else 0, int(p[0].argmax()), 3, 4]
    parents, sampled = [-1, -1, 1, 1], [False, False, True, True]
    q = torch.full((5, vocab), 1.0 / vocab)
    out = accept_tree(p, q, tokens, parents, sampled, [0.9] * 4, 0.5)
    assert out.tokens[0] == int(p[0].argmax()) and out.rows[1] == 2  # the second head matched
    # a chain-shaped tree settles exactly as accept_blocks does
    for trial in range(50):
        k = 3
        p = sampling_probs(torch.randn(k + 1, vocab, generator=g), 1.0)
        q = sampling_probs(torch.randn(k + 1, vocab, generator=g), 1.0)
        drafts = [int(torch.multinomial(q[t], 1, generator=g)) for t in range(k)]
        u = torch.rand(k + 1, generator=g, dtype=torch.float64)
        chain = accept_blocks(p[None], q[None, :k], torch.tensor([drafts]), torch.tensor([k]), u[None, :k], u[k:])[0]
        tree = accept_tree(p, q, drafts, [-1, 0, 1], [True] * k, u[:k].tolist(), float(u[k]))
        assert (tree.tokens, tree.accepted) == (chain.tokens, chain.accepted), trial
        assert tree.rows == list(range(len(tree.tokens)))


def test_every_role_holds_exactly_the_accepted_path_after_a_tree_block(engine, monkeypatch):
    """Through the engine, on every role (the drafter and each verifier): whenever a
    session's next call starts, its cache holds exactly the context accepted so far, less the
    one token the last block added itself (the correction or bonus): no tree node off the
    accepted path, nothing accepted recomputed."""
    import asyncio

    from eft_router.core.spec import SamplingParams, SpeculativeParams
    from eft_router.engine import GenerationRequest

    seen, checked = {}, [0]
    acquire = RoleWorker._acquire

    def checking(self, items, keeps):
        sessions = acquire(self, items, keeps)
        for (role, session_id, token_ids), keep, session in zip(items, keeps, sessions):
            assert session.tree is None
            context = list(token_ids)[: keep + 1]  # the call's context (a scored tree's nodes follow it)
            if (self.info.name, role, session_id) in seen:  # not its first call: the accepted path is cached
                assert session.tokens == context[:-1], (self.info.name, role)
                checked[0] += 1
            seen[(self.info.name, role, session_id)] = True
        return sessions

    monkeypatch.setattr(RoleWorker, "_acquire", checking)
    speculative = SpeculativeParams(k=4, confidence=0.5, tree_width=4)
    requests = [
        GenerationRequest(engine.tokenizer(p)["input_ids"], sampling=s, speculative=speculative)
        for p in ("w1 w2 w3", "w7", "w30 w31 w30 w31")
        for s in (SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True),
                  SamplingParams(temperature=1.0, seed=3, max_new_tokens=24, ignore_eos=True))
    ]

    async def run_all():
        return await asyncio.gather(*map(engine.generate, requests))

    outs = asyncio.run(run_all())
    trees = sum(o.stats.drafted_tokens > 4 * o.stats.blocks for o in outs)  # requests whose blocks branched
    assert checked[0] > 100 and trees > 0, (checked, trees)
