"""Exactness of the speculative acceptance rule ``accept_blocks``, without the engine.

In the spirit of vLLM's rejection-sampler tests, but exact rather than sampled: the
function takes its randomness as explicit uniforms, so the law of its output can be
computed by integrating over them. For draft tokens we enumerate every value (weight
q_t(x)); for each uniform we compute the exact pushforward of Lebesgue measure on [0, 1)
through ``accept_block`` itself, by bisection on the boundaries of its piecewise-constant
output (see :func:`pushforward`). The result is compared with the law that the maths says
a block must have when target rows ``p`` and draft rows ``q`` are fixed:

    P(emit y_1..y_j) = prod_{i<j} min(p_i(y_i), q_i(y_i))
                       * (max(0, p_j(y_j) - q_j(y_j))   if j <= k   (rejected at j)
                          p_{k+1}(y_j)                   if j = k+1) (all accepted, bonus)

whose first-token marginal is p_1: that is what makes speculative sampling exact.

A Monte-Carlo test with real random draws checks the same law (and what it implies for the
marginals) independently of the bisection machinery, with every block of the sample settled
in one batched call; and a batch of blocks of mixed lengths (a step's blocks, padded) settles
each block exactly as it settles alone.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, defaultdict
from typing import Callable, Hashable

import numpy as np
import pytest
import torch
from scipy.stats import power_divergence

from eft_router.core.acceptance import BlockOutcome, accept_blocks
from eft_router.core.sampling import sample_from, sampling_probs

V = 5
U_MAX = 1.0 - 2.0**-53  # the largest double below 1: uniforms live in [0, 1)
TOL = 2.0**-38  # bisection resolution of a boundary (~4e-12)
ATOL = 2e-6  # float32 rows and cumsums, plus TOL per boundary


# -- exact integration over a uniform ----------------------------------------------------


def pushforward(f: Callable[[float], Hashable], tol: float = TOL) -> dict[Hashable, list[tuple[float, float]]]:
    """Preimages in [0, 1) of each value of a piecewise-constant ``f``, as intervals.

    Bisection: an interval whose two ends give the same value is taken as constant, so the
    result is exact (to ``tol`` per boundary) when every value's preimage is one interval,
    which holds for inverse-CDF sampling and for "accept iff u < threshold". The fine-grid
    tests below check that assumption for the functions used here.
    """
    pieces: dict[Hashable, list[tuple[float, float]]] = defaultdict(list)
    stack = [(0.0, U_MAX, f(0.0), f(U_MAX))]
    while stack:
        lo, hi, flo, fhi = stack.pop()
        if flo == fhi:
            pieces[flo].append((lo, hi))
        elif hi - lo <= tol:
            mid = (lo + hi) / 2
            pieces[flo].append((lo, mid))
            pieces[fhi].append((mid, hi))
        else:
            mid = (lo + hi) / 2
            fmid = f(mid)
            stack.append((lo, mid, flo, fmid))
            stack.append((mid, hi, fmid, fhi))
    return pieces


def measure(intervals: list[tuple[float, float]]) -> float:
    return sum(hi - lo for lo, hi in intervals)


def inside(intervals: list[tuple[float, float]]) -> float:
    """A uniform well inside the largest interval."""
    lo, hi = max(intervals, key=lambda iv: iv[1] - iv[0])
    return (lo + hi) / 2


def accept_block(p: torch.Tensor, q: torch.Tensor, drafts: list[int], accept_us: list[float], final_u: float) -> BlockOutcome:
    """``accept_blocks`` for one block: p ``[k+1, V]``, q at least ``[k, V]``, k = len(drafts)."""
    k = len(drafts)
    (out,) = accept_blocks(
        p[None], q[None, :k], torch.tensor([drafts], dtype=torch.long).reshape(1, k), torch.tensor([k]),
        torch.tensor([accept_us[:k]], dtype=torch.float64).reshape(1, k), torch.tensor([final_u], dtype=torch.float64),
    )
    return out


def run_block(p: torch.Tensor, q: torch.Tensor, drafts: list[int], accept_us: list[float], final_u: float) -> tuple[int, ...]:
    out = accept_block(p, q, drafts, accept_us, final_u)
    tokens = tuple(out.tokens)
    # structural invariants of every outcome
    assert 0 <= out.accepted <= len(drafts)
    assert len(tokens) == out.accepted + 1
    assert list(tokens[: out.accepted]) == drafts[: out.accepted]
    assert all(isinstance(t, int) and 0 <= t < p.shape[-1] for t in tokens)
    return tokens


def enumerate_block(p: torch.Tensor, q: torch.Tensor, depth: int | None = None) -> dict[tuple[int, ...], float]:
    """Exact law of the first ``min(J, depth)`` emitted tokens of ``accept_block``.

    Draft x_t ~ q_t independently (rows are fixed), acceptance uniforms and the final uniform
    iid U[0, 1). ``depth`` None means the whole block. Everything is computed by calling
    ``accept_block``; no formula for the rule is used here.
    """
    k, vocab = q.shape
    depth = k + 1 if depth is None else depth
    qd = q.double().numpy()
    law: dict[tuple[int, ...], float] = defaultdict(float)
    filler = [int(q[t].argmax()) for t in range(k)]  # later draft slots, never reached

    def rec(prefix: list[int], us: list[float], weight: float) -> None:
        t = len(prefix)
        if t == k:  # every draft accepted: the bonus token
            for tokens, ivs in pushforward(lambda u: run_block(p, q, prefix, us, u)).items():
                law[tokens] += weight * measure(ivs)
            return
        for x in range(vocab):
            if qd[t, x] == 0.0:
                continue  # never drafted
            drafts = prefix + [x] + filler[t + 1 :]
            rest = [0.5] * (k - t - 1)
            passed = pushforward(lambda u: len(run_block(p, q, drafts, us + [u] + rest, 0.5)) > t + 1)
            if passed.get(False):
                u_rej = inside(passed[False])
                w = weight * qd[t, x] * measure(passed[False])
                for tokens, ivs in pushforward(lambda u: run_block(p, q, drafts, us + [u_rej] + rest, u)).items():
                    assert len(tokens) == t + 1, "a rejected block must end at the rejection"
                    law[tokens[:depth]] += w * measure(ivs)
            if passed.get(True):
                w = weight * qd[t, x] * measure(passed[True])
                if t + 1 >= depth:
                    law[tuple(prefix + [x])[:depth]] += w
                else:
                    rec(prefix + [x], us + [inside(passed[True])], w)

    rec([], [], 1.0)
    return dict(law)


def theoretical_block_law(p: torch.Tensor, q: torch.Tensor, resample_from_p: bool = False) -> dict[tuple[int, ...], float]:
    """The law stated in the module docstring, from the rows alone. ``resample_from_p`` gives
    the law of a wrong rule whose rejections resample from p instead of
    normalize(max(0, p - q)) (the power check uses it)."""
    pd, qd = p.double().numpy(), q.double().numpy()
    k, vocab = qd.shape
    law: dict[tuple[int, ...], float] = defaultdict(float)

    def rec(prefix: tuple[int, ...], weight: float) -> None:
        t = len(prefix)
        if t == k:
            for y in range(vocab):
                law[prefix + (y,)] += weight * pd[k, y]
            return
        reject = 1.0 - np.minimum(pd[t], qd[t]).sum()
        for y in range(vocab):
            # P(reject at t, then y) = max(0, p - q)(y) for the right rule (the residual's mass
            # is exactly the rejection probability); reject * p(y) for the wrong one
            law[prefix + (y,)] += weight * (reject * pd[t, y] if resample_from_p else max(0.0, pd[t, y] - qd[t, y]))
            m = min(pd[t, y], qd[t, y])
            if m > 0:
                rec(prefix + (y,), weight * m)

    rec((), 1.0)
    return {key: w for key, w in law.items() if w > 0}


def first_token_law(law: dict[tuple[int, ...], float], vocab: int) -> np.ndarray:
    out = np.zeros(vocab)
    for tokens, w in law.items():
        out[tokens[0]] += w
    return out


def assert_laws_close(got: dict, want: dict, atol: float = ATOL) -> None:
    keys = set(got) | set(want)
    bad = {key: (got.get(key, 0.0), want.get(key, 0.0)) for key in keys if abs(got.get(key, 0.0) - want.get(key, 0.0)) > atol}
    assert not bad, f"{len(bad)} outcomes differ (got, want): {dict(list(sorted(bad.items()))[:10])}"


# -- test distributions ------------------------------------------------------------------

KINDS = ("random", "p_zeros", "q_zeros", "both_zeros", "disjoint", "equal", "filtered", "one_hot")


def rows(kind: str, k: int, seed: int, vocab: int = V) -> tuple[torch.Tensor, torch.Tensor]:
    """Target p ``[k+1, V]`` and draft q ``[k, V]`` (float32, like the engine's)."""
    g = torch.Generator().manual_seed(1000 * seed + 17 * k + KINDS.index(kind))

    def rand(n: int, scale: float = 1.5) -> torch.Tensor:
        return torch.softmax(scale * torch.randn(n, vocab, generator=g), dim=-1)

    def zero_some(x: torch.Tensor) -> torch.Tensor:
        # zero 1..V-2 entries per row (never all), renormalise
        x = x.clone()
        for r in range(x.shape[0]):
            n = int(torch.randint(1, vocab - 1, (1,), generator=g))
            idx = torch.randperm(vocab, generator=g)[:n]
            x[r, idx] = 0.0
        return x / x.sum(-1, keepdim=True)

    p, q = rand(k + 1), rand(k)
    if kind == "p_zeros":  # p is zero where q is not
        p = zero_some(p)
    elif kind == "q_zeros":  # q is zero where p is not
        q = zero_some(q)
    elif kind == "both_zeros":
        p, q = zero_some(p), zero_some(q)
    elif kind == "disjoint":  # no overlap at all: every draft is rejected
        half = vocab // 2
        p[:, :half] = 0.0
        q[:, half:] = 0.0
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    elif kind == "equal":  # q == p: every draft accepted
        q = p[:k].clone()
    elif kind == "filtered":  # what the engine actually feeds: temperature, top-k, top-p
        p = sampling_probs(2 * torch.randn(k + 1, vocab, generator=g), 0.7, top_k=3, top_p=0.9)
        q = sampling_probs(2 * torch.randn(k, vocab, generator=g), 0.7, top_k=4, top_p=0.8)
    elif kind == "one_hot":  # greedy on both sides
        p = sampling_probs(torch.randn(k + 1, vocab, generator=g), 0.0)
        q = sampling_probs(torch.randn(k, vocab, generator=g), 0.0)
    return p.float(), q.float()


# -- the exact tests -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_emitted_token_is_distributed_as_p(kind: str, k: int, seed: int) -> None:
    p, q = rows(kind, k, seed)
    law = enumerate_block(p, q, depth=1)
    got = first_token_law(law, V)
    assert got.sum() == pytest.approx(1.0, abs=ATOL)
    np.testing.assert_allclose(got, p[0].double().numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_whole_block_law(kind: str, k: int, seed: int) -> None:
    p, q = rows(kind, k, seed)
    want = theoretical_block_law(p, q)
    assert sum(want.values()) == pytest.approx(1.0, abs=1e-6)
    assert first_token_law(want, V) == pytest.approx(p[0].double().numpy(), abs=1e-6)  # the maths itself
    assert_laws_close(enumerate_block(p, q), want)


@pytest.mark.parametrize("kind", ["random", "both_zeros", "filtered"])
def test_whole_block_law_k3(kind: str) -> None:
    p, q = rows(kind, 3, seed=5, vocab=4)
    assert_laws_close(enumerate_block(p, q), theoretical_block_law(p, q))


def test_acceptance_probability_is_min_one_p_over_q() -> None:
    """Per draft token, the measure of accepting uniforms is min(1, p/q), and it is the
    interval [0, p/q): acceptance is ``u * q < p``."""
    for kind in KINDS:
        p, q = rows(kind, 1, seed=3)
        for x in range(V):
            qx, px = float(q[0, x]), float(p[0, x])
            if qx == 0.0:
                continue
            passed = pushforward(lambda u: accept_block(p, q, [x], [u], 0.5).accepted == 1)
            assert measure(passed.get(True, [])) == pytest.approx(min(1.0, px / qx), abs=1e-9)
            if passed.get(True):
                assert min(lo for lo, _ in passed[True]) == 0.0  # small uniforms accept


def test_rejection_samples_the_normalised_residual() -> None:
    p = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.6, 0.3, 0.0, 0.0]])
    residual = np.array([0.4, 0.0, 0.0, 0.2, 0.0]) / 0.6
    # draft 1 has p = 0: always rejected, whatever the acceptance uniform
    for u_acc in (0.0, 0.3, U_MAX):
        law = pushforward(lambda u: run_block(p, q, [1], [u_acc], u))
        got = np.zeros(V)
        for tokens, ivs in law.items():
            assert len(tokens) == 1
            got[tokens[0]] += measure(ivs)
        np.testing.assert_allclose(got, residual, atol=ATOL)


# -- fine grids: the bisection's one-interval assumption, and sample_from directly ----------


def grid(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


@pytest.mark.parametrize(
    "probs",
    [
        [0.0, 0.25, 0.0, 0.5, 0.25, 0.0],  # zeros first, between, last
        [0.1, 0.0, 0.0, 0.05, 0.0, 0.0],  # unnormalised (a residual's mass), zero tail
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # one-hot
        [1e-7, 0.3, 0.0, 0.2, 0.1, 0.4 - 1e-7],
    ],
)
def test_sample_from_on_a_fine_grid(probs: list[float]) -> None:
    """Inverse-CDF sampling on 100000 midpoints gives every token its probability to grid
    resolution, never a zero-probability token, even at the ends of [0, 1)."""
    t = torch.tensor(probs, dtype=torch.float32)
    n = 100_000
    samples = sample_from(t.expand(n, -1), grid(n))  # every uniform of the grid in one batch
    freq = np.bincount(samples.numpy(), minlength=len(probs)) / n
    want = np.array(probs) / sum(probs)
    np.testing.assert_allclose(freq, want, atol=1.0 / n + 1e-6)
    zero = np.array(probs) == 0
    assert (freq[zero] == 0).all()
    for u in (0.0, 1e-300, 0.5, U_MAX, 1.0):
        assert probs[int(sample_from(t, u))] > 0
    assert bool((samples[1:] >= samples[:-1]).all())  # monotone in the uniform
    sub = grid(n)[:: n // 500]  # one distribution at a time samples what the batch did
    assert samples[:: n // 500].tolist() == [int(sample_from(t, float(u))) for u in sub]


def test_accept_block_final_uniform_on_a_fine_grid() -> None:
    """The rejection and bonus samples through accept_block, on a 20000-point grid: the
    residual normalize(max(0, p - q)) and p_{k+1}, each token's preimage one interval."""
    p, q = rows("both_zeros", 2, seed=7)
    x = int(torch.nonzero(q[0] > p[0])[0])  # a token that can be rejected
    reject = min(1.0, float(p[0, x]) / float(q[0, x]))  # any u >= p/q rejects
    u_rej = (reject + 1.0) / 2
    residual = torch.clamp(p[0].double() - q[0].double(), min=0.0)
    residual = (residual / residual.sum()).numpy()
    n = 20_000

    def last_tokens(drafts: list[int], accept_us: list[float]) -> np.ndarray:
        """The block's last token for every uniform of the grid, in one batched call."""
        out = accept_blocks(
            p.expand(n, -1, -1), q.expand(n, -1, -1), torch.tensor([drafts] * n), torch.full((n,), 2),
            torch.tensor([accept_us] * n, dtype=torch.float64), grid(n),
        )
        assert all(tuple(o.tokens) == run_block(p, q, drafts, accept_us, float(u)) for o, u in zip(out[:: n // 100], grid(n)[:: n // 100]))
        return np.array([o.tokens[-1] for o in out])

    rejected = last_tokens([x, 0], [u_rej, 0.5])
    np.testing.assert_allclose(np.bincount(rejected, minlength=V) / n, residual, atol=1.0 / n + 1e-6)
    assert (np.diff(rejected) >= 0).all()  # each token's preimage is one interval
    # all accepted (uniform 0 accepts any token with p > 0): the bonus is from p[k]
    drafts = [int(torch.nonzero((p[t] > 0) & (q[t] > 0))[0]) for t in range(2)]
    bonus = last_tokens(drafts, [0.0, 0.0])
    np.testing.assert_allclose(np.bincount(bonus, minlength=V) / n, p[2].double().numpy(), atol=1.0 / n + 1e-6)


def test_a_batch_of_mixed_blocks_settles_each_as_alone() -> None:
    """A step's blocks: different k (0 for plain requests), padded to the longest with junk
    beyond each block's own positions, different distributions. Each row's outcome is the
    one its block gets alone, whatever pads and neighbours it has."""
    g = torch.Generator().manual_seed(3)
    vocab, kmax = 7, 5
    for trial in range(40):
        ks = torch.randint(0, kmax + 1, (6,), generator=g).tolist()
        batch = len(ks)
        temperature = [0.0, 0.7, 1.0][trial % 3]
        p = sampling_probs(2 * torch.randn(batch, kmax + 1, vocab, generator=g), temperature)
        q = sampling_probs(2 * torch.randn(batch, kmax, vocab, generator=g), temperature)
        drafts = torch.stack([torch.multinomial(q[b], 1, generator=g).squeeze(-1) for b in range(batch)])
        us = torch.rand(batch, kmax + 1, generator=g, dtype=torch.float64)
        got = accept_blocks(p, q, drafts, torch.tensor(ks), us[:, :kmax], us[:, kmax])
        for b, k in enumerate(ks):
            alone = accept_block(p[b, : k + 1], q[b, :k], drafts[b, :k].tolist(), us[b, :k].tolist(), float(us[b, kmax]))
            assert got[b] == alone, (trial, b, k)


def test_a_block_without_a_bonus_ends_at_its_last_accepted_draft() -> None:
    """``bonus`` false (the overlapped pipeline's blocks): every outcome is the one with a
    bonus, less the bonus token when all drafts are accepted, so its law is the law above
    with the bonus summed out (exact too), and a rejected block is untouched."""
    g = torch.Generator().manual_seed(4)
    vocab, kmax, ended = 6, 4, 0
    for trial in range(40):
        ks = torch.randint(1, kmax + 1, (8,), generator=g).tolist()
        batch = len(ks)
        p = sampling_probs(torch.randn(batch, kmax + 1, vocab, generator=g), [0.0, 1.0][trial % 2])
        q = sampling_probs(torch.randn(batch, kmax, vocab, generator=g) + 2 * p[:, :kmax], [0.0, 1.0][trial % 2])
        drafts = torch.stack([torch.multinomial(q[b], 1, generator=g).squeeze(-1) for b in range(batch)])
        us = torch.rand(batch, kmax + 1, generator=g, dtype=torch.float64)
        bonus = torch.rand(batch, generator=g) < 0.5
        with_bonus = accept_blocks(p, q, drafts, torch.tensor(ks), us[:, :kmax], us[:, kmax])
        got = accept_blocks(p, q, drafts, torch.tensor(ks), us[:, :kmax], us[:, kmax], bonus=bonus)
        for b, k in enumerate(ks):
            want = with_bonus[b]
            if not bonus[b] and want.accepted == k:
                want = BlockOutcome(want.tokens[:k], k)
                ended += 1
            assert got[b] == want, (trial, b, k)
    assert ended > 20  # the no-bonus ending really happened


# -- greedy --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_one_hot(k: int) -> None:
    """One-hot p and q: accept while the draft equals argmax p, then emit argmax p at that
    position (argmax p[k] when all are accepted), for every draft sequence and any uniforms."""
    g = torch.Generator().manual_seed(k)
    for trial in range(4):
        p = sampling_probs(torch.randn(k + 1, V, generator=g), 0.0)
        best = p.argmax(-1).tolist()
        for drafts in itertools.product(range(V), repeat=k):
            q = torch.zeros(k, V).scatter_(-1, torch.tensor(drafts).unsqueeze(-1), 1.0)
            n = next((t for t in range(k) if drafts[t] != best[t]), k)
            want = list(drafts[:n]) + [best[n]]
            for us in ([0.0] * (k + 1), [U_MAX] * (k + 1), torch.rand(k + 1, generator=g).tolist()):
                out = accept_block(p, q, list(drafts), us[:k], us[k])
                assert out.tokens == want and out.accepted == n, (drafts, best, us)


# -- Monte Carlo ---------------------------------------------------------------------------


def g_test(counts: dict, law: dict, n: int, min_expected: float = 5.0) -> float:
    """G-test p-value of observed counts against a law, cells with expected count below
    ``min_expected`` merged into one. Observations outside the law's support give 0."""
    if any(key not in law or law[key] <= 0 for key in counts):
        return 0.0
    big = [key for key in law if law[key] * n >= min_expected]
    obs = [counts.get(key, 0) for key in big]
    exp = [law[key] * n for key in big]
    small_exp = n - sum(exp)
    if small_exp > 1e-9 * n:
        obs.append(n - sum(obs))
        exp.append(small_exp)
    exp = np.array(exp) * (n / sum(exp))  # absorb float rounding of the law
    return float(power_divergence(obs, exp, lambda_="log-likelihood").pvalue)


def test_monte_carlo_joint_law_k2() -> None:
    """200000 real blocks (k = 2, V = 4; drafts from q, uniforms from a PRNG) against the
    exact law of the emitted tokens, and the two marginals it implies:

    * the first emitted token is distributed as p_1 (whatever J);
    * given J >= 2 (the first token was an accepted draft), the pair (t_1, t_2) is
      normalize(min(p_1, q_1)) x p_2: t_2 ~ p_2, independent of t_1, but t_1 is NOT ~ p_1
      there (acceptance favours tokens that q_1 under-weights less).

    The same counts must reject the law of a wrong rule (residual p instead of
    max(0, p - q)) at p < 1e-6, so the sample size has power."""
    vocab, k, n = 4, 2, 200_000
    p = torch.tensor([[0.40, 0.30, 0.20, 0.10], [0.05, 0.15, 0.30, 0.50], [0.25, 0.25, 0.10, 0.40]])
    q = torch.tensor([[0.10, 0.50, 0.40, 0.00], [0.30, 0.30, 0.10, 0.30]])
    rng = np.random.default_rng(12345)
    drafts = np.stack([rng.choice(vocab, size=n, p=q[t].double().numpy() / q[t].double().sum().item()) for t in range(k)], 1)
    us = rng.random((n, k + 1))
    drafts_l = drafts.tolist()
    start = time.perf_counter()
    outcomes = accept_blocks(
        p.expand(n, -1, -1), q.expand(n, -1, -1), torch.tensor(drafts_l), torch.full((n,), k),
        torch.tensor(us[:, :k]), torch.tensor(us[:, k]),
    )  # every block of the sample in one batched call
    counts = Counter(tuple(o.tokens) for o in outcomes)
    elapsed = time.perf_counter() - start  # printed, never asserted

    law = theoretical_block_law(p, q)
    p_joint = g_test(counts, law, n)
    print(f"joint G-test p = {p_joint:.3g} ({n} blocks in {elapsed:.1f} s)")
    assert p_joint > 1e-3

    pd, qd = p.double().numpy(), q.double().numpy()
    first = Counter()
    for tokens, c in counts.items():
        first[tokens[0],] += c
    p_first = g_test(first, {(y,): pd[0, y] for y in range(vocab)}, n)
    print(f"first-token G-test p = {p_first:.3g}")
    assert p_first > 1e-3

    pairs = Counter()
    for tokens, c in counts.items():
        if len(tokens) >= 2:
            pairs[tokens[:2]] += c
    n2 = sum(pairs.values())
    m = np.minimum(pd[0], qd[0])
    pair_law = {(a, b): m[a] / m.sum() * pd[1, b] for a in range(vocab) for b in range(vocab) if m[a] * pd[1, b] > 0}
    assert n2 == pytest.approx(n * m.sum(), rel=0.02)
    p_pair = g_test(pairs, pair_law, n2)
    print(f"pair | J >= 2 G-test p = {p_pair:.3g} ({n2} blocks)")
    assert p_pair > 1e-3
    # power: t_1 given J >= 2 is not p_1, and a residual of p is detectably wrong
    naive = {(a, b): pd[0, a] * pd[1, b] for a in range(vocab) for b in range(vocab)}
    p_naive, p_wrong = g_test(pairs, naive, n2), g_test(counts, theoretical_block_law(p, q, resample_from_p=True), n)
    print(f"power: pair vs p_1 x p_2 p = {p_naive:.3g}; joint vs residual-p law p = {p_wrong:.3g}")
    assert p_naive < 1e-6
    assert p_wrong < 1e-6
