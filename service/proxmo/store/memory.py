"""In-process success-rate store: the embedded default (one process, lost on restart).

Same semantics as ``RedisStore`` (base.py's module docstring). Every method runs without an
``await`` between reading and writing, so each call is atomic under asyncio without a lock
(a lock would only add a scheduling point). Not thread-safe: use it from one event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry

from proxmo.core import history
from proxmo.store.base import (
    DEFAULT_MAX_TASKS,
    DEFAULT_REQUEST_TTL_SECONDS,
    DEFAULT_TTL_SECONDS,
    ApplyResult,
    StoreFull,
    StoreHealth,
    SuccessRateStore,
    TaskRecord,
    TaskUpdate,
    clamp_page_size,
    decode_page_token,
    effective_request_id,
    encode_page_token,
    merge_updates,
    validate_history_params,
    validate_namespace,
)
from proxmo.store.metrics import StoreMetrics


@dataclass
class _Task:
    decayed_successes: float
    decayed_trials: float
    total_successes: int
    total_trials: int
    updates: int
    last_update_unix: float
    expires_at: float  # time.monotonic() deadline


@dataclass(frozen=True)
class _Claim:
    rates: Mapping[str, float]
    expires_at: float


_Expiring = TypeVar("_Expiring", _Task, _Claim)


class MemoryStore(SuccessRateStore):
    """Success-rate history in a dict; ``namespace`` only labels it (one store per process)."""

    name = "memory"

    def __init__(
        self,
        *,
        namespace: str = "proxmo",
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        request_ttl_seconds: float = DEFAULT_REQUEST_TTL_SECONDS,
        default_prior: float = 0.0,
        registry: CollectorRegistry | None = None,
        max_tasks: int = DEFAULT_MAX_TASKS,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        self._max_tasks = max_tasks
        self._ttl = float(ttl_seconds)
        self._request_ttl = float(request_ttl_seconds)
        self._default_prior = default_prior
        # Both dicts are kept in expiry order (a task moves to the end when updated, claims all
        # share one TTL), so purging expired entries pops from the front: O(1) amortized.
        self._tasks: OrderedDict[str, _Task] = OrderedDict()
        self._claims: OrderedDict[str, _Claim] = OrderedDict()
        self._metrics = StoreMetrics(registry)

    async def apply(
        self,
        request_id: str,
        updates: Sequence[TaskUpdate],
        *,
        half_life: float,
        prior: float,
        dry_run: bool,
    ) -> ApplyResult:
        validate_history_params(half_life, prior)
        merged = merge_updates(updates)
        if not merged:
            return ApplyResult(rates={}, replayed=False, degraded=False)
        with self._metrics.timed("apply"):
            now = time.monotonic()
            self._purge(now)
            request_id = effective_request_id(request_id)
            claim = self._claims.get(request_id)
            if claim is not None:
                self._metrics.replay()
                return ApplyResult(rates=dict(claim.rates), replayed=True, degraded=False)

            new = sum(task_id not in self._tasks for task_id in merged)
            if not dry_run and self._max_tasks and new and len(self._tasks) + new > self._max_tasks:
                raise StoreFull.at(len(self._tasks), f"store_max_tasks = {self._max_tasks}")
            rho = history.decay(half_life)
            rates: dict[str, float] = {}
            new_tasks: dict[str, _Task] = {}
            wall_now = time.time()
            for task_id, (successes, trials) in merged.items():
                old = self._tasks.get(task_id)
                previous = (old.decayed_successes, old.decayed_trials) if old else None
                s_new, n_new, rates[task_id] = history.apply_update(
                    previous, successes, trials, rho=rho, prior=prior
                )
                new_tasks[task_id] = _Task(
                    decayed_successes=s_new,
                    decayed_trials=n_new,
                    total_successes=(old.total_successes if old else 0) + successes,
                    total_trials=(old.total_trials if old else 0) + trials,
                    updates=(old.updates if old else 0) + 1,
                    last_update_unix=max(wall_now, old.last_update_unix if old else 0.0),
                    expires_at=now + self._ttl,
                )
            if not dry_run:
                for task_id, task in new_tasks.items():
                    self._tasks[task_id] = task
                    self._tasks.move_to_end(task_id)
                self._claims[request_id] = _Claim(rates, now + self._request_ttl)
            return ApplyResult(rates=rates, replayed=False, degraded=False)

    async def get(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        with self._metrics.timed("get"):
            self._purge(time.monotonic())
            return [
                self._record(task_id, self._tasks[task_id])
                for task_id in dict.fromkeys(task_ids)
                if task_id in self._tasks
            ]

    async def scan(
        self, prefix: str, page_size: int, page_token: str
    ) -> tuple[list[TaskRecord], str]:
        size = clamp_page_size(page_size)
        after = decode_page_token(page_token)
        with self._metrics.timed("scan"):
            self._purge(time.monotonic())
            # O(tasks) per page: fine for the embedded store (Redis pages through an index).
            ids = sorted(t for t in self._tasks if t.startswith(prefix) and t > after)
            page = ids[:size]
            token = encode_page_token(page[-1]) if len(ids) > size else ""
            return [self._record(t, self._tasks[t]) for t in page], token

    async def reset(self, task_ids: Sequence[str] | None) -> int:
        with self._metrics.timed("reset"):
            self._purge(time.monotonic())
            if task_ids is None:
                count = len(self._tasks)
                self._tasks.clear()
                return count
            return sum(self._tasks.pop(t, None) is not None for t in dict.fromkeys(task_ids))

    async def health(self) -> StoreHealth:
        return StoreHealth(
            ok=True, detail=f"memory store, {len(self._tasks)} tasks", buffered_updates=0
        )

    async def close(self) -> None:
        self._tasks.clear()
        self._claims.clear()

    def _record(self, task_id: str, task: _Task) -> TaskRecord:
        return TaskRecord(
            task_id=task_id,
            success_rate=history.success_rate(
                task.decayed_successes, task.decayed_trials, self._default_prior
            ),
            decayed_successes=task.decayed_successes,
            decayed_trials=task.decayed_trials,
            total_successes=task.total_successes,
            total_trials=task.total_trials,
            updates=task.updates,
            last_update_unix=task.last_update_unix,
        )

    def _purge(self, now: float) -> None:
        """Drops expired tasks and request claims (both dicts are in expiry order)."""
        _purge_front(self._tasks, now)
        _purge_front(self._claims, now)


def _purge_front(entries: OrderedDict[str, _Expiring], now: float) -> None:
    """Pops expired entries from the front of a dict kept in expiry order."""
    while entries and next(iter(entries.values())).expires_at <= now:
        entries.popitem(last=False)
