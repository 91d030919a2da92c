"""Python clients of the EFT router: :class:`EFTClient` (blocking) and :class:`AsyncEFTClient`.

```python
from eft_router.server.client import EFTClient

with EFTClient("localhost:50051") as client:
    reply = client.generate("What is the birthplace of Ada Park?", temperature=0, k=4)
    print(reply.text, reply.stats.acceptance_rate)
    for chunk in client.stream([{"role": "user", "content": "Hello"}], max_tokens=32):
        print(chunk.text, end="")
```

Keyword arguments of ``generate``/``stream`` are those of
:func:`eft_router.messages.generate_request` (EFT spec, sampling, speculative ``k``); unset
ones take the server's defaults. Errors are ``grpc.RpcError`` with the server's status code
and a message naming the field or role at fault.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import messages
from ..api import eft_pb2 as pb
from ..api import eft_pb2_grpc
from .config import DEFAULT_PORT
from .messages import Prompt

DEFAULT_TARGET = f"localhost:{DEFAULT_PORT}"


def _channel_args(
    target: str | None, token: str | None, root_cert: str | Path | None, client_cert: str | Path | None, client_key: str | Path | None
) -> tuple[str, list[tuple[str, str]], grpc.ChannelCredentials | None]:
    """Target, call metadata and credentials; ``EFT_TARGET`` / ``EFT_AUTH_TOKEN`` / ``EFT_TLS_CA``
    fill in what is not given."""
    target = target or os.environ.get("EFT_TARGET") or DEFAULT_TARGET
    token = token or os.environ.get("EFT_AUTH_TOKEN")
    root_cert = root_cert or os.environ.get("EFT_TLS_CA")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    credentials = None
    if root_cert or client_cert:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        credentials = grpc.ssl_channel_credentials(read(root_cert), read(client_key), read(client_cert))
    return target, metadata, credentials


class _Channel:
    """A channel to the router with its stubs. ``token``: bearer token; ``root_cert``: the CA
    that signed the server's certificate (turns TLS on); ``client_cert``/``client_key`` for
    servers that require client certificates; ``timeout``: default deadline per call (s)."""

    _grpc: Any = grpc

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        root_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target, self._metadata, credentials = _channel_args(target, token, root_cert, client_cert, client_key)
        self.timeout = timeout
        self.channel = (
            self._grpc.secure_channel(self.target, credentials, options)
            if credentials
            else self._grpc.insecure_channel(self.target, options)
        )
        self.stub = eft_pb2_grpc.EFTServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        return {"metadata": self._metadata, "timeout": self.timeout if timeout is None else timeout}


class EFTClient(_Channel):
    """A blocking client (arguments: see :class:`_Channel`)."""

    def generate(self, prompt: Prompt, *, timeout: float | None = None, **params: Any) -> pb.GenerateResponse:
        return self.stub.Generate(messages.generate_request(prompt, **params), **self._kw(timeout))

    def stream(self, prompt: Prompt, *, timeout: float | None = None, **params: Any) -> Iterator[pb.GenerateStreamResponse]:
        """Messages as blocks are accepted; breaking out of the loop cancels the generation."""
        call = self.stub.GenerateStream(messages.generate_request(prompt, **params), **self._kw(timeout))
        try:
            yield from call
        finally:
            call.cancel()

    def score(self, prompt: Prompt, continuation: str | Sequence[int], *, timeout: float | None = None, **eft: Any) -> pb.ScoreResponse:
        return self.stub.Score(messages.score_request(prompt, continuation, **eft), **self._kw(timeout))

    def info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        return self.stub.GetInfo(pb.GetInfoRequest(), **self._kw(timeout))

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """``SERVING``, ``NOT_SERVING`` (roles not all answering, or shutting down), ..."""
        reply = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "EFTClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncEFTClient(_Channel):
    """The asyncio twin of :class:`EFTClient`: methods are coroutines, ``stream`` is an async
    iterator."""

    _grpc = grpc.aio

    async def generate(self, prompt: Prompt, *, timeout: float | None = None, **params: Any) -> pb.GenerateResponse:
        return await self.stub.Generate(messages.generate_request(prompt, **params), **self._kw(timeout))

    async def stream(self, prompt: Prompt, *, timeout: float | None = None, **params: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = self.stub.GenerateStream(messages.generate_request(prompt, **params), **self._kw(timeout))
        try:
            async for reply in call:
                yield reply
        finally:
            call.cancel()

    async def score(self, prompt: Prompt, continuation: str | Sequence[int], *, timeout: float | None = None, **eft: Any) -> pb.ScoreResponse:
        return await self.stub.Score(messages.score_request(prompt, continuation, **eft), **self._kw(timeout))

    async def info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        return await self.stub.GetInfo(pb.GetInfoRequest(), **self._kw(timeout))

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        reply = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncEFTClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
