"""Sync (:class:`ProxmoClient`) and asyncio (:class:`AsyncProxmoClient`) clients for
``proxmo.v1.CreditAssignmentService``.

Both share one behaviour:

- Every unary call has a deadline: the call's ``timeout`` or the client's default (30 s). It
  covers the whole call, retries and back-off included. A ``ComputeAdvantages`` left to the
  default whose 1,000 or more distinct states the server's encoder must embed gets the default
  plus twice the time they take at the server's measured encoder rate
  (:mod:`proxmo_client.deadline`; the rate comes from ``GetServerInfo``, cached for 60 s).
- UNAVAILABLE (the server is unreachable, not ready or draining) and CANCELLED coming from the
  server (a terminating replica cancels calls that reach it while grpc's own stop() runs) are
  retried, up to ``max_retries`` (default 5) times, ``min(max_backoff, backoff * 2**k) *
  U(0.5, 1]`` seconds apart. Every unary RPC is safe to repeat: a ``ComputeAdvantages`` retry
  re-sends the *same* ``request_id`` (a uuid4 filled in before the first attempt when empty),
  so the server applies the batch's success-rate update once; the reads, ``ResetSuccessRates``
  and ``PrefetchStates`` are idempotent. The client's own cancellations are never retried:
  cancelling the task awaiting an ``AsyncProxmoClient`` call, or closing that client, raises
  ``asyncio.CancelledError`` (not a gRPC error); a ``ProxmoClient`` call still running when
  another thread closes the client raises :class:`~proxmo_client.errors.CancelledError`.
- Streams are not retried (their requests may already be consumed); every streamed request
  still gets a ``request_id``, so re-sending a batch by hand is safe.
- A failed RPC raises a :class:`~proxmo_client.errors.ProxmoError` subclass carrying the status
  code and details, with the ``grpc.RpcError`` as ``__cause__``.
- ``wait_until_serving()`` polls the gRPC health service until the server has warmed up.
- Keepalive pings every 30 s (10 s to answer), also while idle: a server must allow pings at
  least that often (the grpc defaults plus ``grpc.http2.min_ping_interval_without_data_ms`` =
  10 s and ``grpc.keepalive_permit_without_calls`` = 1 do).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from enum import IntEnum
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from proxmo_client._version import __version__
from proxmo_client.builders import TrajectoryLike, build_request, new_request_id
from proxmo_client.deadline import SERVER_INFO_TIMEOUT_S, ServerInfoCache
from proxmo_client.errors import (
    BuildError,
    DeadlineExceededError,
    ProxmoError,
    UnavailableError,
    error_from_rpc,
)
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"

ResponseT = TypeVar("ResponseT")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE and server-side CANCELLED: at most ``max_retries`` after the
    first attempt."""

    max_retries: int = 5
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def delay_s(self, retry: int) -> float:
        """Seconds before retry ``retry`` (0-based): min(max, backoff * 2**retry) * U(0.5, 1]."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2.0**retry)
        return ceiling * (1.0 - 0.5 * random.random())


class HealthStatus(IntEnum):
    """``grpc.health.v1.HealthCheckResponse.ServingStatus``."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3


def _health_messages() -> tuple[Any, Any]:
    """HealthCheckRequest/Response classes, built in a private descriptor pool.

    The client depends on grpcio alone (no grpcio-health-checking); a private pool cannot clash
    with the real health module when both are imported in one process.
    """
    proto = descriptor_pb2.FileDescriptorProto(
        name="grpc/health/v1/health.proto", package="grpc.health.v1", syntax="proto3"
    )
    field = descriptor_pb2.FieldDescriptorProto
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = proto.message_type.add(name="HealthCheckResponse")
    # ServingStatus is an enum on the wire: a varint, read here as int32.
    response.field.add(name="status", number=1, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{proto.package}.{request.name}")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{proto.package}.{response.name}")
        ),
    )


_HealthCheckRequest, _HealthCheckResponse = _health_messages()


@dataclass(frozen=True)
class _Connection:
    """What both clients derive from their constructor arguments."""

    target: str
    options: tuple[tuple[str, Any], ...]
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    metadata: tuple[tuple[str, str], ...]
    timeout_s: float | None
    retry: RetryPolicy


# Calls (not connections) spread over every address: HTTP/2 multiplexes all calls on one
# connection, so pick_first (gRPC's default) would pin every call to one replica.
ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_target(target: str | Sequence[str]) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target and extra channel options for ``target``.

    ``"host:port"``: one server (gRPC's default pick_first). A list of ``"ip:port"`` (several
    replicas) or a ``"dns:///name:port"`` name (e.g. a Kubernetes headless Service, one address
    per pod): round-robin over every address, call by call.
    """
    if isinstance(target, str):
        if target.startswith("dns:"):
            return target, [("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG)]
        return target, []
    addresses = [t.strip() for t in target]
    if not addresses:
        raise BuildError("target", "needs at least one address")
    families = set()
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise BuildError(
                "target", f"several targets must be ip:port (use dns:///name:port for a name), "
                f"got {address[:100]!r}"
            ) from None
        if not port.isdigit():
            raise BuildError("target", f"{address[:100]!r} has no port")
    if len(families) > 1:
        raise BuildError("target", "several targets must all be IPv4 or all IPv6")
    scheme = "ipv6" if families == {6} else "ipv4"
    return f"{scheme}:{','.join(addresses)}", [
        ("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG),
        ("grpc.default_authority", addresses[0]),
    ]


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _admin_metadata(conn: _Connection, admin_token: str | None) -> tuple[tuple[str, str], ...]:
    """The calls' metadata with the admin token in place of the client's token."""
    if not admin_token:
        return conn.metadata
    return (*(item for item in conn.metadata if item[0] != "authorization"),
            *_bearer(admin_token))


def _connection(
    target: str | Sequence[str],
    *,
    timeout: float | None,
    max_retries: int,
    retry_backoff_s: float,
    retry_max_backoff_s: float,
    tls: bool,
    root_certificates: bytes | None,
    tls_server_name: str | None,
    token: str | None,
    max_message_bytes: int,
    keepalive_time_s: float,
    keepalive_timeout_s: float,
    channel_options: Iterable[tuple[str, Any]],
) -> _Connection:
    if max_retries < 0:
        raise BuildError("max_retries", f"must be >= 0, got {max_retries}")
    if timeout is not None and timeout <= 0:
        raise BuildError("timeout", f"must be > 0 seconds or None, got {timeout}")
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection
        ("grpc.primary_user_agent", f"proxmo-client-python/{__version__}"),
    ]
    credentials = None
    if tls or root_certificates is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
    grpc_target, balancing = channel_target(target)
    options.extend(balancing)
    options.extend(channel_options)
    metadata = _bearer(token)
    retry = RetryPolicy(max_retries, retry_backoff_s, retry_max_backoff_s)
    return _Connection(grpc_target, tuple(options), credentials, metadata, timeout, retry)


class _Deadline:
    """The end of a call's time budget (None: no deadline)."""

    def __init__(self, timeout_s: float | None) -> None:
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())


# CANCELLED as an RpcError comes from the server: the calls are blocking or awaited, and a local
# cancellation surfaces otherwise (asyncio.CancelledError; a sync call cut by close() is not
# retried, see ProxmoClient._unary).
_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def _retry_delay(
    error: grpc.RpcError, retry: int, policy: RetryPolicy, deadline: _Deadline
) -> float | None:
    """Seconds to wait before retrying ``error``, or None when it must surface now."""
    if error.code() not in _RETRIED or retry >= policy.max_retries:
        return None
    delay = policy.delay_s(retry)
    remaining = deadline.remaining()
    if remaining is not None and delay >= remaining:
        return None  # no time left for another attempt: report the real error
    return delay


def _compute_request(
    batch: pb.ComputeAdvantagesRequest | Iterable[TrajectoryLike],
    *,
    preset: str | None,
    request_id: str | None,
    dry_run: bool,
    config_overrides: dict[str, Any],
) -> pb.ComputeAdvantagesRequest:
    """A request ready to send, with a request_id; the caller's message is never modified."""
    if not isinstance(batch, pb.ComputeAdvantagesRequest):
        return build_request(
            batch, preset=preset, request_id=request_id, dry_run=dry_run, **config_overrides
        )
    if preset is not None or config_overrides:
        raise BuildError("config", "pass config in the request or as arguments, not both")
    request = pb.ComputeAdvantagesRequest()
    request.CopyFrom(batch)
    if request_id:
        request.request_id = request_id
    if dry_run:
        request.dry_run = True
    return _with_request_id(request)


def _with_request_id(request: pb.ComputeAdvantagesRequest) -> pb.ComputeAdvantagesRequest:
    if not isinstance(request, pb.ComputeAdvantagesRequest):
        raise BuildError("requests", f"expected ComputeAdvantagesRequest, got {type(request)}")
    if request.request_id:
        return request
    filled = pb.ComputeAdvantagesRequest()
    filled.CopyFrom(request)
    filled.request_id = new_request_id()
    return filled


def _prefetch_request(states: Iterable[str], wait: bool) -> pb.PrefetchStatesRequest:
    if isinstance(states, (str, bytes, Mapping)) or not isinstance(states, Iterable):
        raise BuildError("states", f"expected a list of strings, got {type(states).__name__}")
    if not isinstance(wait, bool):
        raise BuildError("wait", f"expected a bool, got {wait!r}")
    texts = list(states)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BuildError(f"states[{i}]", f"expected a string, got {type(text).__name__}")
    return pb.PrefetchStatesRequest(states=texts, wait=wait)


def _reset_request(task_ids: Iterable[str] | None, all_tasks: bool) -> pb.ResetSuccessRatesRequest:
    names = list(task_ids or ())
    if all_tasks == bool(names):
        raise BuildError("task_ids", "give task ids, or all_tasks=True (not both, not neither)")
    return pb.ResetSuccessRatesRequest(task_ids=names, all_tasks=all_tasks)


class ProxmoClient:
    """Blocking client. Thread-safe; one per process is enough (it multiplexes one channel).

    >>> with ProxmoClient("localhost:50051") as client:
    ...     response = client.compute_advantages(trajectories, preset="proxmo")
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_retries: int = 5,
        retry_backoff_s: float = 0.1,
        retry_max_backoff_s: float = 5.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_time_s: float = 30.0,
        keepalive_timeout_s: float = 10.0,
        channel_options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        """``timeout``: default deadline of each unary call in seconds (None: none).
        ``tls``/``root_certificates``/``tls_server_name``: TLS (root_certificates implies tls).
        ``token``: sent as ``authorization: Bearer <token>`` on every call.
        ``target``: ``"host:port"``, several ``"ip:port"`` (a list) or ``"dns:///name:port"``:
        the last two balance calls round-robin over every address (see ``channel_target``)."""
        self._conn = _connection(
            target,
            timeout=timeout,
            max_retries=max_retries,
            retry_backoff_s=retry_backoff_s,
            retry_max_backoff_s=retry_max_backoff_s,
            tls=tls,
            root_certificates=root_certificates,
            tls_server_name=tls_server_name,
            token=token,
            max_message_bytes=max_message_bytes,
            keepalive_time_s=keepalive_time_s,
            keepalive_timeout_s=keepalive_timeout_s,
            channel_options=channel_options,
        )
        c = self._conn
        self._channel: grpc.Channel = (
            grpc.secure_channel(c.target, c.credentials, options=c.options)
            if c.credentials is not None
            else grpc.insecure_channel(c.target, options=c.options)
        )
        self._stub = pb_grpc.CreditAssignmentServiceStub(self._channel)
        self._closed = False
        self._server_info = ServerInfoCache()  # its encoder rate sizes encoding deadlines
        self._health_check = self._channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=_HealthCheckRequest.SerializeToString,
            response_deserializer=_HealthCheckResponse.FromString,
        )

    # ---- RPCs

    def compute_advantages(
        self,
        batch: pb.ComputeAdvantagesRequest | Iterable[TrajectoryLike],
        *,
        preset: str | None = None,
        request_id: str | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
        **config_overrides: Any,
    ) -> pb.ComputeAdvantagesResponse:
        """Per-step advantages of one batch: a request, or trajectory dicts plus config
        arguments (see :func:`~proxmo_client.builders.build_request`)."""
        request = _compute_request(
            batch,
            preset=preset,
            request_id=request_id,
            dry_run=dry_run,
            config_overrides=config_overrides,
        )
        response: pb.ComputeAdvantagesResponse = self._unary(
            "ComputeAdvantages", self._stub.ComputeAdvantages, request,
            self._compute_timeout(request, timeout),
        )
        return response

    def _compute_timeout(
        self, request: pb.ComputeAdvantagesRequest, timeout: float | None
    ) -> float | None:
        """The call's ``timeout``, or the client's default extended by the time the server may
        need to encode the batch (see :mod:`proxmo_client.deadline`)."""
        sizing = self._server_info
        if sizing.needs_refresh(timeout, self._conn.timeout_s, request):
            try:
                sizing.put(self.server_info(timeout=SERVER_INFO_TIMEOUT_S))
            except ProxmoError:
                sizing.put(None)  # the call itself will report what is wrong
        return sizing.timeout(timeout, self._conn.timeout_s, request)

    def stream_advantages(
        self, requests: Iterable[pb.ComputeAdvantagesRequest], *, timeout: float | None = None
    ) -> Iterator[pb.ComputeAdvantagesResponse]:
        """Responses in request order over one stream. ``timeout`` bounds the whole stream
        (default: none, a stream lives as long as its requests). Closing the iterator early
        cancels the stream, and the server stops working on it."""
        call = self._stub.StreamAdvantages(
            (_with_request_id(r) for r in requests),
            timeout=timeout,
            metadata=self._conn.metadata,
        )
        try:
            yield from call
        except grpc.RpcError as error:
            raise error_from_rpc(error, "StreamAdvantages") from error
        finally:
            call.cancel()  # no-op once the stream has finished

    def prefetch_states(
        self, states: Iterable[str], *, wait: bool = False, timeout: float | None = None
    ) -> pb.PrefetchStatesResponse:
        """Asks the server to embed ``states`` in the background, so that a later
        ``compute_advantages`` with ENCODER similarity finds them cached instead of encoding
        them on its critical path.

        Call it from the rollout loop as each trajectory finishes, with that trajectory's state
        texts (exactly as they will appear in the batch): encoding then overlaps the rollouts.
        Without ``wait`` the server answers as soon as the texts are queued, so it does not hold
        up the rollouts; ``wait=True`` answers once they are embedded (warming a server up
        front; mind ``timeout``). The response counts the distinct, already cached, queued and
        dropped (queue full) texts.

        A prefetch is only a hint: its failure never changes any result, the batch's states are
        then encoded when the batch arrives. Errors still raise like every other call (retried
        like them: it is idempotent), e.g. FAILED_PRECONDITION from a server without an encoder;
        a rollout loop that must not stop for a hint wraps the call in
        ``try: ... except ProxmoError: pass``. A non-str entry raises BuildError naming
        ``states[i]`` before anything is sent.
        """
        request = _prefetch_request(states, wait)
        response: pb.PrefetchStatesResponse = self._unary(
            "PrefetchStates", self._stub.PrefetchStates, request, timeout
        )
        return response

    def get_success_rates(
        self,
        task_ids: Iterable[str] = (),
        *,
        prefix: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.GetSuccessRatesResponse:
        """Success-rate histories by task id, or one page of a task-id prefix."""
        request = pb.GetSuccessRatesRequest(
            task_ids=list(task_ids), prefix=prefix, page_size=page_size, page_token=page_token
        )
        response: pb.GetSuccessRatesResponse = self._unary(
            "GetSuccessRates", self._stub.GetSuccessRates, request, timeout
        )
        return response

    def reset_success_rates(
        self,
        task_ids: Iterable[str] | None = None,
        *,
        all_tasks: bool = False,
        timeout: float | None = None,
        admin_token: str | None = None,
    ) -> pb.ResetSuccessRatesResponse:
        """Deletes the named tasks' histories, or every task of the server's namespace.

        ``admin_token``: a server with auth on takes this call only with its admin token
        (``--admin-token``), sent instead of the client's token; without it the server answers
        PERMISSION_DENIED (:class:`PermissionDeniedError`)."""
        request = _reset_request(task_ids, all_tasks)
        response: pb.ResetSuccessRatesResponse = self._unary(
            "ResetSuccessRates", self._stub.ResetSuccessRates, request, timeout,
            metadata=_admin_metadata(self._conn, admin_token),
        )
        return response

    def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """Version, presets, similarities, encoder and limits of the server."""
        response: pb.GetServerInfoResponse = self._unary(
            "GetServerInfo", self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout
        )
        return response

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """``grpc.health.v1.Health/Check`` of ``service`` ("" = the whole server). Not retried:
        an unreachable server raises UnavailableError at once."""
        request = _HealthCheckRequest(service=service)
        response = self._unary("Health/Check", self._health_check, request, timeout, retry=False)
        return HealthStatus(response.status)

    def wait_until_serving(
        self, timeout: float = 120.0, *, service: str = "", poll_s: float = 0.25
    ) -> None:
        """Blocks until ``health(service)`` is SERVING (a server warms up, e.g. loads its
        encoder, before it serves). Raises DeadlineExceededError after ``timeout`` seconds."""
        deadline = _Deadline(timeout)
        last = "no answer"
        while True:
            remaining = deadline.remaining() or 0.0
            try:
                status = self.health(service, timeout=max(min(remaining, 5.0), 0.001))
                if status is HealthStatus.SERVING:
                    return
                last = status.name
            except (UnavailableError, DeadlineExceededError) as error:
                last = error.code.name
            if deadline.remaining() == 0.0:
                raise DeadlineExceededError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"not SERVING after {timeout} s (last: {last})",
                    method="wait_until_serving",
                )
            time.sleep(min(poll_s, deadline.remaining() or 0.0))

    # ---- lifecycle

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def __enter__(self) -> ProxmoClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(
        self,
        method: str,
        rpc: Callable[..., Any],
        request: Any,
        timeout: float | None,
        *,
        retry: bool = True,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Any:
        deadline = _Deadline(self._conn.timeout_s if timeout is None else timeout)
        metadata = self._conn.metadata if metadata is None else metadata
        attempt = 0
        while True:
            try:
                return rpc(request, timeout=deadline.remaining(), metadata=metadata)
            except grpc.RpcError as error:
                # close() from another thread cancels a running call locally (CANCELLED
                # "Channel closed!"): a closed client retries nothing.
                delay = None
                if retry and not self._closed:
                    delay = _retry_delay(error, attempt, self._conn.retry, deadline)
                if delay is None:
                    raise error_from_rpc(error, method) from error
                time.sleep(delay)
                if self._closed:  # closed during the back-off
                    raise error_from_rpc(error, method) from error
            attempt += 1


class AsyncProxmoClient:
    """asyncio client (grpc.aio), same arguments and behaviour as :class:`ProxmoClient`.
    Create it inside the event loop that uses it.

    >>> async with AsyncProxmoClient("localhost:50051") as client:
    ...     response = await client.compute_advantages(trajectories)
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_retries: int = 5,
        retry_backoff_s: float = 0.1,
        retry_max_backoff_s: float = 5.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_time_s: float = 30.0,
        keepalive_timeout_s: float = 10.0,
        channel_options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self._conn = _connection(
            target,
            timeout=timeout,
            max_retries=max_retries,
            retry_backoff_s=retry_backoff_s,
            retry_max_backoff_s=retry_max_backoff_s,
            tls=tls,
            root_certificates=root_certificates,
            tls_server_name=tls_server_name,
            token=token,
            max_message_bytes=max_message_bytes,
            keepalive_time_s=keepalive_time_s,
            keepalive_timeout_s=keepalive_timeout_s,
            channel_options=channel_options,
        )
        c = self._conn
        self._channel: grpc.aio.Channel = (
            grpc.aio.secure_channel(c.target, c.credentials, options=c.options)
            if c.credentials is not None
            else grpc.aio.insecure_channel(c.target, options=c.options)
        )
        self._stub = pb_grpc.CreditAssignmentServiceStub(self._channel)
        self._closed = False
        self._server_info = ServerInfoCache()  # its encoder rate sizes encoding deadlines
        self._health_check = self._channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=_HealthCheckRequest.SerializeToString,
            response_deserializer=_HealthCheckResponse.FromString,
        )

    async def compute_advantages(
        self,
        batch: pb.ComputeAdvantagesRequest | Iterable[TrajectoryLike],
        *,
        preset: str | None = None,
        request_id: str | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
        **config_overrides: Any,
    ) -> pb.ComputeAdvantagesResponse:
        """See :meth:`ProxmoClient.compute_advantages`."""
        request = _compute_request(
            batch,
            preset=preset,
            request_id=request_id,
            dry_run=dry_run,
            config_overrides=config_overrides,
        )
        response: pb.ComputeAdvantagesResponse = await self._unary(
            "ComputeAdvantages", self._stub.ComputeAdvantages, request,
            await self._compute_timeout(request, timeout),
        )
        return response

    async def _compute_timeout(
        self, request: pb.ComputeAdvantagesRequest, timeout: float | None
    ) -> float | None:
        """See :meth:`ProxmoClient._compute_timeout`."""
        sizing = self._server_info
        if sizing.needs_refresh(timeout, self._conn.timeout_s, request):
            try:
                sizing.put(await self.server_info(timeout=SERVER_INFO_TIMEOUT_S))
            except ProxmoError:
                sizing.put(None)
        return sizing.timeout(timeout, self._conn.timeout_s, request)

    async def stream_advantages(
        self,
        requests: Iterable[pb.ComputeAdvantagesRequest]
        | AsyncIterable[pb.ComputeAdvantagesRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.ComputeAdvantagesResponse]:
        """See :meth:`ProxmoClient.stream_advantages`; ``requests`` may be an async iterable."""
        call = self._stub.StreamAdvantages(
            _aiter_with_request_ids(requests), timeout=timeout, metadata=self._conn.metadata
        )
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            raise error_from_rpc(error, "StreamAdvantages") from error
        finally:
            call.cancel()

    async def prefetch_states(
        self, states: Iterable[str], *, wait: bool = False, timeout: float | None = None
    ) -> pb.PrefetchStatesResponse:
        """See :meth:`ProxmoClient.prefetch_states`."""
        request = _prefetch_request(states, wait)
        response: pb.PrefetchStatesResponse = await self._unary(
            "PrefetchStates", self._stub.PrefetchStates, request, timeout
        )
        return response

    async def get_success_rates(
        self,
        task_ids: Iterable[str] = (),
        *,
        prefix: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.GetSuccessRatesResponse:
        """See :meth:`ProxmoClient.get_success_rates`."""
        request = pb.GetSuccessRatesRequest(
            task_ids=list(task_ids), prefix=prefix, page_size=page_size, page_token=page_token
        )
        response: pb.GetSuccessRatesResponse = await self._unary(
            "GetSuccessRates", self._stub.GetSuccessRates, request, timeout
        )
        return response

    async def reset_success_rates(
        self,
        task_ids: Iterable[str] | None = None,
        *,
        all_tasks: bool = False,
        timeout: float | None = None,
        admin_token: str | None = None,
    ) -> pb.ResetSuccessRatesResponse:
        """See :meth:`ProxmoClient.reset_success_rates`."""
        request = _reset_request(task_ids, all_tasks)
        response: pb.ResetSuccessRatesResponse = await self._unary(
            "ResetSuccessRates", self._stub.ResetSuccessRates, request, timeout,
            metadata=_admin_metadata(self._conn, admin_token),
        )
        return response

    async def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """See :meth:`ProxmoClient.server_info`."""
        response: pb.GetServerInfoResponse = await self._unary(
            "GetServerInfo", self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout
        )
        return response

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """See :meth:`ProxmoClient.health`."""
        request = _HealthCheckRequest(service=service)
        response = await self._unary(
            "Health/Check", self._health_check, request, timeout, retry=False
        )
        return HealthStatus(response.status)

    async def wait_until_serving(
        self, timeout: float = 120.0, *, service: str = "", poll_s: float = 0.25
    ) -> None:
        """See :meth:`ProxmoClient.wait_until_serving`."""
        deadline = _Deadline(timeout)
        last = "no answer"
        while True:
            remaining = deadline.remaining() or 0.0
            try:
                status = await self.health(service, timeout=max(min(remaining, 5.0), 0.001))
                if status is HealthStatus.SERVING:
                    return
                last = status.name
            except (UnavailableError, DeadlineExceededError) as error:
                last = error.code.name
            if deadline.remaining() == 0.0:
                raise DeadlineExceededError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"not SERVING after {timeout} s (last: {last})",
                    method="wait_until_serving",
                )
            await asyncio.sleep(min(poll_s, deadline.remaining() or 0.0))

    async def close(self) -> None:
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> AsyncProxmoClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(
        self,
        method: str,
        rpc: Callable[..., Awaitable[Any]],
        request: Any,
        timeout: float | None,
        *,
        retry: bool = True,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Any:
        deadline = _Deadline(self._conn.timeout_s if timeout is None else timeout)
        metadata = self._conn.metadata if metadata is None else metadata
        attempt = 0
        while True:
            try:
                return await rpc(request, timeout=deadline.remaining(), metadata=metadata)
            except grpc.RpcError as error:
                # A local cancellation (of the task, or by close()) raises asyncio.CancelledError,
                # which is not an RpcError: it propagates as is, never retried.
                delay = None
                if retry and not self._closed:
                    delay = _retry_delay(error, attempt, self._conn.retry, deadline)
                if delay is None:
                    raise error_from_rpc(error, method) from error
                await asyncio.sleep(delay)
                if self._closed:  # closed during the back-off
                    raise error_from_rpc(error, method) from error
            attempt += 1


async def _aiter_with_request_ids(
    requests: Iterable[pb.ComputeAdvantagesRequest] | AsyncIterable[pb.ComputeAdvantagesRequest],
) -> AsyncIterator[pb.ComputeAdvantagesRequest]:
    if isinstance(requests, AsyncIterable):
        async for request in requests:
            yield _with_request_id(request)
    else:
        for request in requests:
            yield _with_request_id(request)
