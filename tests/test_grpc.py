"""The gRPC router end to end, over real sockets on localhost.

Two routers: one on the in-process backend (the tiny family in this process) and one on
the Serve backend (the shared Ray cluster of conftest). Both must give the engine"s output.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import grpc
import pytest
from google.protobuf import json_format

from eft_router.api import eft_pb2 as pb
from eft_router.server.client import AsyncEFTClient, EFTClient
from eft_router.engine import Engine, Generation, GenerationRequest, ScoreRequest
from eft_router.server.messages import RequestDefaults
from eft_router.server.config import RouterConfig
from eft_router.server.grpc_server import Router, RouterThread
from eft_router.core.spec import EFTSpec, SamplingParams, SpeculativeParams

PROMPTS = ["w1 w2 w3", "w7", "w30 w31 w30 w31 w5"]
LONG = dict(max_tokens=400, ignore_eos=True, temperature=1.0)  # a generation that takes a while


def local_router(engine: Engine, **config) -> RouterThread:
    """A router on the in-process backend, sharing the tiny family"s loaded roles."""

    async def make() -> Router:
        return Router(engine.roles, engine.tokenizer, RouterConfig(**{"port": 0, "http_port": 0, **config}), RequestDefaults(), "local")

    return RouterThread(make)


@pytest.fixture(scope="module")
def local(engine):
    with local_router(engine) as router:
        yield router


@pytest.fixture(scope="module")
def served(served_ensemble):
    from services.launch import router_factory

    config = served_ensemble.config.model_copy(update={"router": RouterConfig(port=0, http_port=0)})
    with RouterThread(router_factory(config, "serve")) as router:
        yield router


@pytest.fixture(params=["local", "serve"])
def router(request) -> RouterThread:
    return request.getfixturevalue("local" if request.param == "local" else "served")


@pytest.fixture
def client(router):
    with EFTClient(f"localhost:{router.port}", timeout=60) as c:
        yield c


def engine_generation(engine: Engine, prompt: str, k: int = 0, **sampling) -> Generation:
    ids = engine.tokenizer(prompt)["input_ids"]
    params = SamplingParams(**({"temperature": 0.0, "max_new_tokens": 16} | sampling))
    return asyncio.run(engine.generate(GenerationRequest(ids, sampling=params, speculative=SpeculativeParams(k=k))))


def engine_generate(engine: Engine, prompt: str, k: int = 0, **sampling) -> list[int]:
    return engine_generation(engine, prompt, k, **sampling).token_ids


def sessions_on_roles(router: RouterThread) -> dict[str, list[str]]:
    """Sessions cached on every role (every replica) behind the router, by role."""
    out = {}
    for name, timed in router.router.engine.roles.items():
        role = timed.role
        if hasattr(role, "worker"):  # in-process
            out[name] = role.worker.sessions.ids()
        else:  # Serve: every replica of the role
            from conftest import replica_stats

            replicas = 2 if name == "base_small" else 1
            out[name] = [s for st in replica_stats(role, replicas).values() for s in st["sessions"]]
    return out


def wait_until_free(router: RouterThread, seconds: float = 1.0) -> dict[str, list[str]]:
    deadline = time.monotonic() + seconds
    while True:
        left = {r: s for r, s in sessions_on_roles(router).items() if s}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# -- generation equals the engine ---------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3])
def test_generate_and_stream_equal_the_engine(client, engine, k):
    for prompt in PROMPTS:
        g = engine_generation(engine, prompt, k=k)
        expected = g.token_ids
        reply = client.generate(prompt, temperature=0.0, max_tokens=16, k=k)
        assert list(reply.token_ids) == expected and reply.text == g.text
        assert reply.usage.completion_tokens == len(expected)
        assert reply.finish_reason == {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}[g.finish_reason]
        chunks = list(client.stream(prompt, temperature=0.0, max_tokens=16, k=k))
        assert [t for c in chunks for t in c.token_ids] == expected
        assert "".join(c.text for c in chunks) == reply.text
        assert chunks[-1].finish_reason == reply.finish_reason and all(not c.finish_reason for c in chunks[:-1])
        if k:
            assert reply.stats.drafted_tokens > 0 and 0 <= reply.stats.acceptance_rate <= 1


def test_seeded_sampling_is_reproducible_and_matches_the_engine(client, engine):
    reply = client.generate("w1 w2", temperature=1.0, seed=7, max_tokens=12, k=2)
    ids = engine.tokenizer("w1 w2")["input_ids"]
    g = asyncio.run(engine.generate(GenerationRequest(ids, sampling=SamplingParams(seed=7, max_new_tokens=12), speculative=SpeculativeParams(k=2))))
    assert list(reply.token_ids) == g.token_ids and reply.stats.seed == 7
    # the draft confidence reaches the engine: the engine's tokens, with fewer drafts
    unsure = client.generate("w1 w2", temperature=1.0, seed=7, max_tokens=12, k=2, draft_confidence=0.2)
    speculative = SpeculativeParams(k=2, confidence=0.2)
    g = asyncio.run(engine.generate(GenerationRequest(ids, sampling=SamplingParams(seed=7, max_new_tokens=12), speculative=speculative)))
    assert list(unsure.token_ids) == g.token_ids and unsure.stats.drafted_tokens == g.stats.drafted_tokens
    assert unsure.stats.drafted_tokens < reply.stats.drafted_tokens
    # so does the adaptive block size: the engine's tokens and drafts
    adaptive = client.generate("w1 w2", temperature=1.0, seed=7, max_tokens=12, k=6, adaptive=True)
    speculative = SpeculativeParams(k=6, adaptive=True)
    g = asyncio.run(engine.generate(GenerationRequest(ids, sampling=SamplingParams(seed=7, max_new_tokens=12), speculative=speculative)))
    assert list(adaptive.token_ids) == g.token_ids and adaptive.stats.drafted_tokens == g.stats.drafted_tokens
    # and overlapped drafting
    overlapped = client.generate("w1 w2", temperature=1.0, seed=7, max_tokens=12, k=3, overlap=True)
    speculative = SpeculativeParams(k=3, overlap=True)
    g = asyncio.run(engine.generate(GenerationRequest(ids, sampling=SamplingParams(seed=7, max_new_tokens=12), speculative=speculative)))
    assert list(overlapped.token_ids) == g.token_ids and overlapped.stats.drafted_tokens == g.stats.drafted_tokens
    # and token trees
    tree = client.generate("w1 w2", temperature=1.0, seed=7, max_tokens=12, k=3, draft_confidence=0.5, tree_width=3)
    speculative = SpeculativeParams(k=3, confidence=0.5, tree_width=3)
    g = asyncio.run(engine.generate(GenerationRequest(ids, sampling=SamplingParams(seed=7, max_new_tokens=12), speculative=speculative)))
    assert list(tree.token_ids) == g.token_ids and tree.stats.drafted_tokens == g.stats.drafted_tokens


def test_score_equals_the_engine(client, engine):
    reply = client.score("w1 w2", "w3 w4 w5", preset="upscale", beta=1.5)
    prompt = engine.tokenizer("w1 w2")["input_ids"]
    cont = engine.tokenizer("w3 w4 w5", add_special_tokens=False)["input_ids"]
    expected = asyncio.run(engine.score(ScoreRequest(prompt, cont, EFTSpec(beta=1.5))))
    assert list(reply.token_ids) == cont
    assert max(abs(a - b) for a, b in zip(reply.logprobs, expected.logprobs)) < 1e-5
    assert set(reply.role_logprobs) == set(expected.role_logprobs)
    for role, lps in expected.role_logprobs.items():
        assert max(abs(a - b) for a, b in zip(reply.role_logprobs[role].logprobs, lps)) < 1e-5


def test_diagnostics_and_info(client, engine):
    reply = client.generate("w1", temperature=0.0, max_tokens=4, k=2, diagnostics=True)
    assert len(reply.diagnostics) == len(reply.token_ids)
    d = reply.diagnostics[0]
    assert d.token_id == reply.token_ids[0] and math.isfinite(d.logprob) and {"base_large", "base_small", "ft_small"} <= set(d.role_logprobs)
    assert "ft_small" in d.rewards and d.HasField("drafter_tv")
    info = client.info()
    assert info.vocab_size == engine.vocab_size and info.drafter == "ft_small" and "upscale" in info.presets
    assert {r.name for r in info.roles} >= {"base_large", "base_small", "ft_small"}
    assert info.limits.max_speculative_k == 32 and not info.chat_template


def test_health_and_reflection(router, client):
    assert client.health() == "SERVING" and client.health("eft.v1.EFTService") == "SERVING"
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(client.channel)
    assert {"eft.v1.EFTService", "grpc.health.v1.Health"} <= set(db.get_services())


def test_a_generic_tool_calls_generate_with_json_through_reflection(local):
    """What grpcurl does: descriptors from reflection, a JSON body, a generic call."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from google.protobuf.message_factory import GetMessageClass
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"localhost:{local.port}") as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("eft.v1.EFTService").FindMethodByName("Generate")
        request_cls, reply_cls = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        body = '{"prompt": {"text": "w1 w2"}, "sampling": {"temperature": 0, "max_tokens": 5}}'
        call = channel.unary_unary("/eft.v1.EFTService/Generate", request_cls.SerializeToString, reply_cls.FromString)
        reply = call(json_format.Parse(body, request_cls()), timeout=30)
        assert json_format.MessageToDict(reply)["tokenIds"] and len(reply.token_ids) >= 1


def test_async_client_streams(local, engine):
    async def run() -> list[int]:
        async with AsyncEFTClient(f"localhost:{local.port}") as c:
            assert await c.health() == "SERVING"
            return [t async for chunk in c.stream("w7", temperature=0.0, max_tokens=10, k=2) for t in chunk.token_ids]

    assert asyncio.run(run()) == engine_generate(engine, "w7", k=2, max_new_tokens=10)


# -- bad requests ---------------------------------------------------------------------------------


def _request(prompt: pb.Prompt | None = None, **parts: dict) -> pb.GenerateRequest:
    """A request for "w1 w2" with max_tokens 4, and the given ``sampling``/``eft``/``speculative`` fields."""
    sampling = {"max_tokens": 4} | parts.get("sampling", {})
    return pb.GenerateRequest(
        prompt=prompt or pb.Prompt(text="w1 w2"),
        sampling=pb.SamplingParams(**sampling),
        eft=pb.EFTSpec(**parts.get("eft", {})),
        speculative=pb.SpeculativeParams(**parts.get("speculative", {})),
    )


BAD_REQUESTS = [
    (pb.GenerateRequest(), "prompt"),
    (_request(prompt=pb.Prompt(text="")), "prompt.text"),
    (_request(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[]))), "prompt.token_ids.ids"),
    (_request(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[1, 99999]))), "prompt.token_ids.ids[1]"),
    (_request(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[-3]))), "prompt.token_ids.ids[0]"),
    (_request(prompt=pb.Prompt(chat=pb.Chat(messages=[]))), "prompt.chat.messages"),
    (_request(prompt=pb.Prompt(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="x")]))), "prompt.chat.messages[0].role"),
    (_request(prompt=pb.Prompt(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="x")]))), "prompt.chat"),
    (_request(sampling={"temperature": -1.0}), "sampling.temperature"),
    (_request(sampling={"temperature": float("nan")}), "sampling.temperature"),
    (_request(sampling={"top_p": 0.0}), "sampling.top_p"),
    (_request(sampling={"top_p": 1.5}), "sampling.top_p"),
    (_request(sampling={"top_k": -1}), "sampling.top_k"),
    (_request(sampling={"max_tokens": 0}), "sampling.max_tokens"),
    (_request(sampling={"max_tokens": 5000}), "sampling.max_tokens"),
    (_request(sampling={"max_tokens": 4000}), "sampling.max_tokens"),  # over the context length
    (_request(sampling={"seed": 2**63}), "sampling.seed"),
    (_request(sampling={"stop": [""]}), "sampling.stop[0]"),
    (_request(sampling={"stop": ["x"] * 17}), "sampling.stop"),
    (_request(sampling={"stop_token_ids": [-1]}), "sampling.stop_token_ids[0]"),
    (_request(eft={"preset": "sideways"}), "eft.preset"),
    (_request(eft={"preset": "linear"}), "eft.coefficients"),
    (_request(eft={"deltas": {"ft_nobody": 1.0}}), "eft.deltas.ft_nobody"),
    (_request(eft={"deltas": {"base_large": 1.0}}), "eft.deltas.base_large"),
    (_request(eft={"beta": float("inf")}), "eft.beta"),
    (_request(eft={"weight_top_p": 0.0}), "eft.weight_top_p"),
    (_request(eft={"preset": "downscale"}), "eft.deltas.ft_large"),  # the Serve router has no ft_large
    (_request(speculative={"k": 33}), "speculative.k"),
    (_request(speculative={"k": -1}), "speculative.k"),
    (_request(speculative={"k": 2, "drafter": "ft_nobody"}), "speculative.drafter"),
    (_request(speculative={"k": 2, "confidence": 1.5}), "speculative.confidence"),
]


@pytest.mark.parametrize("request_, field", BAD_REQUESTS, ids=[f for _, f in BAD_REQUESTS])
def test_bad_requests_are_invalid_argument_naming_the_field(served, request_, field):
    with EFTClient(f"localhost:{served.port}", timeout=30) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(request_, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith(f"{field}"), err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # the stream answers the same, before any message
            list(c.stub.GenerateStream(request_, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.health() == "SERVING" and len(c.generate("w1", max_tokens=2).token_ids) >= 1


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.ScoreRequest(prompt=pb.Prompt(text="w1")), "continuation"),
        (pb.ScoreRequest(prompt=pb.Prompt(text="w1"), continuation_text=""), "continuation_text"),
        (pb.ScoreRequest(prompt=pb.Prompt(text="w1"), continuation_ids=pb.TokenIds(ids=[5, 10**6])), "continuation_ids.ids[1]"),
        (pb.ScoreRequest(prompt=pb.Prompt(), continuation_text="w2"), "prompt"),
        (pb.ScoreRequest(prompt=pb.Prompt(text="w1"), continuation_text="w2", eft=pb.EFTSpec(beta=float("nan"))), "eft.beta"),
    ],
)
def test_bad_score_requests(local, request_, field):
    with EFTClient(f"localhost:{local.port}", timeout=30) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Score(request_)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)


def test_oversized_messages_are_refused(engine):
    with local_router(engine, max_message_bytes=4096) as router, EFTClient(f"localhost:{router.port}", timeout=30) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate("w1 " * 3000, max_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(c.generate("w1", max_tokens=2).token_ids) >= 1


# -- deadlines, cancellation, limits ------------------------------------------------------------


def test_deadline_exceeded_frees_the_sessions(router, client):
    with pytest.raises(grpc.RpcError) as err:
        client.generate("w1 w2", timeout=0.3, **LONG)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until_free(router) == {}


def test_a_long_generation_leaves_health_answering_and_stops_at_its_deadline(engine):
    """In-process, a unary Generate of 480 tokens with a 0.5 s deadline: health answers
    while it runs (the roles compute on their own threads, the loop stays free), the client
    gets DEADLINE_EXCEEDED, and the generation stops then: the engine takes no more steps."""
    with local_router(engine) as router, EFTClient(f"localhost:{router.port}", timeout=30) as c:
        request = pb.GenerateRequest(prompt=pb.Prompt(text="w1"), sampling=pb.SamplingParams(max_tokens=480, ignore_eos=True))
        started = time.monotonic()
        future = c.stub.Generate.future(request, timeout=0.5)
        waits = []
        while not future.done():
            asked = time.monotonic()
            assert c.health() == "SERVING"
            waits.append(time.monotonic() - asked)
        assert future.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5
        assert len(waits) >= 3 and max(waits) < 0.5, waits  # answered during it (it used to wait 1.1 s)
        time.sleep(0.2)  # the step in flight ends, the request leaves
        steps = router.router.engine.steps
        time.sleep(0.5)
        assert router.router.engine.steps == steps  # no work for nobody
        assert wait_until_free(router) == {}


def test_client_cancellation_frees_the_sessions_within_a_second(router, client):
    stream = client.stub.GenerateStream(_request_long(), timeout=60)
    first = next(stream)
    assert first.token_ids
    assert any(sessions_on_roles(router).values())  # the generation is under way
    stream.cancel()
    assert wait_until_free(router, 1.0) == {}
    assert client.health() == "SERVING"


def _request_long() -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=pb.Prompt(text="w1"), sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True))


def test_concurrency_limit_answers_resource_exhausted(engine):
    with local_router(engine, max_concurrent_requests=1) as router, EFTClient(f"localhost:{router.port}", timeout=60) as c:
        stream = c.stub.GenerateStream(_request_long(), timeout=60)
        next(stream)
        with pytest.raises(grpc.RpcError) as err:
            c.generate("w1", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 concurrent" in err.value.details()
        assert c.info().limits.max_concurrent_requests == 1  # GetInfo is not limited
        stream.cancel()
        deadline = time.monotonic() + 2
        while router.router.admission.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(c.generate("w1", max_tokens=2).token_ids) >= 1


def test_a_full_engine_queue_answers_resource_exhausted_and_never_fitting_is_invalid(engine):
    """One running slot and room for one waiting request: a third concurrent request is
    refused with RESOURCE_EXHAUSTED (back-pressure with a limit), and the others finish;
    a request longer than the KV slot can ever hold is INVALID_ARGUMENT naming the limit."""
    with local_router(engine, max_num_seqs=1, max_queued_requests=1) as router, EFTClient(f"localhost:{router.port}", timeout=60) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate("w1", max_tokens=520)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("sampling.max_tokens: prompt (1 tokens)") and "must fit the context length 512" in err.value.details()
        running = c.stub.GenerateStream(_request_long(), timeout=60)
        next(running)
        # EOS ignored: a sampled EOS would end a request early and say nothing about the queue
        waiting = c.stub.Generate.future(pb.GenerateRequest(prompt=pb.Prompt(text="w2"), sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True)), timeout=60)
        deadline = time.monotonic() + 10
        while not router.router.engine.scheduler.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as err:
            c.generate("w3", max_tokens=3)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
        running.cancel()
        assert len(waiting.result().token_ids) == 3  # the queued one ran once the slot was free
        assert len(c.generate("w3", max_tokens=3, ignore_eos=True).token_ids) == 3


def test_a_router_whose_defaults_cannot_be_served_is_refused(engine):
    """Without base_small the default spec (up-scaling) cannot be served: refused at start,
    naming the role, rather than serving and failing every default request."""
    roles = {r: engine.roles[r] for r in ("base_large", "ft_small")}
    with pytest.raises(ValueError, match="default EFT spec cannot be served: eft.preset: 'upscale' needs role 'base_small'"):
        Router(roles, engine.tokenizer, RouterConfig(port=0))
    linear = RequestDefaults(eft=EFTSpec(preset="linear", coefficients={"ft_small": 1.0}), speculative=SpeculativeParams(k=2, drafter="ft_other"))
    with pytest.raises(ValueError, match="default speculative drafter 'ft_other' is not served"):
        Router(roles, engine.tokenizer, RouterConfig(port=0), linear)
    Router(roles, engine.tokenizer, RouterConfig(port=0), RequestDefaults(eft=linear.eft))  # servable: fine


def test_many_concurrent_requests_each_get_their_own_answer(local, engine):
    async def run() -> list[list[int]]:
        async with AsyncEFTClient(f"localhost:{local.port}", timeout=60) as c:
            replies = await asyncio.gather(*(c.generate(p, temperature=0.0, max_tokens=10, k=k) for p in PROMPTS for k in (0, 2)))
            return [list(r.token_ids) for r in replies]

    expected = [engine_generate(engine, p, k=k, max_new_tokens=10) for p in PROMPTS for k in (0, 2)]
    assert asyncio.run(run()) == expected


# -- a failing role --------------------------------------------------------------------------------


def test_a_role_that_goes_away_answers_unavailable_naming_it(served_ensemble, family_paths):
    """A fourth role served under its own application is deleted while the router runs:
    gRPC answers UNAVAILABLE and HTTP 503 in OpenAI's error shape, both naming the role,
    and the other roles go on serving."""
    import openai
    from ray import serve

    from services.app import deploy_ensemble
    from services.config import EnsembleConfig
    from services.launch import router_factory
    from conftest import free_port
    from test_http import client_of

    doomed = EnsembleConfig.model_validate(
        {"roles": {"ft_doomed": {"model": family_paths["ft_safe"], "ray_actor_options": {"num_cpus": 0.25}}}}
    )
    deploy_ensemble(doomed)
    try:
        roles = dict(served_ensemble.config.roles) | dict(doomed.roles)
        router_config = RouterConfig(port=0, http_port=free_port(), role_timeout_s=10)
        config = served_ensemble.config.model_copy(update={"roles": roles, "router": router_config})
        with RouterThread(router_factory(config, "serve")) as router, EFTClient(f"localhost:{router.port}", timeout=30) as c:
            http = client_of(router)
            assert len(c.generate("w1", max_tokens=2, deltas={"ft_doomed": 1.0}).token_ids) >= 1
            serve.delete("eft-ft_doomed")
            with pytest.raises(grpc.RpcError) as err:
                c.generate("w1", max_tokens=2, deltas={"ft_doomed": 1.0})
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "ft_doomed" in err.value.details()
            with pytest.raises(openai.APIStatusError) as http_err:
                http.completions.create(model="eft", prompt="w1", max_tokens=2, extra_body={"eft": {"deltas": {"ft_doomed": 1.0}}})
            assert http_err.value.status_code == 503 and "ft_doomed" in http_err.value.body["message"], http_err.value.body
            assert len(c.generate("w1", max_tokens=2).token_ids) >= 1  # the others still serve
            assert http.completions.create(model="eft", prompt="w1", max_tokens=2).usage.completion_tokens >= 1
    finally:
        if "eft-ft_doomed" in serve.status().applications:
            serve.delete("eft-ft_doomed")


# -- metrics ---------------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_role_latency(engine):
    import urllib.request

    with local_router(engine, metrics_port=0) as router, EFTClient(f"localhost:{router.port}", timeout=30) as c:
        reply = c.generate("w1 w2", max_tokens=6, k=2, temperature=0.0)
        list(c.stream("w1", max_tokens=3))
        with pytest.raises(grpc.RpcError):
            c.generate("w1", top_p=3.0)
        m = router.router.metrics
        assert m.sample("eft_requests_total", {"method": "Generate", "code": "OK"}) == 1
        assert m.sample("eft_requests_total", {"method": "Generate", "code": "INVALID_ARGUMENT"}) == 1
        assert m.sample("eft_requests_total", {"method": "GenerateStream", "code": "OK"}) == 1
        assert m.sample("eft_generated_tokens_total") >= len(reply.token_ids) + 1
        assert m.sample("eft_time_to_first_token_seconds_count") == 1
        assert m.sample("eft_role_call_seconds_count", {"role": "ft_small", "call": "draft"}) >= 1
        assert m.sample("eft_role_call_seconds_count", {"role": "base_large", "call": "score"}) >= 1
        assert m.sample("eft_speculative_drafted_tokens_total") == reply.stats.drafted_tokens
        assert m.sample("eft_speculative_accepted_tokens_total") == reply.stats.accepted_tokens
        assert m.sample("eft_active_sessions") == 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{router.router.metrics_port}/metrics", timeout=10).read().decode()
        assert 'eft_requests_total{code="OK",method="Generate"} 1.0' in text


# -- authentication and TLS ------------------------------------------------------------------------


def test_bearer_token_authentication(engine):
    token = uuid.uuid4().hex
    with local_router(engine, auth_tokens=[token]) as router:
        target = f"localhost:{router.port}"
        for bad in (None, "wrong"):
            with EFTClient(target, token=bad, timeout=10) as c:
                with pytest.raises(grpc.RpcError) as err:
                    c.generate("w1", max_tokens=2)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as err:
                    list(c.stream("w1", max_tokens=2))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert c.health() == "SERVING"  # probes need no token
        with EFTClient(target, token=token, timeout=10) as c:
            assert len(c.generate("w1", max_tokens=2).token_ids) >= 1
            assert c.info().vocab_size == engine.vocab_size


def _certificates(tmp_path):
    """A CA, a server certificate for localhost and a client certificate, all signed by the CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name: str, issuer=None, issuer_key=None, ca: bool = False, san: list | None = None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return cert, key

    ca, ca_key = make("eft test CA", ca=True)
    server, server_key = make("localhost", ca, ca_key, san=[x509.DNSName("localhost")])
    client, client_key = make("eft client", ca, ca_key)
    files = {}
    for name, obj in {"ca": ca, "server": server, "client": client}.items():
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    for name, key in {"server_key": server_key, "client_key": client_key}.items():
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def test_tls_with_client_certificates(engine, tmp_path):
    f = _certificates(tmp_path)
    tls = {"cert_file": f["server"], "key_file": f["server_key"], "client_ca_file": f["ca"]}
    with local_router(engine, tls=tls) as router:
        target = f"localhost:{router.port}"
        with EFTClient(target, root_cert=f["ca"], client_cert=f["client"], client_key=f["client_key"], timeout=10) as c:
            assert len(c.generate("w1", max_tokens=2).token_ids) >= 1
        for kwargs in ({"root_cert": f["ca"]}, {}):  # no client certificate; no TLS at all
            with EFTClient(target, timeout=5, **kwargs) as c:
                with pytest.raises(grpc.RpcError) as err:
                    c.generate("w1", max_tokens=2)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
