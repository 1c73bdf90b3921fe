"""proxmo client: compute per-step advantages with a proxmo server over gRPC.

Light on purpose (grpcio, protobuf, numpy); torch is used by :func:`to_token_advantages` only when
it is handed a tensor. The generated messages live in :mod:`proxmo_client.v1` (``proxmo_pb2``).
"""

from proxmo_client._version import __version__
from proxmo_client.builders import (
    RowBookkeeping,
    advantages_to_rows,
    build_config,
    build_request,
    new_request_id,
    parse_enum,
    trajectories_from_rows,
)
from proxmo_client.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    AsyncProxmoClient,
    HealthStatus,
    ProxmoClient,
    RetryPolicy,
)
from proxmo_client.errors import (
    BuildError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    ProxmoError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
)
from proxmo_client.tokens import to_token_advantages
from proxmo_client.v1 import proxmo_pb2 as pb

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT_S",
    "AsyncProxmoClient",
    "BuildError",
    "CancelledError",
    "DeadlineExceededError",
    "HealthStatus",
    "InvalidArgumentError",
    "PermissionDeniedError",
    "ProxmoClient",
    "ProxmoError",
    "FailedPreconditionError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RowBookkeeping",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
    "advantages_to_rows",
    "build_config",
    "build_request",
    "error_from_rpc",
    "new_request_id",
    "parse_enum",
    "pb",
    "to_token_advantages",
    "trajectories_from_rows",
]
