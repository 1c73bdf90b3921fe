"""The errors the Engine raises, each carrying the status its front door answers with.

The gRPC servicer maps ``grpc_code`` (a ``grpc.StatusCode`` member name) and the REST app
``http_status``; the CLI exits 2 for ``InvalidArgument`` / ``LimitExceeded``. Every message
names the offending field, so ``str(err)`` reads e.g.
``trajectories[3].steps[7].reward: must be finite, got nan``.

This module imports neither grpc nor the core, so every layer can use it.
"""

from __future__ import annotations

from typing import ClassVar, Protocol


class _FieldError(Protocol):
    """What the core's ``ValidationError`` looks like (duck-typed to keep this module leaf)."""

    field: str
    message: str


class ProxmoError(Exception):
    """Base of every expected error; ``field`` is empty when no single field is at fault."""

    grpc_code: ClassVar[str] = "INTERNAL"
    http_status: ClassVar[int] = 500

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (compute workers): rebuild from field and message,
        # whatever the subclass's own __init__ takes.
        return _rebuild, (type(self), self.field, self.message)


def _rebuild(cls: type[ProxmoError], field: str, message: str) -> ProxmoError:
    error = cls.__new__(cls)
    ProxmoError.__init__(error, field, message)
    return error


class InvalidArgument(ProxmoError):
    """The request is malformed: a bad value, a missing value, inconsistent fields."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 422

    @classmethod
    def from_validation(cls, error: _FieldError) -> InvalidArgument:
        """Wraps the core's ``ValidationError`` so that its field survives."""
        return cls(error.field, error.message)


class NonFiniteResult(ProxmoError):
    """The estimator produced a NaN or an infinity for an accepted request: a bug, never an
    answer (docs/algorithm.md section 5a). The request fails as INTERNAL and stores nothing."""

    grpc_code = "INTERNAL"
    http_status = 500


class LimitExceeded(ProxmoError):
    """The request is larger than a configured limit (trajectories, steps, state length...)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 413


class FailedPrecondition(ProxmoError):
    """Valid request this server cannot serve as configured (e.g. ENCODER without encoder)."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 400


class Overloaded(ProxmoError):
    """Too many requests in flight; the client should back off and retry."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429

    def __init__(self, message: str = "server overloaded, retry later") -> None:
        super().__init__("", message)


class NotReady(ProxmoError):
    """The server is starting or draining."""

    grpc_code = "UNAVAILABLE"
    http_status = 503

    def __init__(self, message: str = "server not ready") -> None:
        super().__init__("", message)


class DeadlineExceeded(ProxmoError):
    """The caller's deadline passed before the work finished; no further work was done."""

    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504

    def __init__(self, message: str = "deadline exceeded") -> None:
        super().__init__("", message)


class ClientGone(ProxmoError):
    """The caller disconnected before its answer was ready; the work was abandoned."""

    grpc_code = "CANCELLED"
    http_status = 499

    def __init__(self, message: str = "client disconnected; the work was stopped") -> None:
        super().__init__("", message)


# Exit statuses of the CLI, next to the errors they classify.
BAD_INPUT_ERRORS: tuple[type[ProxmoError], ...] = (InvalidArgument, LimitExceeded)
