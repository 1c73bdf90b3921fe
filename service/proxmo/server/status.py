"""One mapping from exceptions to what both front doors answer (gRPC code, HTTP status, body).

Expected errors (``proxmo.errors.ProxmoError``; the core's ``ValidationError`` arrives already
turned into InvalidArgument by ``proxmo.engine.field_errors``) keep their message, which names
the offending field. Anything else is a bug: it becomes INTERNAL / 500 with only a request id
in the message; the trace goes to the log, never to the client.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxmo.core.batch import cut
from proxmo.errors import ProxmoError

# Reason label of proxmo_rejected_total per gRPC code.
_REJECT_REASONS = {
    "INVALID_ARGUMENT": "invalid",
    "FAILED_PRECONDITION": "invalid",
    "DEADLINE_EXCEEDED": "deadline",
    "UNAVAILABLE": "not_ready",
    "UNAUTHENTICATED": "unauthenticated",
    "PERMISSION_DENIED": "permission_denied",
    "INTERNAL": "internal",
}


@dataclass(frozen=True)
class ErrorStatus:
    """What a failed request answers."""

    code: str          # grpc.StatusCode member name, e.g. "INVALID_ARGUMENT"
    http_status: int
    message: str       # safe to send: names the field, never a trace
    field: str         # the offending field path ("" when none)
    internal: bool     # True: a bug; log the trace

    @property
    def reject_reason(self) -> str:
        if self.code == "RESOURCE_EXHAUSTED":
            return "overloaded" if self.http_status == 429 else "limit"
        return _REJECT_REASONS.get(self.code, "other")

    def body(self, request_id: str = "") -> dict[str, object]:
        """The REST error body: ``{"error": {"code", "message", "field"[, "request_id"]}}``."""
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.field:
            error["field"] = self.field
        if request_id:
            error["request_id"] = request_id
        return {"error": error}


def classify(exc: BaseException, request_id: str) -> ErrorStatus:
    """The answer for an exception raised while serving request ``request_id``."""
    if isinstance(exc, ProxmoError):  # an INTERNAL one (NonFiniteResult) is a bug: log it
        return ErrorStatus(exc.grpc_code, exc.http_status, _bounded(str(exc)),
                           _bounded(exc.field), internal=exc.grpc_code == "INTERNAL")
    return ErrorStatus(
        "INTERNAL", 500, f"internal error (request_id={request_id})", "", internal=True
    )


# Longest message or field an error carries: whatever echoes user input, the answer's status
# (gRPC metadata, 8 KiB by default on the client side) and the log line stay small.
MAX_ERROR_CHARS = 1024


def _bounded(text: str) -> str:
    return cut(text, MAX_ERROR_CHARS)


class Unauthenticated(ProxmoError):
    """A call without the server's auth token (when one is configured)."""

    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(ProxmoError):
    """A destructive call without the admin token (auth on)."""

    grpc_code = "PERMISSION_DENIED"
    http_status = 403


def in_stream(status: ErrorStatus, index: int) -> ErrorStatus:
    """The status of request ``index`` of a stream: its field gains a ``requests[k]`` prefix."""
    prefix = f"requests[{index}]"
    field = f"{prefix}.{status.field}" if status.field else prefix
    return ErrorStatus(status.code, status.http_status,
                       f"{field}: {field_free_message(status)}", field,
                       status.internal)


def field_free_message(status: ErrorStatus) -> str:
    """The message without its leading ``field: `` (for structured field violations)."""
    return status.message.removeprefix(f"{status.field}: ") if status.field else status.message
