"""Property-based fuzzing of every RPC of the router, over real sockets (hypothesis).

Each example is one request message of ``Generate``, ``GenerateStream``, ``Score`` or
``GetInfo`` with fields drawn from extremes: NaN and infinities, huge and tiny floats,
negative and huge integers, empty and oversized strings and lists, unknown presets and
roles, token ids out of range, every chat role and none. Whatever comes back must be a
documented status (never INTERNAL or UNKNOWN), no reply may hold a NaN, and the server must
still answer health after each.

``EFT_FUZZ_EXAMPLES`` sets the number of examples (default 200, a few seconds to a minute
here); for a long hunt: ``EFT_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import math
import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eft_router.api import eft_pb2 as pb
from eft_router.server.client import EFTClient
from eft_router.server.config import RouterConfig
from eft_router.server.grpc_server import Router, RouterThread
from eft_router.server.messages import RequestDefaults

EXAMPLES = int(os.environ.get("EFT_FUZZ_EXAMPLES", "200"))
DOCUMENTED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
}
DEADLINE_S = 5.0

floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-4, 1e4, 1e-40, 5e-324, 1e39, -1e39, 1.7976931348623157e308, 1 - 1e-16]),
    st.floats(min_value=-3, max_value=3),
)
int32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 2, 32, 33, 4096, 4097, 61, 62, 63]))
small_text = st.text(max_size=40)
roles = st.sampled_from(["base_large", "base_small", "ft_small", "ft_safe", "ft_large", "ft_nope", "", "x" * 300])
table = st.dictionaries(roles, floats, max_size=4)


@st.composite
def prompts(draw) -> pb.Prompt:
    kind = draw(st.sampled_from(["text", "ids", "chat", "none", "huge"]))
    if kind == "text":
        return pb.Prompt(text=draw(st.one_of(small_text, st.just(""), st.just("w1 w2 w3"))))
    if kind == "ids":
        return pb.Prompt(token_ids=pb.TokenIds(ids=draw(st.lists(int32, max_size=12))))
    if kind == "chat":
        messages = draw(st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "tool", ""]), content=small_text), max_size=4))
        return pb.Prompt(chat=pb.Chat(messages=messages))
    if kind == "huge":
        return pb.Prompt(token_ids=pb.TokenIds(ids=[3] * draw(st.sampled_from([511, 512, 600, 5000]))))
    return pb.Prompt()


def optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def eft_specs(draw) -> pb.EFTSpec:
    return pb.EFTSpec(
        preset=draw(st.sampled_from(["", "upscale", "downscale", "interpolate", "linear", "nope", "UPSCALE"])),
        deltas=draw(table), beta=draw(optional(floats)), weight_top_p=draw(optional(floats)), coefficients=draw(table),
    )


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(
        temperature=draw(optional(floats)), top_k=draw(optional(int32)), top_p=draw(optional(floats)),
        seed=draw(optional(st.integers(0, 2**64 - 1))),
        max_tokens=draw(st.one_of(st.integers(1, 6), st.sampled_from([0, -1, 4096, 4097, 2**31 - 1]))),
        stop=draw(st.lists(st.one_of(small_text, st.just("w2")), max_size=18)),
        stop_token_ids=draw(st.lists(int32, max_size=4)), ignore_eos=draw(st.booleans()),
    )
    speculative = pb.SpeculativeParams(k=draw(optional(int32)), drafter=draw(roles), confidence=draw(optional(floats)))
    return pb.GenerateRequest(
        prompt=draw(prompts()), eft=draw(eft_specs()), sampling=sampling, speculative=speculative, diagnostics=draw(st.booleans()),
    )


@st.composite
def score_requests(draw) -> pb.ScoreRequest:
    request = pb.ScoreRequest(prompt=draw(prompts()), eft=draw(eft_specs()))
    kind = draw(st.sampled_from(["text", "ids", "none"]))
    if kind == "text":
        request.continuation_text = draw(st.one_of(small_text, st.just("w4 w5")))
    elif kind == "ids":
        request.continuation_ids.ids.extend(draw(st.lists(int32, max_size=8)))
    return request


calls = st.one_of(
    st.tuples(st.just("Generate"), generate_requests()),
    st.tuples(st.just("GenerateStream"), generate_requests()),
    st.tuples(st.just("Score"), score_requests()),
    st.tuples(st.just("GetInfo"), st.just(pb.GetInfoRequest())),
)


def finite_everywhere(message) -> bool:
    """No NaN in any double or float field of a reply, however deep."""
    for field, value in message.ListFields():
        values = value if field.label == field.LABEL_REPEATED else [value]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            values = list(value.values())
        for v in values:
            if isinstance(v, float) and math.isnan(v):
                return False
            if hasattr(v, "ListFields") and not finite_everywhere(v):
                return False
    return True


@pytest.fixture(scope="module")
def fuzzed(engine):
    async def make() -> Router:
        return Router(engine.roles, engine.tokenizer, RouterConfig(port=0, max_concurrent_requests=8), RequestDefaults(), "local")

    with RouterThread(make) as router, EFTClient(f"localhost:{router.port}", timeout=DEADLINE_S) as client:
        yield client


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(call=calls)
def test_every_reply_is_documented_finite_and_the_server_stays_up(fuzzed, call):
    method, request = call
    replies = []
    try:
        if method == "GenerateStream":
            replies = list(fuzzed.stub.GenerateStream(request, timeout=DEADLINE_S))
        else:
            replies = [getattr(fuzzed.stub, method)(request, timeout=DEADLINE_S)]
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
        assert code in DOCUMENTED, (method, code, err.details(), request)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert err.details() and ":" in err.details(), err.details()  # "field: what is allowed"
    assert all(finite_everywhere(r) for r in replies), (method, replies)
    assert fuzzed.health() == "SERVING"
