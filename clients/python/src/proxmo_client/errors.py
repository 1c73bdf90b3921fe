"""Errors raised by the proxmo client.

Two families:

- :class:`BuildError` (a ``ValueError``): the input handed to a builder is malformed. Raised
  before anything is sent; ``field`` names the offending input, e.g. ``trajectories[3].rewards[7]``.
- :class:`ProxmoError`: the RPC failed. ``code`` is the ``grpc.StatusCode`` and ``details`` the
  server's message; the original ``grpc.RpcError`` is kept as ``__cause__``. Each status code the
  service documents has its own subclass, so callers can ``except UnavailableError``.
"""

from __future__ import annotations

import grpc


class BuildError(ValueError):
    """Malformed client-side input. ``str(e) == f"{field}: {message}"`` (as the server's errors)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ProxmoError(Exception):
    """A failed RPC: the gRPC status ``code`` and the server's ``details``."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode, details: str, *, method: str = "") -> None:
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{code.name}: {details}")
        self.code = code
        self.details = details
        self.method = method


class InvalidArgumentError(ProxmoError):
    """INVALID_ARGUMENT: the server rejected the request; ``details`` names the field."""


class ResourceExhaustedError(ProxmoError):
    """RESOURCE_EXHAUSTED: over a size limit or the server's concurrency limit."""


class FailedPreconditionError(ProxmoError):
    """FAILED_PRECONDITION: valid, but this server is not configured for it (e.g. ENCODER
    similarity or PrefetchStates on a server without an encoder)."""


class UnavailableError(ProxmoError):
    """UNAVAILABLE: the server is unreachable, not ready or draining (retried by the client)."""


class DeadlineExceededError(ProxmoError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class UnauthenticatedError(ProxmoError):
    """UNAUTHENTICATED: missing or wrong token."""


class PermissionDeniedError(ProxmoError):
    """PERMISSION_DENIED: the token may not do this."""


class CancelledError(ProxmoError):
    """CANCELLED: the call was cancelled."""


_BY_CODE: dict[grpc.StatusCode, type[ProxmoError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def error_from_rpc(error: grpc.RpcError, method: str = "") -> ProxmoError:
    """The :class:`ProxmoError` subclass for ``error``'s status code (raise it ``from error``)."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return _BY_CODE.get(code, ProxmoError)(code, details or str(error), method=method)
