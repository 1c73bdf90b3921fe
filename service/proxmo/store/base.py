"""The success-rate store interface: per-task decayed history for the HISTORY source.

Two implementations share these semantics (and one test suite): ``MemoryStore`` (embedded
default, one process) and ``RedisStore`` (shared by every replica, survives restarts).

Semantics every store keeps:
- ``apply`` performs ONE update per distinct task_id of the request (updates with the same task_id
  are summed first: all of a batch's groups of a task count as one update), atomically for the
  whole request, and returns p per task (``proxmo.core.history.apply_update``).
- Idempotency: the first ``apply`` of a non-empty ``request_id`` claims it for
  ``request_ttl_seconds``; any later apply with that id writes nothing and returns the p's of the
  first application with ``replayed=True``. An empty ``request_id`` is never a replay (the store
  makes a fresh id for it).
- ``dry_run`` never writes and never claims; it returns the p a real update would give (or the
  first application's p's when the id was already applied).
- A task's history expires ``ttl_seconds`` after its last update (sliding).
- Task ids are ordered by code point (= UTF-8 byte order) for ``scan``.
- At most ``max_tasks`` stored tasks (0: no cap): a request that would add new tasks past the cap
  raises ``StoreFull`` and stores nothing; updates of stored tasks always pass.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from proxmo.core.batch import ValidationError, echo
from proxmo.errors import ProxmoError

DEFAULT_TTL_SECONDS = 30 * 24 * 3600
DEFAULT_REQUEST_TTL_SECONDS = 24 * 3600
DEFAULT_MAX_BUFFERED = 10_000
# Stored tasks per namespace: bounds Redis memory (~0.56 KB a task) against a client that invents
# task ids without end. At the cap, a request with new task ids is refused whole (StoreFull).
DEFAULT_MAX_TASKS = 1_000_000
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100

# Namespaces are ':'-separated words; a word may not be one of the store's own key segments, so
# that no key of one namespace can ever be a key of another ("a" vs "a:task:b").
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]+(?::[A-Za-z0-9_.\-]+)*$")
_RESERVED_SEGMENTS = frozenset({"task", "req", "tasks"})


class StoreFull(ProxmoError):
    """The store holds ``max_tasks`` tasks and this request brings new ones: refused whole
    (nothing of it stored, nothing counted), RESOURCE_EXHAUSTED / 507."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 507

    @classmethod
    def at(cls, stored: object, cap: str) -> StoreFull:
        """The error for a store holding ``stored`` tasks at ``cap`` (described)."""
        return cls(
            "task_id",
            f"the success-rate store holds {stored} tasks, its cap ({cap}); this request's new "
            "task ids would pass it, so nothing of it was stored. Reset finished tasks, let "
            "them expire, or raise the cap.",
        )


@dataclass(frozen=True)
class TaskUpdate:
    """One group's (or several groups') outcome for a task in this batch."""

    task_id: str
    successes: int
    trials: int


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` did."""

    rates: Mapping[str, float]  # p per task_id after this update (first application's if replayed)
    replayed: bool  # request_id already applied: nothing written
    degraded: bool  # store unreachable: rates empty, the engine falls back to BATCH


@dataclass(frozen=True)
class TaskRecord:
    """The stored history of one task (the proto's TaskSuccessRate)."""

    task_id: str
    success_rate: float  # (S + a) / (N + a + b) with the store's default prior
    decayed_successes: float  # S
    decayed_trials: float  # N
    total_successes: int
    total_trials: int
    updates: int
    last_update_unix: float


@dataclass(frozen=True)
class StoreHealth:
    """What ``/readyz?verbose`` shows for the store."""

    ok: bool
    detail: str
    buffered_updates: int


class SuccessRateStore(ABC):
    """Per-task success-rate history. All methods are coroutines and safe to call concurrently."""

    name: str  # "memory" | "redis"
    namespace: str

    @abstractmethod
    async def apply(
        self,
        request_id: str,
        updates: Sequence[TaskUpdate],
        *,
        half_life: float,
        prior: float,
        dry_run: bool,
    ) -> ApplyResult:
        """Applies one request's updates atomically (see the module docstring)."""

    @abstractmethod
    async def get(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        """The records of these tasks, in the given order; unknown tasks are left out."""

    @abstractmethod
    async def scan(
        self, prefix: str, page_size: int, page_token: str
    ) -> tuple[list[TaskRecord], str]:
        """One page of tasks whose id starts with ``prefix``, in task-id order.

        ``page_size`` 0 means the default (100), at most 1000. Returns the page and the opaque
        token of the next page ("" on the last page).
        """

    @abstractmethod
    async def reset(self, task_ids: Sequence[str] | None) -> int:
        """Deletes these tasks' histories (None: every task of this namespace); returns how many."""

    @abstractmethod
    async def health(self) -> StoreHealth:
        """Whether the store is usable now, and how many updates wait to be written."""

    @abstractmethod
    async def close(self) -> None:
        """Releases connections and background tasks (flushing what can be flushed)."""


# ---- helpers shared by the implementations -------------------------------------------------


def validate_namespace(namespace: str) -> str:
    """Returns ``namespace`` or raises ValidationError("namespace") when it could collide."""
    if not _NAMESPACE_RE.match(namespace):
        raise ValidationError(
            "namespace", f"must be ':'-separated words of [A-Za-z0-9_.-], got {echo(namespace)}"
        )
    if _RESERVED_SEGMENTS.intersection(namespace.split(":")):
        raise ValidationError(
            "namespace", f"may not contain the segments {sorted(_RESERVED_SEGMENTS)}"
        )
    return namespace


def validate_history_params(half_life: float, prior: float) -> None:
    """half_life > 0 and finite, prior >= 0 and finite (the proto's documented ranges)."""
    if not (math.isfinite(half_life) and half_life > 0):
        raise ValidationError(
            "config.history_half_life", f"must be finite and > 0, got {half_life}"
        )
    if not (math.isfinite(prior) and prior >= 0):
        raise ValidationError("config.history_prior", f"must be finite and >= 0, got {prior}")


def merge_updates(updates: Sequence[TaskUpdate]) -> dict[str, tuple[int, int]]:
    """Validates and sums the updates per task_id (first-appearance order).

    All of a batch's groups of one task count as ONE update of that task (docs/algorithm.md).
    """
    merged: dict[str, tuple[int, int]] = {}
    for i, update in enumerate(updates):
        if update.trials < 1:
            raise ValidationError(f"updates[{i}].trials", f"must be >= 1, got {update.trials}")
        if not 0 <= update.successes <= update.trials:
            raise ValidationError(
                f"updates[{i}].successes",
                f"must be in [0, trials={update.trials}], got {update.successes}",
            )
        successes, trials = merged.get(update.task_id, (0, 0))
        merged[update.task_id] = (successes + update.successes, trials + update.trials)
    return merged


def effective_request_id(request_id: str) -> str:
    """The id a request is claimed under: its own, or a fresh server-made one when empty.

    Made before the first attempt, so a buffered retry of a request whose reply was lost is
    still recognised as the same request.
    """
    return request_id if request_id else f"srv-{uuid.uuid4().hex}"


def clamp_page_size(page_size: int) -> int:
    """0 -> the default page size; otherwise at most MAX_PAGE_SIZE."""
    if page_size < 0:
        raise ValidationError("page_size", f"must be >= 0, got {page_size}")
    return DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)


def encode_page_token(last_task_id: str) -> str:
    """Opaque token: the last task id returned, url-safe base64."""
    return base64.urlsafe_b64encode(last_task_id.encode()).decode("ascii")


def decode_page_token(page_token: str) -> str:
    """The last task id of the previous page ("" for the first page)."""
    if not page_token:
        return ""
    try:
        return base64.urlsafe_b64decode(page_token.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError) as error:
        raise ValidationError("page_token", "is not a token this server issued") from error
