"""The ``eft.v1.EFTService`` handlers: gRPC requests in, the engine, gRPC replies out.

Each request is one engine request (one session on every role it touches). Whatever ends a
call (the last token, an error, the client cancelling or disconnecting, the deadline) ends
the engine's stream, and the request leaves the engine's next step, which releases its
session on every role. Failures map to gRPC statuses in one place
(:meth:`EFTServicer._request`): a bad field is INVALID_ARGUMENT naming it, a role that cannot
be reached or fails is UNAVAILABLE naming the role, the concurrency limit and a full engine
queue are RESOURCE_EXHAUSTED; anything else is INTERNAL and logged, and never reaches other
requests.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc

from . import messages
from ..api import eft_pb2 as pb
from ..api import eft_pb2_grpc
from ..core.spec import MAX_NEW_TOKENS, MAX_SPECULATIVE_K, PRESETS, SpecError
from ..engine import Engine, GenerationStats
from .front import Admission, classify, record
from .messages import RequestDefaults
from .metrics import Metrics



STATUS = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}


class EFTServicer(eft_pb2_grpc.EFTServiceServicer):
    def __init__(
        self, engine: Engine, defaults: RequestDefaults, metrics: Metrics, backend: str, admission: Admission, max_message_bytes: int
    ) -> None:
        self.engine = engine
        self.defaults = defaults
        self.metrics = metrics
        self.backend = backend
        self.admission = admission
        self.max_message_bytes = max_message_bytes

    @asynccontextmanager
    async def _request(self, method: str, context: grpc.aio.ServicerContext, limited: bool = True) -> AsyncIterator[None]:
        """Admit the call (or refuse it at the limit), count it by final status, and turn
        failures into statuses. The count is taken before the status is sent, so a client
        that has its answer sees it counted."""
        admitted = False
        try:
            if limited:
                self.admission.enter()
                admitted = True
            yield
            code, message = grpc.StatusCode.OK, ""
        except (asyncio.CancelledError, GeneratorExit):  # the client went away, or its deadline passed
            expired = (context.time_remaining() or 1.0) <= 0
            self._finish(method, grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED, admitted)
            raise
        except Exception as err:
            failure = classify(err, method)
            code = STATUS[failure.kind]
            message = messages.wire_error(err) if isinstance(err, SpecError) else failure.message
        self._finish(method, code, admitted)
        if code != grpc.StatusCode.OK:
            await context.abort(code, message)

    def _finish(self, method: str, code: grpc.StatusCode, admitted: bool) -> None:
        if admitted:
            self.admission.leave()
        self.metrics.requests.labels(method, code.name).inc()

    def _record(self, stats: GenerationStats) -> None:
        record(self.metrics, stats)

    def _generation(self, request: pb.GenerateRequest):
        return messages.generation_request(request, self.engine.tokenizer, self.engine.vocab_size, self.defaults)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async with self._request("Generate", context):
            g = await self.engine.generate(self._generation(request))
            self._record(g.stats)
            return messages.generate_response(g)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with self._request("GenerateStream", context):
            generation = self._generation(request)
            started, first = time.perf_counter(), True
            stream = self.engine.stream(generation)
            try:
                async for chunk in stream:
                    if first and chunk.token_ids:
                        self.metrics.ttft.observe(time.perf_counter() - started)
                        first = False
                    if chunk.stats is not None:
                        self._record(chunk.stats)
                    yield messages.stream_response(chunk)
            finally:
                await stream.aclose()  # leave the engine now, not when the generator is collected

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        async with self._request("Score", context):
            score = messages.score_request_of(request, self.engine.tokenizer, self.engine.vocab_size, self.defaults)
            return messages.score_response(await self.engine.score(score))

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetInfoResponse:
        async with self._request("GetInfo", context, limited=False):
            d = self.defaults
            return pb.GetInfoResponse(
                roles=[pb.RoleInfo(name=r.info.name, model=r.info.model, context_length=min(r.info.context_length, 2**31 - 1)) for r in self.engine.roles.values()],
                vocab_size=self.engine.vocab_size,
                presets=list(PRESETS),
                drafter=self.engine.default_drafter or "",
                backend=self.backend,
                limits=pb.Limits(
                    max_tokens=MAX_NEW_TOKENS,
                    max_speculative_k=MAX_SPECULATIVE_K,
                    context_length=min(self.engine.context_length, 2**31 - 1),
                    max_concurrent_requests=self.admission.limit,
                    max_message_bytes=self.max_message_bytes,
                ),
                default_eft=messages.eft_message(d.eft.preset, d.eft.deltas, d.eft.beta, d.eft.weight_top_p, d.eft.coefficients),
                default_sampling=pb.SamplingParams(
                    temperature=d.sampling.temperature, top_k=d.sampling.top_k, top_p=d.sampling.top_p,
                    max_tokens=d.sampling.max_new_tokens, stop=list(d.sampling.stop),
                    stop_token_ids=list(d.sampling.stop_token_ids), ignore_eos=d.sampling.ignore_eos,
                ),
                default_speculative=pb.SpeculativeParams(
                    k=d.speculative.k, drafter=d.speculative.drafter or "", confidence=d.speculative.confidence
                ),
                chat_template=self.engine.tokenizer.chat_template is not None,
            )
