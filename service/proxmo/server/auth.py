"""Access control (bearer tokens) and TLS material for both front doors.

With an auth token configured (``--auth-token``, ``PROXMO_AUTH_TOKEN`` or ``--auth-token-file``)
every call must carry ``authorization: Bearer <token>``. A call without it, or with another
token, is refused before its body is decoded or any work starts: gRPC UNAUTHENTICATED, HTTP 401
with ``WWW-Authenticate: Bearer``. Refusals are counted (``proxmo_requests_total{code=
"UNAUTHENTICATED"}``, ``proxmo_rejected_total{reason="unauthenticated"}``) and logged, never
with the token.

Left open, so that probes and tooling keep working:

- gRPC: ``grpc.health.v1.Health`` (Kubernetes gRPC probes) and server reflection (the schema is
  the published proto);
- HTTP: ``/livez``, ``/healthz``, ``/readyz`` (probes carry no credentials), ``/docs`` and
  ``/openapi.json`` (the schema again).

``/metrics`` takes the auth token or, when set, the metrics token: a scraper then holds a
credential that opens nothing else.

The destructive calls (gRPC ``ResetSuccessRates``, HTTP ``DELETE /v1/tasks`` and
``DELETE /v1/tasks/{id}``) need the admin token (``--admin-token``, ``PROXMO_ADMIN_TOKEN``),
which also opens every other call; a trainer's token gets PERMISSION_DENIED / 403, and without
an admin token configured every caller does.

Tokens are compared as SHA-256 digests with ``hmac.compare_digest``: constant time, and the
comparison leaks not even the token's length. Only the digests are kept after start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from proxmo.errors import ProxmoError
from proxmo.server.config import Settings, SettingsError
from proxmo.server.runtime import Runtime, new_request_id
from proxmo.server.status import PermissionDenied, Unauthenticated, classify

# (transport, rpc[, error]) -> request id: counts and logs one refused call (default error:
# Unauthenticated).
RefusalRecorder = Callable[..., str]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

REFUSAL_MESSAGE = "missing or wrong bearer token (send 'authorization: Bearer <token>')"
ADMIN_REFUSAL_MESSAGE = "this call deletes success-rate histories: it needs the admin token"
NO_ADMIN_MESSAGE = ("this call deletes success-rate histories, and this server has no admin "
                    "token (--admin-token): it is refused")
# The destructive calls: with auth on, only the admin token opens them.
ADMIN_GRPC_RPCS = frozenset({"ResetSuccessRates"})
OPEN_GRPC_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
OPEN_HTTP_PATHS = frozenset({
    "/livez", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json",
})
METRICS_PATH = "/metrics"
# rpc label of a refused HTTP call. A fixed set: a label per request path would let anyone
# create unbounded metric series.
_HTTP_RPC = {
    ("POST", "/v1/advantages"): "ComputeAdvantages",
    ("POST", "/v1/prefetch"): "PrefetchStates",
    ("GET", "/v1/tasks"): "GetSuccessRates",
    ("DELETE", "/v1/tasks"): "ResetSuccessRates",
    ("GET", "/v1/info"): "GetServerInfo",
    ("GET", METRICS_PATH): "Metrics",
}


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class AccessPolicy:
    """Who may call. Empty digests: auth disabled (every call allowed)."""

    token_digest: bytes = b""
    metrics_digest: bytes = b""
    admin_digest: bytes = b""

    @property
    def enabled(self) -> bool:
        return bool(self.token_digest)

    def allows(self, authorization: str | None) -> bool:
        """A service call: the auth token (or the admin token, which opens every call)."""
        return not self.enabled or self._matches(self.token_digest, authorization) or (
            bool(self.admin_digest) and self._matches(self.admin_digest, authorization))

    def admin_refusal(self, authorization: str | None) -> str | None:
        """Why a destructive call is refused (PERMISSION_DENIED), None when it is allowed:
        auth off, or the admin token. A trainer's token never suffices."""
        if not self.enabled:
            return None
        if not self.admin_digest:
            return NO_ADMIN_MESSAGE
        return None if self._matches(self.admin_digest, authorization) else ADMIN_REFUSAL_MESSAGE

    def allows_metrics(self, authorization: str | None) -> bool:
        """``/metrics``: the auth token or the metrics token."""
        return self.allows(authorization) or (
            bool(self.metrics_digest) and self._matches(self.metrics_digest, authorization)
        )

    @staticmethod
    def _matches(expected: bytes, authorization: str | None) -> bool:
        token = bearer_token(authorization)
        return token is not None and hmac.compare_digest(_digest(token), expected)


def _checked_token(name: str, token: str) -> str:
    # HTTP/2 metadata and HTTP headers carry visible ASCII only; anything else could never match.
    if not token:
        raise SettingsError(f"{name}: is empty")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise SettingsError(f"{name}: must be visible ASCII without spaces (value not shown)")
    return token


def load_access_policy(settings: Settings) -> AccessPolicy:
    """The policy of ``auth_token`` / ``auth_token_file`` / ``metrics_token``."""
    token = settings.auth_token
    if settings.auth_token_file:
        path = Path(settings.auth_token_file).expanduser()
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error  # never the file's content
            raise SettingsError(f"auth_token_file: cannot read {path}: {reason}") from None
        token = _checked_token(f"auth_token_file ({path})", token)
    elif token:
        token = _checked_token("auth_token", token)
    if not token:
        return AccessPolicy()
    metrics = _checked_token("metrics_token", settings.metrics_token) \
        if settings.metrics_token else ""
    admin = _checked_token("admin_token", settings.admin_token) if settings.admin_token else ""
    if admin and admin in (token, metrics):
        raise SettingsError("admin_token: must differ from auth_token and metrics_token")
    return AccessPolicy(_digest(token), _digest(metrics) if metrics else b"",
                        _digest(admin) if admin else b"")


def refusal_recorder(runtime: Runtime) -> RefusalRecorder:
    """Counts and logs a refused call through the same path as every other answer."""
    def record(transport: str, rpc: str, error: ProxmoError | None = None) -> str:
        request_id = new_request_id()
        status = classify(error or Unauthenticated("authorization", REFUSAL_MESSAGE), request_id)
        runtime.finish(transport=transport, rpc=rpc, started=time.monotonic(),
                       request_id=request_id, error=status)
        return request_id

    return record


# --- gRPC --------------------------------------------------------------------------------------


def _metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def _refusing_handler(handler: grpc.RpcMethodHandler, error: ProxmoError) -> grpc.RpcMethodHandler:
    """A handler that refuses without receiving the request: a request-streaming handler that
    never reads, so not even a unary call's message is taken off the wire (HTTP/2 flow control
    then holds the sender to one window), let alone decoded."""
    code = grpc.StatusCode[error.grpc_code]

    async def refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, str(error))

    return grpc.stream_stream_rpc_method_handler(
        refuse, response_serializer=handler.response_serializer)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses (UNAUTHENTICATED) every call without the token, except health and reflection."""

    def __init__(self, policy: AccessPolicy, on_refused: RefusalRecorder) -> None:
        self._policy = policy
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        service, _, rpc = details.method.lstrip("/").rpartition("/")
        if service in OPEN_GRPC_SERVICES:
            return await continuation(details)
        authorization = _metadata_value(details.invocation_metadata, "authorization")
        error: ProxmoError | None = None
        if not self._policy.allows(authorization):
            error = Unauthenticated("authorization", REFUSAL_MESSAGE)
        elif rpc in ADMIN_GRPC_RPCS:
            reason = self._policy.admin_refusal(authorization)
            error = PermissionDenied("authorization", reason) if reason else None
        handler = await continuation(details)
        if error is None or handler is None:  # unknown method: UNIMPLEMENTED, as without auth
            return handler
        self._on_refused("grpc", rpc, error)
        return _refusing_handler(handler, error)


# --- HTTP --------------------------------------------------------------------------------------


class HttpBearerAuth:
    """ASGI middleware: 401 (``WWW-Authenticate: Bearer``) for calls without the token, before
    the body is read; the probes and the API docs stay open; ``/metrics`` also takes the
    metrics token."""

    def __init__(self, app: Asgi, *, policy: AccessPolicy, on_refused: RefusalRecorder) -> None:
        self._app = app
        self._policy = policy
        self._on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._policy.enabled:
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        authorization = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        method = scope.get("method", "")
        destructive = method == "DELETE" and (path == "/v1/tasks" or path.startswith("/v1/tasks/"))
        error: ProxmoError | None = None
        if path in OPEN_HTTP_PATHS:
            pass
        elif not (self._policy.allows_metrics(authorization) if path == METRICS_PATH
                  else self._policy.allows(authorization)):
            error = Unauthenticated("authorization", REFUSAL_MESSAGE)
        elif destructive:
            reason = self._policy.admin_refusal(authorization)
            error = PermissionDenied("authorization", reason) if reason else None
        if error is None:
            await self._app(scope, receive, send)
            return
        rpc = "ResetSuccessRates" if destructive else _HTTP_RPC.get((method, path), "other")
        request_id = self._on_refused("http", rpc, error)
        status = classify(error, request_id)
        body = json.dumps(status.body(request_id)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        if status.http_status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="proxmo"'))
        await send({"type": "http.response.start", "status": status.http_status,
                    "headers": headers})
        await send({"type": "http.response.body", "body": body})


# --- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate chain and its key (PEM), checked to belong together."""

    cert_path: str
    key_path: str
    cert_pem: bytes
    key_pem: bytes

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def load_tls(settings: Settings) -> TlsFiles | None:
    """``tls_cert`` + ``tls_key`` read and checked now (a bad pair stops the start with the
    setting's name), or None without TLS."""
    if not settings.tls_cert:
        return None
    paths = {name: Path(getattr(settings, name)).expanduser() for name in ("tls_cert", "tls_key")}
    pems: dict[str, bytes] = {}
    for name, path in paths.items():
        try:
            pems[name] = path.read_bytes()
        except OSError as error:
            raise SettingsError(f"{name}: cannot read {path}: {error.strerror}") from None
        if b"-----BEGIN " not in pems[name]:
            raise SettingsError(f"{name}: {path} is not PEM")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            paths["tls_cert"], paths["tls_key"])
    except ssl.SSLError as error:
        raise SettingsError(f"tls_key: does not match tls_cert, or is not a usable PEM key/"
                            f"certificate: {error.reason or error}") from None
    return TlsFiles(str(paths["tls_cert"]), str(paths["tls_key"]), pems["tls_cert"],
                    pems["tls_key"])
