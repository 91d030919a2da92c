"""Bearer-token authentication for the gRPC router.

Clients send ``authorization: Bearer <token>`` metadata. The health service is exempt, so
that load balancers and Kubernetes gRPC probes (which send no metadata) can see it; every
other method, reflection included, needs a valid token once any token is configured.
"""

from __future__ import annotations

import hmac
from typing import Awaitable, Callable, Sequence

import grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a configured token with UNAUTHENTICATED (before the handler
    runs: a refused call costs no model work and holds no request slot)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("auth tokens: at least one token is needed to turn authentication on")
        self._tokens = [t.encode() for t in tokens]

    def _valid(self, token: str | None) -> bool:
        if token is None:
            return False
        given = token.encode()
        # compare against every token (no early exit) so timing says nothing about which
        return sum(hmac.compare_digest(given, t) for t in self._tokens) > 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(EXEMPT_PREFIXES) or self._valid(_bearer(details.invocation_metadata)):
            return await continuation(details)
        handler = await continuation(details)
        return _refusal(handler, "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")


def _refusal(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""

    async def unary(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as the call shape needs

    if handler is not None and handler.response_streaming and not handler.request_streaming:
        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    if handler is not None:
        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(unary)
