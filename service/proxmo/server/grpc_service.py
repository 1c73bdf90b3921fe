"""The gRPC front door: a thin servicer over ``Runtime``, plus health and reflection.

Errors carry the status the error names (``proxmo.server.status``) and rich details
(``grpc-status-details-bin``): ``google.rpc.BadRequest`` field violations for a bad field,
``google.rpc.RequestInfo`` with the request id, ``google.rpc.RetryInfo`` when overloaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from proxmo.errors import InvalidArgument, LimitExceeded, ProxmoError
from proxmo.proto import pb, pb_grpc
from proxmo.server.auth import AccessPolicy, BearerAuthInterceptor, TlsFiles, refusal_recorder
from proxmo.server.config import Settings
from proxmo.server.prescan import check_wire_counts
from proxmo.server.runtime import Runtime, new_request_id
from proxmo.server.status import (
    ErrorStatus,
    classify,
    field_free_message,
    in_stream,
)

log = logging.getLogger("proxmo.server.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CreditAssignmentService"].full_name
TRANSPORT = "grpc"
_RETRY_AFTER_OVERLOAD = duration_pb2.Duration(nanos=100_000_000)  # a hint, not a promise

T = TypeVar("T")

# Requests larger than this are counted on their bytes and decoded on a thread (smaller ones
# decode in tens of milliseconds at worst); at most _LARGE_DECODES such decodes at a time.
DECODE_INLINE_BYTES = 256 * 1024
_LARGE_DECODES = 2
_REQUEST_TYPES: dict[str, type] = {
    "ComputeAdvantages": pb.ComputeAdvantagesRequest,
    "StreamAdvantages": pb.ComputeAdvantagesRequest,
    "PrefetchStates": pb.PrefetchStatesRequest,
}


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _status_proto(status: ErrorStatus, request_id: str) -> status_pb2.Status:
    details = []
    if status.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=status.field, description=field_free_message(status)
        )
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if status.reject_reason == "overloaded":
        details.append(error_details_pb2.RetryInfo(retry_delay=_RETRY_AFTER_OVERLOAD))
    details.append(error_details_pb2.RequestInfo(request_id=request_id))
    proto = status_pb2.Status(code=code_pb2.Code.Value(status.code), message=status.message)
    for detail in details:
        proto.details.add().Pack(detail)
    return proto


async def _abort(context: grpc.aio.ServicerContext, status: ErrorStatus,
                 request_id: str) -> NoReturn:
    await context.abort_with_status(rpc_status.to_status(_status_proto(status, request_id)))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def _cancelled_status(context: grpc.aio.ServicerContext) -> ErrorStatus:
    """Why the call was cancelled under us: its deadline passed, or the client left."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return ErrorStatus("DEADLINE_EXCEEDED", 504, "deadline exceeded", "", internal=False)
    return ErrorStatus("CANCELLED", 499, "client cancelled", "", internal=False)


class CreditAssignmentServicer(pb_grpc.CreditAssignmentServiceServicer):
    """proxmo.v1.CreditAssignmentService over ``Runtime``."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def _serve(self, rpc: str, context: grpc.aio.ServicerContext, request_id: str,
                     call: Callable[[], Awaitable[T]]) -> T:
        """Run one unary call: count, time and log it; turn exceptions into statuses."""
        started = time.monotonic()
        try:
            with self._rt.call():
                response = await call()
        except asyncio.CancelledError:
            self._rt.finish(transport=TRANSPORT, rpc=rpc, started=started,
                            request_id=request_id, error=_cancelled_status(context))
            raise
        except Exception as exc:
            status = classify(exc, request_id)
            self._rt.finish(transport=TRANSPORT, rpc=rpc, started=started,
                            request_id=request_id, error=status, exc=exc)
            await _abort(context, status, request_id)
        self._rt.finish(transport=TRANSPORT, rpc=rpc, started=started, request_id=request_id,
                        response=response if isinstance(response, pb.ComputeAdvantagesResponse)
                        else None)
        return response

    async def ComputeAdvantages(  # noqa: N802 (gRPC method name)
        self, request: pb.ComputeAdvantagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputeAdvantagesResponse:
        received = time.monotonic()
        return await self._serve(
            "ComputeAdvantages", context, self._rt.request_id_of(request),
            lambda: self._rt.compute(request, deadline=_deadline(context), received_at=received,
                                     wait_for_slot=False),
        )

    async def StreamAdvantages(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ComputeAdvantagesRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ComputeAdvantagesResponse]:
        """Up to ``stream_inflight`` requests computed at once, answered in request order.

        A reader task takes requests off the wire only while a slot of the stream is free, so
        a fast client is slowed by HTTP/2 flow control instead of piling work up. Each request
        also takes a server-wide admission slot, waiting for one (backpressure, never refused).
        When the client leaves, the handler is cancelled and the ``finally`` cancels the reader
        and every computation still running.
        """
        rt = self._rt
        deadline = _deadline(context)
        stream_slots = asyncio.Semaphore(rt.settings.stream_inflight)
        queue: asyncio.Queue[tuple[int, str, float, asyncio.Task[pb.ComputeAdvantagesResponse]]
                             | None] = asyncio.Queue()

        async def read() -> None:
            index = 0
            try:
                async for request in request_iterator:
                    await stream_slots.acquire()
                    received = time.monotonic()
                    task = asyncio.create_task(rt.compute(
                        request, deadline=deadline, received_at=received, wait_for_slot=True))
                    queue.put_nowait(
                        (index, rt.request_id_of(request), received, task))
                    index += 1
            finally:  # end of input, or a failed read: the answers so far go out first
                queue.put_nowait(None)

        with rt.call():  # the drain waits for the whole stream
            reader = asyncio.create_task(read())
            # Requests taken off the wire and not yet answered: (request id, receipt time).
            pending: dict[asyncio.Task[pb.ComputeAdvantagesResponse], tuple[str, float]] = {}
            try:
                while True:
                    item = await queue.get()
                    if item is None:
                        break
                    index, request_id, received, task = item
                    pending[task] = (request_id, received)
                    try:
                        response = await task  # cancelled: the finally accounts for it
                    except Exception as exc:
                        del pending[task]
                        status = in_stream(classify(exc, request_id), index)
                        rt.finish(transport=TRANSPORT, rpc="StreamAdvantages", started=received,
                                  request_id=request_id, error=status, exc=exc)
                        await _abort(context, status, request_id)
                    del pending[task]
                    rt.finish(transport=TRANSPORT, rpc="StreamAdvantages", started=received,
                              request_id=request_id, response=response)
                    yield response
                    stream_slots.release()
                await reader  # surfaces a failed read (e.g. an undecodable message)
            finally:
                reader.cancel()
                while not queue.empty():
                    item = queue.get_nowait()
                    if item is not None:
                        pending[item[3]] = (item[1], item[2])
                # Whatever the stream stopped at (awaiting an answer, yielding one, waiting
                # for the next request), every request taken off the wire and not answered
                # is cancelled and counted once.
                for task, (request_id, received) in pending.items():
                    task.cancel()
                    rt.finish(transport=TRANSPORT, rpc="StreamAdvantages", started=received,
                              request_id=request_id, error=_cancelled_status(context))

    async def PrefetchStates(  # noqa: N802
        self, request: pb.PrefetchStatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefetchStatesResponse:
        return await self._serve("PrefetchStates", context, new_request_id(),
                                 lambda: self._rt.prefetch_states(request))

    async def GetSuccessRates(  # noqa: N802
        self, request: pb.GetSuccessRatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSuccessRatesResponse:
        return await self._serve("GetSuccessRates", context, new_request_id(),
                                 lambda: self._rt.success_rates(request))

    async def ResetSuccessRates(  # noqa: N802
        self, request: pb.ResetSuccessRatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetSuccessRatesResponse:
        # Access (the admin token, when auth is on) is checked by BearerAuthInterceptor.
        return await self._serve("ResetSuccessRates", context, new_request_id(),
                                 lambda: self._rt.reset_success_rates(request))

    async def GetServerInfo(  # noqa: N802
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        async def info() -> pb.GetServerInfoResponse:
            return self._rt.server_info()

        return await self._serve("GetServerInfo", context, new_request_id(), info)


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Undecodable request bytes answer INVALID_ARGUMENT naming the request, not UNKNOWN.

    grpc decodes a request before the servicer runs and reports a DecodeError (corrupt wire
    bytes, invalid UTF-8 in a string) as UNKNOWN with the parser's text. This hands the servicer
    the same call with the bytes decoded inside it, where a failure becomes a field error.

    A message over ``DECODE_INLINE_BYTES`` first has its trajectories and steps counted on its
    bytes (``proxmo.server.prescan``: over a limit, RESOURCE_EXHAUSTED before any decoding),
    then is decoded on a thread, at most ``_LARGE_DECODES`` at a time. The decoder holds the
    GIL, so the loop still pauses while it runs, but only for as long as a message within the
    limits takes to decode.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._large_decodes = asyncio.Semaphore(_LARGE_DECODES)

    async def _decode(self, rpc: str, decode: Callable[[bytes], object], raw: bytes) -> object:
        if len(raw) <= DECODE_INLINE_BYTES:
            return decode(raw)
        message = _REQUEST_TYPES.get(rpc, object)
        limits = self._rt.engine.limits

        def checked() -> object:
            check_wire_counts(raw, message, limits)
            return decode(raw)

        async with self._large_decodes:
            return await asyncio.to_thread(checked)

    async def _refuse(self, context: grpc.aio.ServicerContext, rpc: str,
                      error: ProxmoError) -> NoReturn:
        """Count and log the refusal like any other answer, then abort the call."""
        request_id = new_request_id()
        status = classify(error, request_id)
        self._rt.finish(transport=TRANSPORT, rpc=rpc, started=time.monotonic(),
                        request_id=request_id, error=status)
        await _abort(context, status, request_id)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if (handler is None or handler.request_deserializer is None
                or not details.method.startswith(f"/{SERVICE_NAME}/")):
            return handler
        decode = handler.request_deserializer
        rpc = details.method.rsplit("/", 1)[1]
        serializer = handler.response_serializer
        if handler.request_streaming:  # StreamAdvantages, the one streaming RPC
            inner_stream = handler.stream_stream

            async def decoded(raw_requests: AsyncIterator[bytes]) -> AsyncIterator[object]:
                index = 0
                async for raw in raw_requests:
                    try:
                        request = await self._decode(rpc, decode, raw)
                    except DecodeError as error:
                        raise InvalidArgument(f"requests[{index}]",
                                              f"cannot be decoded: {error}") from None
                    except LimitExceeded as error:
                        raise LimitExceeded(f"requests[{index}].{error.field}",
                                            error.message) from None
                    yield request
                    index += 1

            async def stream(raw_requests: AsyncIterator[bytes],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
                try:
                    async for response in inner_stream(decoded(raw_requests), context):
                        yield response
                except ProxmoError as error:  # raised by `decoded` inside the servicer
                    await self._refuse(context, rpc, error)

            return grpc.stream_stream_rpc_method_handler(stream, response_serializer=serializer)

        inner_unary = handler.unary_unary

        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> object:
            try:
                request = await self._decode(rpc, decode, raw)
            except DecodeError as error:
                await self._refuse(context, rpc,
                                   InvalidArgument("request", f"cannot be decoded: {error}"))
            except ProxmoError as error:  # over a limit, counted on the bytes; not ready
                await self._refuse(context, rpc, error)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serializer)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel options, set deliberately (serving-anchors.md section 3.5/3.6)."""
    return [
        ("grpc.max_receive_message_length", settings.limits.max_message_bytes),
        ("grpc.max_send_message_length", settings.limits.max_message_bytes),
        # One connection cannot hold more calls than this (idle streams included).
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        # A connection without calls for this long gets GOAWAY (clients reconnect on demand).
        ("grpc.max_connection_idle_ms", settings.grpc_max_connection_idle_s * 1000),
        # Two servers silently sharing a port is never what we want.
        ("grpc.so_reuseport", 0),
        # Clients (ours pings every 30 s) may keep idle connections alive with pings every
        # 10 s; never punish them with GOAWAY too_many_pings.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # Find dead clients within ~1.5 min and free their streams.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


async def build_grpc_server(
    runtime: Runtime, *, access: AccessPolicy | None = None, tls: TlsFiles | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The grpc.aio server with the service, health (NOT_SERVING until warm) and reflection,
    bound to ``host:grpc_port`` (TLS with ``tls``; bearer-token access with ``access``) and not
    yet started."""
    settings = runtime.settings
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if access is not None and access.enabled:  # outermost: refuse before decoding anything
        interceptors.append(BearerAuthInterceptor(access, refusal_recorder(runtime)))
    interceptors.append(DecodeGuard(runtime))
    server = grpc.aio.server(interceptors=interceptors,
                             options=server_options(settings))
    pb_grpc.add_CreditAssignmentServiceServicer_to_server(  # type: ignore[no-untyped-call]
        CreditAssignmentServicer(runtime), server
    )
    health_servicer = health.aio.HealthServicer()
    # The servicer starts with {"": SERVING}; nothing is served before the warm-up is done.
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        bound = (server.add_secure_port(address, tls.grpc_credentials()) if tls is not None
                 else server.add_insecure_port(address))
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"grpc_port: cannot listen on {address} (in use?)")
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer) -> None:
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
