"""An OpenAI-compatible HTTP API over the router's engine (FastAPI, served by uvicorn).

``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``
and ``GET /metrics``. A request's ``model`` picks an EFT spec: each preset the roles can
serve (``eft-upscale``, ...), the server's default (``eft``), or one role alone (``ft_small``,
``base_large``, ...: ``linear`` with that role's coefficient 1). The EFT extension fields,
which the official client sends through ``extra_body``, have the gRPC API's names and
meanings: ``top_k``, ``eft`` (preset, deltas, beta, weight_top_p, coefficients),
``speculative`` (k, drafter, confidence, adaptive, overlap, tree_width), ``ignore_eos``, ``stop_token_ids``, ``diagnostics``,
and ``return_token_ids`` (vLLM's: each choice and stream chunk carries its token ids).

The same engine, concurrency limit, bearer tokens and metrics as gRPC: a bad field is 400
with ``param`` naming it, a missing or wrong token 401, an unknown model 404, the
concurrency limit or a full queue 429, an unavailable role 503 naming it, each in OpenAI's
error shape. A client that disconnects mid-stream cancels its generations, which then leave
the engine's next step (their sessions are freed on every role).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Literal, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from ..core.spec import PRESETS, EFTSpec, SpecError
from ..engine import Engine, Generation, GenerationRequest, StreamChunk, TokenLogprobs
from .front import Admission, Failure, classify, record
from .messages import CHAT_ROLES, MAX_STOP_STRINGS, RequestDefaults
from .metrics import Metrics

MAX_N = 16  # samples per request
HTTP_STATUS = {"invalid": 400, "overloaded": 429, "unavailable": 503, "internal": 500}
ERROR_TYPE = {
    "invalid": "invalid_request_error", "overloaded": "rate_limit_error", "unavailable": "service_unavailable_error",
    "internal": "internal_error",
}
# the engine's field names as this API spells them (the extensions keep the gRPC names)
_PARAMS = {
    "sampling.max_new_tokens": "max_tokens", "sampling.temperature": "temperature", "sampling.top_p": "top_p",
    "sampling.top_k": "top_k", "sampling.seed": "seed", "sampling.stop": "stop", "sampling.stop_token_ids": "stop_token_ids",
    "sampling.ignore_eos": "ignore_eos",
}


# -- request bodies -------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EFTFields(_Body):
    """The ``eft`` extension: with ``preset`` set it stands alone; without, its fields
    override the model's spec."""

    preset: str | None = None
    deltas: dict[str, float] | None = None
    beta: float | None = None
    weight_top_p: float | None = None
    coefficients: dict[str, float] | None = None


class SpeculativeFields(_Body):
    k: int | None = None
    drafter: str | None = None
    confidence: float | None = None
    adaptive: bool | None = None
    overlap: bool | None = None
    tree_width: int | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """Fields both completion endpoints take."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as a label for the caller
    frequency_penalty: Literal[0, 0.0] | None = None  # not supported: only the neutral value
    presence_penalty: Literal[0, 0.0] | None = None
    # extensions (gRPC names)
    top_k: int | None = None
    eft: EFTFields | None = None
    speculative: SpeculativeFields | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    diagnostics: bool = False
    return_token_ids: bool = False  # each choice (and stream chunk) carries its token ids, as in vLLM


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(_Generation):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Generation):
    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Literal[False] = False  # not supported: the prompt is never echoed
    suffix: None = None


# -- errors ---------------------------------------------------------------------------------


class HTTPFailure(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _param(field: str | None) -> str | None:
    if field is None:
        return None
    head, dot, rest = field.partition("[")
    return _PARAMS.get(head, head) + (dot and "[" + rest)


def _failure(failure: Failure) -> HTTPFailure:
    param = _param(failure.field)
    message = f"{param}: {failure.message}" if param else failure.message
    return HTTPFailure(HTTP_STATUS[failure.kind], message, ERROR_TYPE[failure.kind], param, failure.kind if failure.kind != "invalid" else None)


# -- the app --------------------------------------------------------------------------------


class OpenAIFront:
    """The HTTP front door: requests in, the engine's requests out, OpenAI's shapes back."""

    def __init__(
        self,
        engine: Engine,
        defaults: RequestDefaults,
        admission: Admission,
        metrics: Metrics,
        tokens: Sequence[str],
        serving: Callable[[], bool],
    ) -> None:
        self.engine = engine
        self.tokenizer: PreTrainedTokenizerBase = engine.tokenizer
        self.defaults = defaults
        self.admission = admission
        self.metrics = metrics
        self._tokens = [t.encode() for t in tokens]
        self.serving = serving
        self.models = self._models()
        self.created = int(time.time())

    def _models(self) -> dict[str, EFTSpec]:
        """Every spec a request can pick by ``model``: the server's default, each preset the
        roles serve, each role alone."""
        roles = list(self.engine.roles)
        models = {"eft": self.defaults.eft}
        for preset in PRESETS:
            if preset == "linear":
                continue
            try:
                EFTSpec(preset=preset).resolve(roles)
            except SpecError:
                continue
            models[f"eft-{preset}"] = EFTSpec(preset=preset)
        models.update({role: EFTSpec(preset="linear", coefficients={role: 1.0}) for role in roles})
        return models

    # -- building the engine's requests ---------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if not self._tokens:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        return scheme.lower() == "bearer" and sum(hmac.compare_digest(given, t) for t in self._tokens) > 0

    def _spec(self, body: _Generation) -> EFTSpec:
        if body.model not in self.models:
            raise HTTPFailure(
                404, f"model: {body.model!r} is not served; GET /v1/models lists the models ({', '.join(self.models)})",
                "invalid_request_error", "model", "model_not_found",
            )
        spec = self.models[body.model]
        if body.eft is None:
            return spec
        fields = body.eft.model_dump(exclude_none=True)
        fields = {k: v for k, v in fields.items() if v != {} or k == "preset"}
        return EFTSpec(**fields) if body.eft.preset else replace(spec, **fields)

    def _requests(self, body: _Generation, prompt_ids: list[int], max_tokens: int | None, logprobs: int | None) -> list[GenerationRequest]:
        changes: dict[str, Any] = {}
        for name, target in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            if getattr(body, name) is not None:
                changes[target] = getattr(body, name)
        if max_tokens is not None:
            changes["max_new_tokens"] = max_tokens
        if body.stop is not None:
            stops = [body.stop] if isinstance(body.stop, str) else body.stop
            if len(stops) > MAX_STOP_STRINGS:
                raise SpecError("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
            changes["stop"] = tuple(stops)
        if body.stop_token_ids:
            changes["stop_token_ids"] = tuple(body.stop_token_ids)
        if body.ignore_eos:
            changes["ignore_eos"] = True
        sampling = replace(self.defaults.sampling, **changes)
        speculative = self.defaults.speculative
        if body.speculative is not None:
            speculative = replace(speculative, **body.speculative.model_dump(exclude_none=True))
        spec = self._spec(body)
        # n samples: n sessions; with a seed, sample i uses seed + i, so that they differ
        return [
            GenerationRequest(
                prompt_ids, eft=spec, speculative=speculative, diagnostics=body.diagnostics, logprobs=logprobs,
                sampling=replace(sampling, seed=None if body.seed is None else body.seed + i),
            )
            for i in range(body.n)
        ]

    def _chat_ids(self, body: ChatRequest) -> list[int]:
        if not body.messages:
            raise SpecError("messages", "must hold at least one message")
        for i, m in enumerate(body.messages):
            if m.role not in CHAT_ROLES:
                raise SpecError(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
        if self.tokenizer.chat_template is None:
            raise SpecError("messages", "the served tokenizer has no chat template: use /v1/completions")
        chat = [{"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)} for m in body.messages]
        try:
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # the template refuses this sequence of roles
            raise SpecError("messages", f"the chat template refused them: {err}") from None
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    def _prompt_ids(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise SpecError("prompt", "must not be empty")
            return list(self.tokenizer(body.prompt)["input_ids"])
        if not body.prompt:
            raise SpecError("prompt", "must hold at least one token")
        for i, t in enumerate(body.prompt):
            if not 0 <= t < self.engine.vocab_size:
                raise SpecError(f"prompt[{i}]", f"token ids must be in [0, {self.engine.vocab_size}), got {t}")
        return list(body.prompt)

    # -- responses ------------------------------------------------------------------------

    def _token(self, token_id: int) -> dict[str, Any]:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "bytes": list(text.encode())}

    def _chat_logprobs(self, logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
        return {"content": [
            {**self._token(t.token_id), "logprob": t.logprob, "top_logprobs": [{**self._token(i), "logprob": lp} for i, lp in t.top]}
            for t in logprobs
        ]}

    def _completion_logprobs(self, logprobs: Sequence[TokenLogprobs], offset: int) -> dict[str, Any]:
        tokens = [self._token(t.token_id)["token"] for t in logprobs]
        offsets, at = [], offset
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return {
            "tokens": tokens, "token_logprobs": [t.logprob for t in logprobs],
            "top_logprobs": [{self._token(i)["token"]: lp for i, lp in t.top} for t in logprobs], "text_offset": offsets,
        }

    @staticmethod
    def _extension(g: Generation | StreamChunk) -> dict[str, Any]:
        """The documented ``eft`` field of a choice: the generation's statistics (and its
        per-token diagnostics when asked for)."""
        s = g.stats
        out = {
            "blocks": s.blocks, "drafted_tokens": s.drafted_tokens, "accepted_tokens": s.accepted_tokens,
            "acceptance_rate": s.acceptance_rate, "tokens_per_block": s.tokens_per_block, "seed": s.seed,
        }
        if g.diagnostics:
            out["diagnostics"] = [vars(d) for d in g.diagnostics]
        return out

    @staticmethod
    def _usage(prompt_tokens: int, generations: Sequence[Generation | StreamChunk]) -> dict[str, int]:
        completion = sum(g.stats.generated_tokens for g in generations)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    async def complete(self, body: _Generation, chat: bool) -> JSONResponse | StreamingResponse:
        kind = "chat.completion" if chat else "text_completion"
        if chat:
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            prompt_ids = self._chat_ids(body)
        else:
            max_tokens, logprobs, prompt_ids = body.max_tokens, body.logprobs, self._prompt_ids(body)
        requests = self._requests(body, prompt_ids, max_tokens, logprobs)
        reply_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": reply_id, "object": kind, "created": int(time.time()), "model": body.model}
        if body.stream:
            return await self._stream(body, chat, requests, head, len(prompt_ids))
        generations = await _all(self.engine.generate(r) for r in requests)
        for g in generations:
            record(self.metrics, g.stats)
        choices = []
        for i, g in enumerate(generations):
            choice: dict[str, Any] = {"index": i, "finish_reason": g.finish_reason, "eft": self._extension(g)}
            if body.return_token_ids:
                choice["token_ids"] = g.token_ids
            if chat:
                choice["message"] = {"role": "assistant", "content": g.text}
                choice["logprobs"] = self._chat_logprobs(g.logprobs) if logprobs is not None else None
            else:
                choice["text"] = g.text
                choice["logprobs"] = self._completion_logprobs(g.logprobs, 0) if logprobs is not None else None
            choices.append(choice)
        return JSONResponse({**head, "choices": choices, "usage": self._usage(len(prompt_ids), generations)})

    async def _stream(self, body: _Generation, chat: bool, requests: list[GenerationRequest], head: dict, prompt_tokens: int) -> StreamingResponse:
        """Server-sent events in OpenAI's chunk format. Each sample's engine stream is opened
        and its first chunk awaited before the response starts, so that a bad request is
        still a plain 400 rather than an event in a 200 stream."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {**head, "object": kind}
        streams = [self.engine.stream(r) for r in requests]
        firsts: list[StreamChunk] = []
        try:
            firsts = await _all(s.__anext__() for s in streams)
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        logprobs = requests[0].logprobs

        def event(choices: list[dict], **extra: Any) -> bytes:
            return f"data: {json.dumps({**head, 'choices': choices, **extra}, separators=(',', ':'))}\n\n".encode()

        def choice(i: int, chunk: StreamChunk, offset: int) -> dict[str, Any]:
            out: dict[str, Any] = {"index": i, "finish_reason": chunk.finish_reason}
            if chat:
                out["delta"] = {"content": chunk.text}
                out["logprobs"] = self._chat_logprobs(chunk.logprobs) if logprobs is not None else None
            else:
                out["text"] = chunk.text
                out["logprobs"] = self._completion_logprobs(chunk.logprobs, offset) if logprobs is not None else None
            if body.return_token_ids:
                out["token_ids"] = chunk.token_ids
            if chunk.finish_reason is not None:
                out["eft"] = self._extension(chunk)
            return out

        async def events() -> AsyncIterator[bytes]:
            # The samples' chunks and, when a sample's stream ends, its task meet in one
            # queue; what has queued up by the time the response writes goes out together.
            queue: asyncio.Queue = asyncio.Queue()
            finals: list[StreamChunk] = []

            async def pump(i: int, stream: AsyncIterator[StreamChunk], first: StreamChunk) -> None:
                async with aclosing(stream):
                    offset, chunk = len(first.text), first
                    while chunk.finish_reason is None:
                        chunk = await stream.__anext__()
                        queue.put_nowait(choice(i, chunk, offset))
                        offset += len(chunk.text)
                    finals.append(chunk)

            # the first chunks go out at once, with the headers: each hop through the event
            # loop can wait behind a whole engine step
            opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for i in range(len(streams))]
            yield (event(opening) if chat else b"") + b"".join(event([choice(i, f, 0)]) for i, f in enumerate(firsts))
            pumps = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
            for task in pumps:
                task.add_done_callback(queue.put_nowait)
            try:
                ended, failed = 0, None
                while ended < len(pumps) and failed is None:
                    items = [await queue.get()]
                    while not queue.empty():
                        items.append(queue.get_nowait())
                    out = []
                    for item in items:
                        if isinstance(item, asyncio.Future):
                            ended += 1
                            failed = failed or (None if item.cancelled() else item.exception())
                        else:
                            out.append(event([item]))
                    if out:
                        yield b"".join(out)
                if failed is not None:  # after the 200: the error travels as an event
                    yield f"data: {json.dumps(_failure(classify(failed, head['object'])).body())}\n\n".encode()
                else:
                    for final in finals:
                        record(self.metrics, final.stats)
                    if include_usage:
                        yield event([], usage=self._usage(prompt_tokens, finals))
                yield b"data: [DONE]\n\n"
            finally:  # a client that went away: every sample's stream closes, its request leaves
                for task in pumps:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def model_list(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": self.created, "owned_by": "eft-router"} for m in self.models]}


async def _all(awaitables) -> list:
    """Every awaitable's result; on a failure, the others are cancelled first (no sample
    keeps running for a request that already failed)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def create_app(front: OpenAIFront) -> FastAPI:
    app = FastAPI(title="EFT router (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        param = ".".join(loc) or None
        front.metrics.requests.labels(request.url.path, "400").inc()
        return HTTPFailure(400, f"{param}: {first.get('msg')}" if param else first.get("msg", "invalid body"), "invalid_request_error", param).response()

    async def handle(request: Request, work: Callable[[], Any]) -> Any:
        method = request.url.path
        if not front._authorized(request):
            front.metrics.requests.labels(method, "401").inc()
            return HTTPFailure(401, "missing or invalid bearer token (header 'Authorization: Bearer <token>')", "authentication_error", None, "invalid_api_key").response()
        admitted = False
        try:
            front.admission.enter()
            admitted = True
            response = await work()
        except HTTPFailure as err:
            response = err.response()
        except Exception as err:
            response = _failure(classify(err, method)).response()
        if admitted:
            if isinstance(response, StreamingResponse):  # the slot is held until the stream ends
                response.background = _Leave(front.admission)
            else:
                front.admission.leave()
        front.metrics.requests.labels(method, str(response.status_code)).inc()
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        return await handle(request, lambda: front.complete(body, chat=True))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await handle(request, lambda: front.complete(body, chat=False))

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        async def listed() -> JSONResponse:
            return JSONResponse(front.model_list())

        return await handle(request, listed)

    @app.get("/health")
    async def health() -> JSONResponse:
        serving = front.serving()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(front.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _Leave:
    """A streaming response's background task: give the request's slot back once the stream
    has ended, however it ended."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def __call__(self) -> None:
        self.admission.leave()
