"""The OpenAI-compatible HTTP API end to end, over real sockets: the official ``openai``
client for the API's behaviour, and raw HTTP for the server-sent events' framing byte for
byte. Routers on both backends; their output must be the engine's and gRPC's.

The tiny family's tokenizer has no chat template; the routers here give it a plain one (the
messages' contents, one per line) so that the chat endpoint has something to render.
"""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
import time
import uuid

import openai
import pytest

from conftest import free_port, replica_stats
from eft_router.core.spec import EFTSpec, SamplingParams, SpeculativeParams
from eft_router.engine import Engine, GenerationRequest, ScoreRequest
from eft_router.server.client import EFTClient
from eft_router.server.config import RouterConfig
from eft_router.server.grpc_server import Router, RouterThread
from eft_router.server.messages import RequestDefaults

TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
GREEDY = dict(temperature=0.0, max_tokens=12)


def templated(engine: Engine):
    tok = copy.deepcopy(engine.tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def http_router(roles, tokenizer, backend: str = "local", **config) -> RouterThread:
    async def make() -> Router:
        return Router(roles, tokenizer, RouterConfig(**{"port": 0, "http_port": free_port(), **config}), RequestDefaults(), backend)

    return RouterThread(make)


@pytest.fixture(scope="module")
def local_http(engine):
    with http_router(engine.roles, templated(engine)) as router:
        yield router


@pytest.fixture(scope="module")
def served_http(serve_roles, engine):
    with http_router(serve_roles, templated(engine), "serve") as router:
        yield router


@pytest.fixture(params=["local", "serve"])
def any_http(request):
    return request.getfixturevalue("local_http" if request.param == "local" else "served_http")


def client_of(router: RouterThread, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{router.router.http_port}/v1", api_key=api_key, max_retries=0, timeout=60)


def ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def chat_ids(engine: Engine, content: str) -> list[int]:
    tok = templated(engine)
    return list(tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)["input_ids"])


def alone(engine: Engine, prompt_ids, **fields):
    return asyncio.run(engine.generate(GenerationRequest(prompt_ids, **fields)))


# -- the same output as the engine and as gRPC -------------------------------------------------


@pytest.mark.parametrize("k", [0, 3])
def test_completions_equal_the_engine_and_grpc_on_both_backends(any_http, engine, k):
    client = client_of(any_http)
    for prompt in ("w1 w2 w3", "w7"):
        want = alone(engine, ids(engine, prompt), sampling=SamplingParams(temperature=0.0, max_new_tokens=12), speculative=SpeculativeParams(k=k))
        got = client.completions.create(model="eft", prompt=prompt, extra_body={"speculative": {"k": k}}, **GREEDY)
        assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
        assert got.usage.completion_tokens == len(want.token_ids) and got.usage.prompt_tokens == len(ids(engine, prompt))
        assert got.choices[0].model_extra["eft"]["blocks"] == want.stats.blocks
        streamed = list(client.completions.create(model="eft", prompt=prompt, stream=True, extra_body={"speculative": {"k": k}}, **GREEDY))
        assert "".join(c.choices[0].text for c in streamed) == want.text
        assert all("token_ids" not in c.choices[0].model_extra for c in streamed)  # only when asked for
        with_ids = client.completions.create(model="eft", prompt=prompt, extra_body={"speculative": {"k": k}, "return_token_ids": True}, **GREEDY)
        assert with_ids.choices[0].model_extra["token_ids"] == want.token_ids
        chunks = client.completions.create(model="eft", prompt=prompt, stream=True, extra_body={"speculative": {"k": k}, "return_token_ids": True}, **GREEDY)
        assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == want.token_ids
        with EFTClient(f"localhost:{any_http.port}", timeout=60) as grpc_client:
            assert grpc_client.generate(prompt, k=k, **GREEDY).text == want.text
        by_ids = client.completions.create(model="eft", prompt=ids(engine, prompt), **GREEDY)
        assert by_ids.choices[0].text == alone(engine, ids(engine, prompt), sampling=SamplingParams(temperature=0.0, max_new_tokens=12)).text


def test_chat_greedy_and_seeded_equal_the_engine_and_grpc(local_http, engine):
    client = client_of(local_http)
    prompt_ids = chat_ids(engine, "w3 w4 w5")
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, seed=11, top_p=0.9)):
        want = alone(engine, prompt_ids, sampling=SamplingParams(max_new_tokens=10, **sampling), speculative=SpeculativeParams(k=2))
        messages = [{"role": "user", "content": "w3 w4 w5"}]
        got = client.chat.completions.create(model="eft-upscale", messages=messages, max_tokens=10, extra_body={"speculative": {"k": 2}}, **sampling)
        assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == want.text
        chunks = list(client.chat.completions.create(model="eft-upscale", messages=messages, max_completion_tokens=10, stream=True,
                                                     extra_body={"speculative": {"k": 2}}, **sampling))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == want.finish_reason
        with EFTClient(f"localhost:{local_http.port}", timeout=60) as grpc_client:
            assert grpc_client.generate(messages, max_tokens=10, k=2, **sampling).text == want.text


def test_each_role_alone_and_the_eft_extension(local_http, engine):
    client = client_of(local_http)
    models = {m.id for m in client.models.list()}
    assert {"eft", "eft-upscale", "eft-downscale", "eft-interpolate", "base_large", "base_small", "ft_small", "ft_safe", "ft_large"} <= models
    prompt = ids(engine, "w9 w8")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    for role in ("ft_small", "base_large"):
        want = alone(engine, prompt, eft=EFTSpec(preset="linear", coefficients={role: 1.0}), sampling=greedy)
        assert client.completions.create(model=role, prompt="w9 w8", temperature=0.0, max_tokens=10).choices[0].text == want.text
    spec = EFTSpec(preset="interpolate", deltas={"ft_small": 0.7, "ft_safe": 0.3})
    want = alone(engine, prompt, eft=spec, sampling=greedy)
    extra = {"eft": {"preset": "interpolate", "deltas": {"ft_small": 0.7, "ft_safe": 0.3}}}
    assert client.completions.create(model="eft", prompt="w9 w8", temperature=0.0, max_tokens=10, extra_body=extra).choices[0].text == want.text
    beta = alone(engine, prompt, eft=EFTSpec(beta=1.5), sampling=greedy)  # a field without a preset overrides the model's spec
    assert client.completions.create(model="eft-upscale", prompt="w9 w8", temperature=0.0, max_tokens=10, extra_body={"eft": {"beta": 1.5}}).choices[0].text == beta.text


def test_logprobs_equal_score(local_http, engine):
    """Chat and completions, sampled: each token's log-prob is the EFT distribution's (Score's
    values), and the alternatives are the most likely tokens there, best first."""
    client = client_of(local_http)
    got = client.completions.create(model="eft", prompt="w1 w2", temperature=1.0, seed=5, max_tokens=8, logprobs=3)
    prompt = ids(engine, "w1 w2")
    tokens = alone(engine, prompt, sampling=SamplingParams(temperature=1.0, seed=5, max_new_tokens=8)).token_ids
    scored = asyncio.run(engine.score(ScoreRequest(prompt, tokens)))
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(scored.logprobs, abs=1e-5)
    assert lp.tokens == [engine.tokenizer.decode([t]) for t in tokens]
    for top in lp.top_logprobs:
        assert len(top) == 3 and list(top.values()) == sorted(top.values(), reverse=True)
    chat = client.chat.completions.create(model="eft", messages=[{"role": "user", "content": "w1 w2"}], temperature=0.0, max_tokens=6,
                                          logprobs=True, top_logprobs=2)
    prompt = chat_ids(engine, "w1 w2")
    tokens = alone(engine, prompt, sampling=SamplingParams(temperature=0.0, max_new_tokens=6)).token_ids
    scored = asyncio.run(engine.score(ScoreRequest(prompt, tokens)))
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(scored.logprobs, abs=1e-5)
    for c in content:  # greedy: the chosen token is the most likely
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == pytest.approx(c.logprob)


def test_n_samples_stop_strings_and_usage(local_http, engine):
    client = client_of(local_http)
    prompt = ids(engine, "w4 w5")
    got = client.completions.create(model="eft", prompt="w4 w5", n=3, seed=100, temperature=1.0, max_tokens=8)
    want = [alone(engine, prompt, sampling=SamplingParams(seed=100 + i, max_new_tokens=8)) for i in range(3)]
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [w.text for w in want]
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want) and got.usage.prompt_tokens == len(prompt)
    plain = alone(engine, prompt, sampling=SamplingParams(temperature=0.0, max_new_tokens=20))
    word = plain.text.split()[3]
    stopped = client.completions.create(model="eft", prompt="w4 w5", temperature=0.0, max_tokens=20, stop=word)
    assert stopped.choices[0].text == plain.text[: plain.text.index(word)] and stopped.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="eft", prompt="w4 w5", n=2, seed=1, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(
        len(alone(engine, prompt, sampling=SamplingParams(seed=1 + i, max_new_tokens=5)).token_ids) for i in range(2))
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}


def test_server_sent_events_byte_for_byte(local_http):
    """The raw stream: ``data: <json>`` events separated by a blank line, chunk objects of
    OpenAI's shape, the usage chunk when asked for, then ``data: [DONE]``."""
    conn = http.client.HTTPConnection("127.0.0.1", local_http.router.http_port, timeout=60)
    body = {"model": "eft", "prompt": "w1 w2", "temperature": 0, "max_tokens": 6, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("Content-Type").startswith("text/event-stream")
    raw = reply.read()
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = raw.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    for c in chunks:
        assert set(c) >= {"id", "object", "created", "model", "choices"} and c["object"] == "text_completion"
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and set(chunks[-1]["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    finals = [c for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0] is chunks[-2] and finals[0]["choices"][0]["finish_reason"] == "length"
    assert finals[0]["choices"][0]["eft"]["blocks"] >= 1


# -- errors -----------------------------------------------------------------------------------


BAD = {
    "temperature": ({"temperature": -1}, "temperature"),
    "temperature_tiny": ({"temperature": 1e-40}, "temperature"),
    "top_p": ({"top_p": 2.0}, "top_p"),
    "max_tokens": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens_too_long": ({"max_tokens": 600}, "max_tokens"),
    "top_k": ({"top_k": -1}, "top_k"),
    "seed": ({"seed": -1}, "seed"),
    "n_zero": ({"n": 0}, "n"),
    "n_many": ({"n": 17}, "n"),
    "stop_many": ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    "delta_role": ({"eft": {"deltas": {"ft_nope": 1.0}}}, "eft.deltas.ft_nope"),
    "beta_huge": ({"eft": {"beta": 1e39}}, "eft.beta"),
    "preset": ({"eft": {"preset": "sideways"}}, "eft.preset"),
    "speculative_k": ({"speculative": {"k": 99}}, "speculative.k"),
    "drafter": ({"speculative": {"k": 2, "drafter": "ft_nope"}}, "speculative.drafter"),
    "confidence": ({"speculative": {"confidence": 2}}, "speculative.confidence"),
    "adaptive": ({"speculative": {"k": 2, "adaptive": "sometimes"}}, "speculative.adaptive"),
    "overlap": ({"speculative": {"k": 2, "overlap": 3}}, "speculative.overlap"),
    "tree_width": ({"speculative": {"k": 2, "tree_width": 9, "confidence": 0.5}}, "speculative.tree_width"),
    "tree_without_confidence": ({"speculative": {"k": 2, "tree_width": 2}}, "speculative.tree_width"),
    "unknown_field": ({"frobnicate": 1}, "frobnicate"),
    "penalty": ({"frequency_penalty": 0.5}, "frequency_penalty"),
    "stop_token_id": ({"stop_token_ids": [-3]}, "stop_token_ids[0]"),
    "prompt_empty": ({"prompt": ""}, "prompt"),
    "prompt_token": ({"prompt": [3, 9999]}, "prompt[1]"),
    "logprobs": ({"logprobs": 50}, "logprobs"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_a_bad_request_is_400_naming_the_field_and_the_server_goes_on(local_http, case):
    client = client_of(local_http)
    fields, param = BAD[case]
    body = {"prompt": "w1", "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="eft", **{k: v for k, v in body.items() if k in ("prompt", "max_tokens")},
                                  extra_body={k: v for k, v in body.items() if k not in ("prompt", "max_tokens")})
    error = err.value.body
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{param}:"), error
    assert len(client.completions.create(model="eft", prompt="w1", max_tokens=2).choices[0].text) > 0


def test_chat_errors_and_an_unknown_model(local_http):
    client = client_of(local_http)
    for messages, param in (([], "messages"), ([{"role": "robot", "content": "hi"}], "messages[0].role")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="eft", messages=messages, max_tokens=2)
        assert err.value.body["param"] == param
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="w1", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_bearer_tokens_are_checked(engine):
    token = uuid.uuid4().hex
    with http_router(engine.roles, templated(engine), auth_tokens=[token]) as router:
        for bad in ("", "wrong"):
            with pytest.raises(openai.AuthenticationError) as err:
                client_of(router, bad or "x").with_options(default_headers={} if bad else {"Authorization": ""}).completions.create(model="eft", prompt="w1", max_tokens=2)
            assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
        assert client_of(router, token).completions.create(model="eft", prompt="w1", max_tokens=2).choices[0].text
        conn = http.client.HTTPConnection("127.0.0.1", router.router.http_port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200  # probes need no token


def test_over_the_concurrency_limit_is_429(engine):
    with http_router(engine.roles, templated(engine), max_concurrent_requests=1) as router:
        client = client_of(router)
        long = client.completions.create(model="eft", prompt="w1", max_tokens=400, extra_body={"ignore_eos": True}, stream=True)
        next(iter(long))
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="eft", prompt="w1", max_tokens=2)
        assert err.value.status_code == 429 and "1 concurrent" in err.value.body["message"]
        long.close()
        deadline = time.monotonic() + 5
        while router.router.admission.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.completions.create(model="eft", prompt="w1", max_tokens=2).choices[0].text


def sessions_on_roles(router: RouterThread) -> dict[str, list[str]]:
    out = {}
    for name, timed in router.router.engine.roles.items():
        role = timed.role
        if hasattr(role, "worker"):
            out[name] = role.worker.sessions.ids()
        else:
            out[name] = [s for st in replica_stats(role, 2 if name == "base_small" else 1).values() for s in st["sessions"]]
    return out


def test_a_client_that_disconnects_frees_its_sessions_on_every_role(any_http):
    conn = http.client.HTTPConnection("127.0.0.1", any_http.router.http_port, timeout=60)
    body = {"model": "eft", "prompt": "w1", "max_tokens": 400, "ignore_eos": True, "stream": True, "n": 2}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    assert any(sessions_on_roles(any_http).values())  # under way, both samples
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + 5
    while any(sessions_on_roles(any_http).values()) or any_http.router.admission.in_flight:
        assert time.monotonic() < deadline, sessions_on_roles(any_http)
        time.sleep(0.05)


def test_health_and_metrics_on_the_http_port(local_http):
    conn = http.client.HTTPConnection("127.0.0.1", local_http.router.http_port, timeout=10)
    conn.request("GET", "/health")
    reply = conn.getresponse()
    assert reply.status == 200 and json.loads(reply.read()) == {"status": "SERVING"}
    client_of(local_http).completions.create(model="eft", prompt="w1", max_tokens=2)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert 'eft_requests_total{code="200",method="/v1/completions"}' in text and "eft_generated_tokens_total" in text
