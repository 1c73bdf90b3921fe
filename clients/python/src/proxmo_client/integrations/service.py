"""Where the trainer hooks send their batches: one :class:`ServiceConfig`, one cached client."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxmo_client.client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, ProxmoClient
from proxmo_client.errors import BuildError

__all__ = ["ServiceConfig", "shared_client"]


@dataclass(frozen=True)
class ServiceConfig:
    """The service and estimator a trainer hook uses.

    ``server``: gRPC target. ``preset``: estimator preset ("" = the server's default).
    ``overrides``: ``proxmo.v1.EstimatorConfig`` fields by name. ``timeout``: seconds per call,
    retries included. ``token``: bearer token. ``dry_run``: compute without writing the
    success-rate history.
    """

    server: str = DEFAULT_TARGET
    preset: str = ""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT_S
    token: str | None = None
    dry_run: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> ServiceConfig:
        """From a plain mapping (a parsed YAML section); errors name ``{where}.{key}``."""
        known = cls.__dataclass_fields__
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise BuildError(f"{where}.{unknown[0]}", f"unknown key; expected {', '.join(known)}")
        overrides = values.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise BuildError(f"{where}.overrides", "expected a mapping of EstimatorConfig fields")
        timeout = values.get("timeout", DEFAULT_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise BuildError(f"{where}.timeout", f"expected seconds > 0, got {timeout!r}")
        dry_run = values.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise BuildError(f"{where}.dry_run", f"expected a bool, got {dry_run!r}")
        return cls(
            server=str(values.get("server") or DEFAULT_TARGET),
            preset=str(values.get("preset") or ""),
            overrides=dict(overrides),
            timeout=float(timeout),
            token=values.get("token") or None,
            dry_run=dry_run,
        )

    def client(self) -> ProxmoClient:
        """The process-wide client for this server (one channel; ProxmoClient is thread-safe)."""
        return shared_client(self.server, self.token, self.timeout)


@functools.lru_cache(maxsize=8)
def shared_client(server: str, token: str | None, timeout: float) -> ProxmoClient:
    return ProxmoClient(server, token=token, timeout=timeout)
