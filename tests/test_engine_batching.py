"""Continuous batching: every live request advances in one step, with one call per role per
step, and a request's output is what it would be alone.

Batched rows differ from unbatched ones only by float summation order (padding a session's
row to the step's widest changes the length of reductions): a few float32 ulps of values
up to about 10, within 1e-5. Greedy outputs, and seeded ones away from a tie, are equal
token for token; the tests below require exactly that.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from conftest import KV_CACHE_BYTES, Recording, replica_stats
from eft_router.core.spec import EFTSpec, SamplingParams, SpecError, SpeculativeParams
from eft_router.engine import Engine, Generation, GenerationRequest, QueueFull, SchedulerConfig, ScoreRequest
from eft_router.engine.scheduler import Scheduler
from eft_router.engine.state import RequestState

PROMPTS = ["w1 w2 w3", "w10 w11", "w5 w9 w13 w17", "w40", "w2 w2 w2 w2 w2 w2 w2 w2 w3"]


def ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def specs(engine: Engine) -> list[EFTSpec]:
    """Mixed specs, as far as the engine's roles allow."""
    out = [EFTSpec(), EFTSpec(beta=1.5, weight_top_p=0.9), EFTSpec(preset="interpolate", deltas={"ft_small": 0.5})]
    if "ft_safe" in engine.roles:
        out.append(EFTSpec(preset="interpolate", deltas={"ft_small": 0.7, "ft_safe": 0.3}))
        out.append(EFTSpec(deltas={"ft_small": 0.6, "ft_safe": 0.4}))
    if "ft_large" in engine.roles:
        out.append(EFTSpec(preset="downscale"))
    return out


def mixed_requests(engine: Engine, n: int = 16, max_new_tokens: int = 14) -> list[GenerationRequest]:
    """n requests: mixed specs, k in {0, 1, 4, 8} (half the speculative ones with overlapped
    drafting), greedy and seeded T = 1 (one with top-k and top-p), stop strings that fall
    mid-block."""
    out = []
    all_specs = specs(engine)
    for i in range(n):
        k = (0, 1, 4, 8)[i % 4]
        sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)
        if i % 3 == 1:
            sampling = SamplingParams(temperature=1.0, seed=100 + i, max_new_tokens=max_new_tokens, ignore_eos=True)
        if i % 5 == 2:
            sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7 * i, max_new_tokens=max_new_tokens, ignore_eos=True)
        out.append(GenerationRequest(ids(engine, PROMPTS[i % len(PROMPTS)]), eft=all_specs[i % len(all_specs)], sampling=sampling, speculative=SpeculativeParams(k=k, overlap=i % 8 >= 4)))
    return out


def with_stop_strings(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationRequest]:
    """Every third request gets a stop string: the word it emits at its 6th token alone,
    which falls inside a block for k >= 1."""
    out = []
    for i, r in enumerate(requests):
        if i % 3 == 0:
            probe = alone(engine, r)
            word = engine.tokenizer.decode(probe.token_ids[5:6]).strip()
            r = GenerationRequest(r.prompt_ids, r.eft, SamplingParams(**{**vars(r.sampling), "stop": (word,)}), r.speculative)
        out.append(r)
    return out


def alone(engine: Engine, request: GenerationRequest) -> Generation:
    return asyncio.run(engine.generate(request))


async def together(engine: Engine, requests: list[GenerationRequest], cancel: set[int] = frozenset()) -> list[Generation | None]:
    """All at once; the requests in ``cancel`` are abandoned after their first chunk."""

    async def run(i: int, request: GenerationRequest) -> Generation | None:
        if i not in cancel:
            return await engine.generate(request)
        stream = engine.stream(request)
        async for _ in stream:
            break
        await stream.aclose()
        return None

    return await asyncio.gather(*(run(i, r) for i, r in enumerate(requests)))


@pytest.fixture(params=["in-process", "serve"])
def any_engine(request) -> Engine:
    return request.getfixturevalue("engine" if request.param == "in-process" else "serve_engine")


def sessions_on_roles(engine: Engine) -> dict[str, set[str]]:
    """Sessions cached on each role (every replica, on Serve)."""
    out = {}
    for name, role in engine.roles.items():
        if hasattr(role, "worker"):
            out[name] = set(role.worker.sessions.ids())
        else:
            replicas = max(1, len(role.replicas()))
            out[name] = {s for st in replica_stats(role, replicas).values() for s in st["sessions"]}
    return out


# -- a request's output never depends on what shares its steps --------------------------------


def test_concurrent_requests_equal_each_alone(any_engine):
    engine = any_engine
    requests = with_stop_strings(engine, mixed_requests(engine))
    want = [alone(engine, r) for r in requests]
    assert any(g.finish_reason == "stop" and len(g.token_ids) < 14 for g in want)  # a stop string ended some mid-block
    assert len({tuple(g.token_ids) for g in want}) > 8  # the requests are really different
    cancel = {3, 10}
    before = sessions_on_roles(engine)
    got = asyncio.run(together(engine, requests, cancel))
    for i, (g, w) in enumerate(zip(got, want)):
        if i in cancel:
            assert g is None
            continue
        assert g.token_ids == w.token_ids, (i, requests[i])
        assert g.text == w.text and g.finish_reason == w.finish_reason
        assert g.stats.accepted_per_block == w.stats.accepted_per_block
    assert sessions_on_roles(engine) == before  # finished and cancelled: released everywhere


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(engine):
    """The same seeded request 12 times among 20 others: all 12 outputs are its output alone."""
    target = GenerationRequest(
        ids(engine, "w3 w4"), sampling=SamplingParams(temperature=1.0, seed=42, max_new_tokens=20, ignore_eos=True),
        speculative=SpeculativeParams(k=3),
    )
    want = alone(engine, target).token_ids
    crowd = mixed_requests(engine, 20)
    got = asyncio.run(together(engine, [target] * 6 + crowd + [target] * 6))
    assert [g.token_ids for g in got[:6] + got[-6:]] == [want] * 12


# -- join and leave --------------------------------------------------------------------------


def test_requests_join_while_others_are_mid_generation(engine):
    long = GenerationRequest(ids(engine, "w1"), sampling=SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eos=True))
    short = mixed_requests(engine, 6, max_new_tokens=6)
    want_long, want_short = alone(engine, long), [alone(engine, r) for r in short]

    async def run():
        stream = engine.stream(long)
        chunks, started_at = [], None
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 10:  # the long one is under way: the others join now
                started_at = engine.steps
                joined = asyncio.gather(*(engine.generate(r) for r in short))
        shorts = await joined
        return chunks, shorts, started_at

    chunks, shorts, started_at = asyncio.run(run())
    assert [t for c in chunks for t in c.token_ids] == want_long.token_ids
    assert [g.token_ids for g in shorts] == [g.token_ids for g in want_short]
    assert started_at is not None


@pytest.mark.parametrize("how", ["cancelled", "deadline"])
def test_a_leaving_request_frees_its_slot_on_every_role_within_a_step(engine, how):
    busy = GenerationRequest(ids(engine, "w5 w6"), sampling=SamplingParams(temperature=0.0, max_new_tokens=200, ignore_eos=True))
    leaving = GenerationRequest(
        ids(engine, "w7"), sampling=SamplingParams(temperature=0.0, max_new_tokens=200, ignore_eos=True),
        speculative=SpeculativeParams(k=2), session_id="leaver-" + uuid.uuid4().hex,
    )

    async def run() -> tuple[int, int]:
        other = asyncio.ensure_future(engine.generate(busy))
        stream = engine.stream(leaving)
        async for _ in stream:
            if engine.steps > 5:
                break
        if how == "cancelled":
            await stream.aclose()
        else:  # the deadline: the request's task is cancelled while it awaits its next chunk
            task = asyncio.ensure_future(asyncio.wait_for(_next(stream), timeout=0.001))
            with pytest.raises(asyncio.TimeoutError):
                await task
            await stream.aclose()
        left_at = engine.steps
        while any(leaving.session_id in s for s in sessions_on_roles(engine).values()):
            await asyncio.sleep(0.001)
        freed_at = engine.steps
        await other
        return left_at, freed_at

    left_at, freed_at = asyncio.run(run())
    assert freed_at - left_at <= 2  # the step in flight, then the one that releases it


async def _next(stream):
    return await stream.__anext__()


# -- back-pressure and limits ---------------------------------------------------------------


def test_more_requests_than_kv_slots_queue_and_all_finish(family_paths):
    """A cache with 6 slots per role and 20 requests: they wait for slots (back-pressure),
    never fail, and each equals its output alone."""
    small = Engine.local(family_paths, kv_cache_bytes=6 * 2 * 2 * 4 * 16 * 513 * 4)
    assert min(r.info.kv_slots for r in small.roles.values()) == 6 and small.scheduler.max_running == 6
    requests = mixed_requests(small, 20, max_new_tokens=8)
    want = [alone(small, r).token_ids for r in requests]
    peak = []
    small.on_step = lambda step: peak.append(step.requests)
    got = asyncio.run(together(small, requests))
    assert [g.token_ids for g in got] == want
    assert max(peak) == 6  # never more running than slots


def test_a_full_queue_is_refused_and_a_request_that_can_never_fit_is_invalid(family_paths):
    engine = Engine.local(family_paths, kv_cache_bytes=KV_CACHE_BYTES, max_seq_len=64, config=SchedulerConfig(max_num_seqs=1, max_queued_requests=2))
    with pytest.raises(SpecError, match=r"sampling.max_new_tokens: prompt \(4 tokens\) \+ max_new_tokens \(64\) must fit the KV cache slot of 64 tokens"):
        alone(engine, GenerationRequest(ids(engine, "w1 w2 w3 w4"), sampling=SamplingParams(max_new_tokens=64)))
    request = GenerationRequest(ids(engine, "w1"), sampling=SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True))

    async def run():
        first = [asyncio.ensure_future(engine.generate(request)) for _ in range(3)]  # 1 running, 2 waiting
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue is full \\(2 requests waiting"):
            await engine.generate(request)
        return await asyncio.gather(*first)

    assert len({tuple(g.token_ids) for g in asyncio.run(run())}) == 1


# -- one call per role per step ---------------------------------------------------------------


@pytest.mark.parametrize("k, overlap", [(0, False), (4, False), (4, True)])
def test_role_calls_per_step_do_not_grow_with_requests(engine, k, overlap):
    """Each step makes at most one score call per role and one draft call per drafter (the
    drafter also scores for requests whose last block drafts nothing), and with overlapped
    drafting one more draft call, past the blocks being verified, whether 1, 4 or 16
    requests share it; the calls carry every request's items."""
    most, items_per_call = {}, {}
    for n in (1, 4, 16):
        log: list = []
        roles = {name: Recording(role, log) for name, role in engine.roles.items() if name in ("base_large", "base_small", "ft_small")}
        e = Engine(roles, engine.tokenizer)
        seen, per_step = [0], []

        def calls() -> list[int]:  # the items of every score and draft call so far
            return [items for event, call, items in log if event == "start" and call in ("score", "draft")]

        def count(step) -> None:
            total = len(calls())
            per_step.append(total - seen[0])
            seen[0] = total

        e.on_step = count
        requests = [
            GenerationRequest(ids(engine, PROMPTS[i % 4]), sampling=SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True), speculative=SpeculativeParams(k=k, overlap=overlap))
            for i in range(n)
        ]
        asyncio.run(together(e, requests))
        most[n] = max(per_step)
        items_per_call[n] = sum(calls()) / len(calls())
    if overlap:  # a fresh draft and one ahead can share a step with every score (4 or 5 calls)
        assert max(most.values()) in (4, 5) and len(set(most.values())) == 1, most
    else:
        assert max(most.values()) == (3 if k == 0 else 4), most  # 3 roles, and a drafter
    assert items_per_call[16] > 8 * items_per_call[1], items_per_call


# -- chunked prefill -------------------------------------------------------------------------


def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_output(family_paths, engine):
    chunked = Engine.local(family_paths, kv_cache_bytes=KV_CACHE_BYTES, config=SchedulerConfig(max_num_batched_tokens=16))
    prompt = ids(engine, " ".join(f"w{i % 60}" for i in range(100)))
    for k in (0, 3):
        request = GenerationRequest(prompt, sampling=SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True), speculative=SpeculativeParams(k=k))
        steps = chunked.steps
        assert alone(chunked, request).token_ids == alone(engine, request).token_ids
        assert chunked.steps - steps >= 100 // 16  # the prompt took several steps
    score = ScoreRequest(prompt[:60], prompt[60:])
    got, want = asyncio.run(chunked.score(score)), asyncio.run(engine.score(score))
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)


def test_the_scheduler_admits_first_come_first_served_within_the_budget():
    def waiting(n: int, tokens: int) -> RequestState:
        from eft_router.core.spec import CombinationPlan

        return RequestState(f"r{n}", list(range(tokens)), CombinationPlan({"base_small": 1.0}), ("base_small",), tokens)

    s = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=10), max_running=8)
    a, b, c, d = waiting(0, 4), waiting(1, 30), waiting(2, 2), waiting(3, 2)
    for r in (a, b, c, d):
        s.add(r)

    def work():
        return [(w.request.session_id, w.start, w.end, w.block) for w in s.schedule().work]

    # a fits whole; b gets a chunk of what is left (its prompt's last token waits for the
    # step that runs its first block); c waits behind b: first come, first served
    assert work() == [("r0", 0, 4, True), ("r1", 0, 6, False)]
    assert work() == [("r0", 4, 4, True), ("r1", 6, 16, False)]  # a running decode goes first
    a.finished = True
    plan = s.schedule()
    assert plan.leaving == [a] and [(w.request, w.end) for w in plan.work] == [(b, 26)]
    assert work() == [("r1", 26, 30, True), ("r2", 0, 2, True), ("r3", 0, 2, True)]
    assert len(s.running) == 3 and not s.waiting


def test_in_process_forward_passes_leave_the_event_loop_free(engine, monkeypatch):
    """The in-process roles compute on a thread of their own: while a forward pass runs (made
    to take 0.3 s here), the event loop keeps turning, so health checks and new requests on
    the router's loop never wait behind a step."""
    import threading
    import time

    worker = engine.roles["base_large"].worker
    score, threads = worker.score, set()

    def slow_score(items):
        threads.add(threading.get_ident())
        time.sleep(0.3)
        return score(items)

    monkeypatch.setattr(worker, "score", slow_score)

    async def scenario() -> float:
        ticks = [time.monotonic()]
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic())

        ticking = asyncio.create_task(ticker())
        prompt = engine.tokenizer("w1 w2 w3")["input_ids"]
        await engine.generate(GenerationRequest(prompt, sampling=SamplingParams(temperature=0.0, max_new_tokens=2)))
        done.set()
        await ticking
        assert threading.get_ident() not in threads and threads
        return max(b - a for a, b in zip(ticks, ticks[1:]))

    assert asyncio.run(scenario()) < 0.15
