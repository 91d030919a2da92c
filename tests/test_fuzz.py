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
from google.protobuf import json_format
from hypothesis import HealthCheck, event, given, settings
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

def mostly(valid, extreme):
    """Unset or valid most of the time, so that whole requests get through validation and
    reach the maths; an extreme the rest of the time."""
    return st.one_of(*([st.none()] * 3 + [valid] * 4 + [extreme]))


extreme_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, 1e-4, 1e4, -1e4, 1e-40, 5e-324, 1e39, -1e39, 1.7976931348623157e308, 1 - 1e-16, 1 + 1e-16]),
)
int32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 2, 32, 33, 4096, 4097, 61, 62, 63]))
small_text = st.text(max_size=40)
words = st.lists(st.integers(0, 59).map(lambda i: f"w{i}"), min_size=1, max_size=8).map(" ".join)
roles = st.sampled_from(["base_large", "base_small", "ft_small", "ft_safe", "ft_large", "ft_nope", "", "x" * 300])
coefficient_value = st.one_of(*([st.floats(-3, 3)] * 4 + [extreme_floats]))
coefficient = st.one_of(st.none(), st.none(), coefficient_value)
table = st.one_of(st.just({}), st.dictionaries(st.sampled_from(["ft_small", "ft_safe"]), st.floats(-2, 2), max_size=2),
                  st.dictionaries(roles, extreme_floats, max_size=4))


@st.composite
def prompts(draw) -> pb.Prompt:
    kind = draw(st.sampled_from(["text", "text", "ids", "ids", "chat", "none", "huge", "junk"]))
    if kind == "text":
        return pb.Prompt(text=draw(words))
    if kind == "ids":
        return pb.Prompt(token_ids=pb.TokenIds(ids=draw(st.lists(st.integers(0, 61), min_size=1, max_size=12))))
    if kind == "junk":
        return pb.Prompt(token_ids=pb.TokenIds(ids=draw(st.lists(int32, max_size=12)))) if draw(st.booleans()) else pb.Prompt(text=draw(small_text))
    if kind == "chat":
        messages = draw(st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "tool", ""]), content=small_text), max_size=4))
        return pb.Prompt(chat=pb.Chat(messages=messages))
    if kind == "huge":
        return pb.Prompt(token_ids=pb.TokenIds(ids=[3] * draw(st.sampled_from([505, 511, 512, 600, 5000]))))
    return pb.Prompt()


edge_floats = st.sampled_from  # values at the very edge of what is allowed
valid_coefficient = st.one_of(st.floats(-3, 3), edge_floats([1e4, -1e4, 9999.999, 0.0, -0.0, 1e-300]))
valid_temperature = st.one_of(st.just(0.0), st.floats(1e-4, 1e4), edge_floats([1e-4, 1e4, 1.0000001e-4]))
valid_top_p = st.one_of(st.floats(1e-300, 1.0), edge_floats([1.0, 1e-45, 5e-324, 1e-300, 0.5]))


@st.composite
def valid_eft(draw) -> pb.EFTSpec:
    """Any spec the tiny family can serve, values at the edges of their ranges included."""
    preset = draw(st.sampled_from(["", "upscale", "interpolate", "downscale", "linear"]))
    if preset == "linear":
        coefficients = draw(st.dictionaries(st.sampled_from(["base_large", "base_small", "ft_small", "ft_safe", "ft_large"]), valid_coefficient, min_size=1, max_size=4))
        return pb.EFTSpec(preset=preset, coefficients=coefficients)
    fine_tunes = ["ft_large"] if preset == "downscale" else ["ft_small", "ft_safe"]
    deltas = draw(st.dictionaries(st.sampled_from(fine_tunes), valid_coefficient, max_size=2))
    if preset == "interpolate":
        return pb.EFTSpec(preset=preset, deltas=deltas)
    return pb.EFTSpec(preset=preset, deltas=deltas, beta=draw(st.one_of(st.none(), valid_coefficient)), weight_top_p=draw(st.one_of(st.none(), valid_top_p)))


@st.composite
def wild_eft(draw) -> pb.EFTSpec:
    preset = draw(st.sampled_from(["", "upscale", "downscale", "interpolate", "linear", "nope", "UPSCALE"]))
    coefficients = draw(st.dictionaries(roles, coefficient_value, max_size=3)) if preset == "linear" or draw(st.integers(0, 9)) == 0 else {}
    return pb.EFTSpec(preset=preset, deltas=draw(table), beta=draw(coefficient), weight_top_p=draw(mostly(st.floats(0.01, 1.0), extreme_floats)), coefficients=coefficients)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """Three in five valid (with values at the edges of their ranges), the rest wild."""
    if draw(st.integers(0, 4)) < 3:
        sampling = pb.SamplingParams(
            temperature=draw(st.one_of(st.none(), valid_temperature)), top_k=draw(st.one_of(st.none(), st.integers(0, 100))),
            top_p=draw(st.one_of(st.none(), valid_top_p)), seed=draw(st.one_of(st.none(), st.integers(0, 2**63 - 1))),
            max_tokens=draw(st.integers(1, 6)), stop=draw(st.lists(words, max_size=3)),
            stop_token_ids=draw(st.lists(st.integers(0, 61), max_size=3)), ignore_eos=draw(st.booleans()),
        )
        speculative = pb.SpeculativeParams(
            k=draw(st.one_of(st.none(), st.integers(0, 8), st.just(32))), drafter=draw(st.sampled_from(["", "ft_small", "ft_safe", "base_small"])),
            confidence=draw(st.one_of(st.none(), st.floats(0, 1), edge_floats([0.0, 1.0, 1e-300]))),
        )
        prompt = pb.Prompt(text=draw(words)) if draw(st.booleans()) else pb.Prompt(token_ids=pb.TokenIds(ids=draw(st.lists(st.integers(0, 61), min_size=1, max_size=12))))
        return pb.GenerateRequest(prompt=prompt, eft=draw(valid_eft()), sampling=sampling, speculative=speculative, diagnostics=draw(st.booleans()))
    sampling = pb.SamplingParams(
        temperature=draw(mostly(st.one_of(st.just(0.0), st.floats(0.05, 3.0)), extreme_floats)),
        top_k=draw(mostly(st.integers(0, 70), int32)), top_p=draw(mostly(st.floats(0.01, 1.0), extreme_floats)),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))),
        max_tokens=draw(st.one_of(st.integers(1, 6), st.integers(1, 6), st.sampled_from([0, -1, 4096, 4097, 2**31 - 1]))),
        stop=draw(st.one_of(st.just([]), st.lists(st.one_of(words, small_text), max_size=18))),
        stop_token_ids=draw(st.one_of(st.just([]), st.lists(st.integers(0, 61), max_size=3), st.lists(int32, max_size=3))),
        ignore_eos=draw(st.booleans()),
    )
    speculative = pb.SpeculativeParams(
        k=draw(mostly(st.integers(0, 8), int32)), drafter=draw(st.one_of(st.just(""), st.just(""), roles)),
        confidence=draw(mostly(st.floats(0, 1), extreme_floats)),
    )
    return pb.GenerateRequest(
        prompt=draw(prompts()), eft=draw(wild_eft()), sampling=sampling, speculative=speculative, diagnostics=draw(st.booleans()),
    )


@st.composite
def score_requests(draw) -> pb.ScoreRequest:
    request = pb.ScoreRequest(prompt=draw(prompts()), eft=draw(st.one_of(valid_eft(), valid_eft(), wild_eft())))
    kind = draw(st.sampled_from(["text", "ids", "ids", "junk", "none"]))
    if kind == "text":
        request.continuation_text = draw(st.one_of(words, small_text))
    elif kind == "ids":
        request.continuation_ids.ids.extend(draw(st.lists(st.integers(0, 61), min_size=1, max_size=8)))
    elif kind == "junk":
        request.continuation_ids.ids.extend(draw(st.lists(int32, max_size=8)))
    return request


calls = st.one_of(
    st.tuples(st.just("Generate"), generate_requests()),
    st.tuples(st.just("GenerateStream"), generate_requests()),
    st.tuples(st.just("Score"), score_requests()),
    st.tuples(st.just("GetInfo"), st.just(pb.GetInfoRequest())),
)


def finite_everywhere(message) -> bool:
    """No NaN in any double or float field of a reply, however deep (JSON writes a NaN as
    the string "NaN")."""

    def walk(value) -> bool:
        if isinstance(value, dict):
            return all(walk(v) for v in value.values())
        if isinstance(value, list):
            return all(walk(v) for v in value)
        return not (value == "NaN" or isinstance(value, float) and math.isnan(value))

    return walk(json_format.MessageToDict(message))


@pytest.fixture(scope="module")
def fuzzed(engine):
    async def make() -> Router:
        return Router(engine.roles, engine.tokenizer, RouterConfig(port=0, http_port=0, max_concurrent_requests=8), RequestDefaults(), "local")

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
            event(f"{method}: invalid {err.details().split(':')[0].split('[')[0]}")
    event(f"{method}: {code.name}")  # --hypothesis-show-statistics shows the mix
    assert all(finite_everywhere(r) for r in replies), (method, replies)
    assert fuzzed.health() == "SERVING"
