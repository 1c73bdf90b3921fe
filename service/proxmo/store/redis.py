"""Redis success-rate store: shared by every replica, survives restarts, degrades, never fails.

Keys (``ns`` = namespace):
  ``ns:task:<task_id>``  hash S, N, total_successes, total_trials, updates, last_update;
                         sliding TTL (PEXPIRE on each update; Redis 7.0 has no per-field expiry)
  ``ns:tasks``           sorted set of task ids, all score 0: ZRANGEBYLEX pages by prefix in
                         task-id order without SCAN's whole-keyspace walk; entries whose hash
                         expired are trimmed lazily by ``scan``
  ``ns:req:<id>``        the claim of a request id: the JSON p's of its first application

One Lua script applies a whole request in one round trip (EVALSHA; redis-py reloads it on
NOSCRIPT): it reads the claim, and on a replay returns the stored p's without writing; otherwise
it reads each task's history, computes S', N', p in IEEE doubles (same operation order as
``proxmo.core.history.apply_update``, so bit-identical to MemoryStore), writes unless dry-run,
and claims the id (SET NX PX). All keys are in KEYS, cost O(tasks); a script is atomic, so two
trainers never see a torn history and the p's come from the very history they update.

Faults: a connection error or timeout opens a short circuit (``cooldown_s``: later requests skip
Redis instead of each paying the timeout), the update is kept in a bounded FIFO buffer (oldest
dropped and counted when full) and ``apply`` answers ``degraded=True`` (the engine uses BATCH).
A background task replays the buffer, in order, when Redis answers again; every buffered update
keeps its request id, so an update whose reply was lost after Redis applied it is recognised as
a replay and never counted twice. While updates are buffered, a live apply first drains them
(FIFO), so a task's updates reach Redis in the order this process received them: totals are
exact either way (sums commute), and the decayed S, N see the same order as without the outage.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxmo.core import history
from proxmo.errors import NotReady
from proxmo.store.base import (
    DEFAULT_MAX_BUFFERED,
    DEFAULT_REQUEST_TTL_SECONDS,
    DEFAULT_TTL_SECONDS,
    ApplyResult,
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

log = logging.getLogger(__name__)

# KEYS: [1] claim key, [2] index key, [3..] task keys.
# ARGV: [1] rho, [2] prior, [3] dry_run 0/1, [4] now (unix s), [5] task TTL ms,
#       [6] claim TTL ms, then per task: task_id, S_b, N_b.
# Returns {replayed 0/1, JSON [task_id, p, task_id, p, ...]}; p as "%.17g" keeps the float64.
APPLY_SCRIPT = """
local claimed = redis.call('GET', KEYS[1])
if claimed then
  return {1, claimed}
end
local rho = tonumber(ARGV[1])
local prior = tonumber(ARGV[2])
local write = ARGV[3] == '0'
local now = tonumber(ARGV[4])
local out = {}
for i = 3, #KEYS do
  local arg = 7 + (i - 3) * 3
  local task_id = ARGV[arg]
  local old = redis.call('HMGET', KEYS[i], 'S', 'N', 'last_update')
  local s, n, p
  if old[2] then
    -- the same operations as proxmo.core.history.apply_update, so both stores agree bit for bit
    s = rho * tonumber(old[1]) + tonumber(ARGV[arg + 1])
    n = rho * tonumber(old[2]) + tonumber(ARGV[arg + 2])
    p = (s + prior) / (n + 2.0 * prior)
  else
    -- no history: p is the BATCH estimate (ALGORITHM.md)
    s = tonumber(ARGV[arg + 1])
    n = tonumber(ARGV[arg + 2])
    p = s / n
  end
  out[#out + 1] = task_id
  out[#out + 1] = string.format('%.17g', p)
  if write then
    local last = math.max(now, tonumber(old[3]) or 0)
    redis.call('HSET', KEYS[i], 'S', string.format('%.17g', s), 'N', string.format('%.17g', n),
               'last_update', string.format('%.17g', last))
    redis.call('HINCRBY', KEYS[i], 'total_successes', ARGV[arg + 1])
    redis.call('HINCRBY', KEYS[i], 'total_trials', ARGV[arg + 2])
    redis.call('HINCRBY', KEYS[i], 'updates', 1)
    redis.call('PEXPIRE', KEYS[i], ARGV[5])
    redis.call('ZADD', KEYS[2], 0, task_id)
  end
end
local rates = cjson.encode(out)
if write then
  redis.call('SET', KEYS[1], rates, 'NX', 'PX', ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return {0, rates}
"""

# What "Redis is unreachable" looks like: connection errors, timeouts (RedisError covers both,
# and server-side refusals like OOM or LOADING after a restart), and the OS-level errors.
_STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)
_FLUSH_CHUNK = 128  # scripts per pipelined round trip when draining the buffer
_SCAN_COUNT = 1000


class StoreUnavailable(NotReady):
    """Reads and resets need Redis; they answer UNAVAILABLE (gRPC) / 503 (REST) without it."""


@dataclass(frozen=True)
class _Pending:
    """One request's update, as the script needs it; kept in the buffer while Redis is away."""

    seq: int
    request_id: str
    updates: tuple[tuple[str, int, int], ...]  # (task_id, S_b, N_b), one per task
    rho: float
    prior: float
    now_unix: float


class RedisStore(SuccessRateStore):
    """Success-rate history in Redis (redis-py asyncio, pooled, short timeouts)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "proxmo",
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        request_ttl_seconds: float = DEFAULT_REQUEST_TTL_SECONDS,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        timeout_s: float = 0.25,
        default_prior: float = 0.0,
        registry: CollectorRegistry | None = None,
        cooldown_s: float = 1.0,
        flush_interval_s: float = 0.2,
        max_connections: int = 64,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        self._location = _redact(url)
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self._request_ttl_ms = max(1, round(request_ttl_seconds * 1000))
        self._max_buffered = max_buffered
        self._default_prior = default_prior
        self._cooldown_s = cooldown_s
        self._flush_interval_s = flush_interval_s
        # One quick retry on a connection error only: it replaces a pooled connection that a
        # Redis restart killed. Timeouts are not retried (a dead host would cost 2x timeout).
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,  # waiting for a free pooled connection
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
            retry=retry,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._script = self._redis.register_script(APPLY_SCRIPT)
        self._metrics = StoreMetrics(registry)

        self._buffer: deque[_Pending] = deque()
        self._seq = itertools.count()
        self._drain_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._down_until = 0.0  # time.monotonic(); Redis is skipped until then
        self._last_error = ""
        self._closed = False

    # ---- keys ----------------------------------------------------------------------------

    def _task_key(self, task_id: str) -> str:
        return f"{self.namespace}:task:{task_id}"

    def _claim_key(self, request_id: str) -> str:
        return f"{self.namespace}:req:{request_id}"

    @property
    def _index_key(self) -> str:
        return f"{self.namespace}:tasks"

    # ---- SuccessRateStore ------------------------------------------------------------------

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
        pending = _Pending(
            seq=next(self._seq),
            request_id=effective_request_id(request_id),
            updates=tuple((t, s, n) for t, (s, n) in merged.items()),
            rho=history.decay(half_life),
            prior=float(prior),
            now_unix=time.time(),
        )
        with self._metrics.timed("apply"):
            if dry_run:  # never written, never buffered
                if self._circuit_open():
                    return self._degraded()
                try:
                    return self._result(await self._call_script(pending, dry_run=True))
                except _STORE_ERRORS as error:
                    self._mark_down(error)
                    return self._degraded()

            if self._circuit_open():
                return self._buffered(pending)
            # Updates buffered earlier go first, so a task's updates keep their order.
            if self._buffer and not await self._drain():
                return self._buffered(pending)
            try:
                reply = await self._call_script(pending, dry_run=False)
            except _STORE_ERRORS as error:
                # Also when the reply was lost after Redis applied it: the claim makes the
                # buffered retry a no-op replay.
                self._mark_down(error)
                return self._buffered(pending)
            self._mark_up()
            return self._result(reply)

    async def get(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        ids = list(dict.fromkeys(task_ids))
        with self._metrics.timed("get"):
            hashes = await self._read_hashes(ids)
        return [_record(t, h, self._default_prior) for t, h in zip(ids, hashes, strict=True) if h]

    async def scan(
        self, prefix: str, page_size: int, page_token: str
    ) -> tuple[list[TaskRecord], str]:
        size = clamp_page_size(page_size)
        after = decode_page_token(page_token)
        prefix_bytes = prefix.encode()
        # Lexicographic bounds on UTF-8 bytes; 0xFF never occurs in UTF-8, so "[prefix\xff"
        # is above every id that starts with the prefix.
        upper = b"[" + prefix_bytes + b"\xff" if prefix else b"+"
        records: list[TaskRecord] = []
        with self._metrics.timed("scan"):
            while True:
                if after and after >= prefix:
                    lower = b"(" + after.encode()
                else:
                    lower = b"[" + prefix_bytes if prefix else b"-"
                wanted = size - len(records) + 1  # one more than fits tells "there is a next"
                ids = await self._call(
                    self._redis.zrangebylex(self._index_key, lower, upper, start=0, num=wanted)
                )
                hashes = await self._read_hashes(ids)
                expired = [t for t, h in zip(ids, hashes, strict=True) if not h]
                if expired:  # their hashes expired: trim the index lazily
                    await self._call(self._redis.zrem(self._index_key, *expired))
                for task_id, fields in zip(ids, hashes, strict=True):
                    if not fields:
                        continue
                    if len(records) == size:  # one more exists: this page is full
                        return records, encode_page_token(records[-1].task_id)
                    records.append(_record(task_id, fields, self._default_prior))
                if len(ids) < wanted:  # the index has no more ids in range
                    return records, ""
                after = ids[-1]

    async def reset(self, task_ids: Sequence[str] | None) -> int:
        with self._metrics.timed("reset"):
            if task_ids is not None:
                ids = list(dict.fromkeys(task_ids))
                if not ids:
                    return 0
                pipe = self._redis.pipeline(transaction=False)
                for task_id in ids:
                    pipe.delete(self._task_key(task_id))
                pipe.zrem(self._index_key, *ids)
                deleted = await self._call(pipe.execute())
                return int(sum(deleted[:-1]))
            # SCAN, not the index: it also finds hashes the index lost (e.g. an index that
            # expired or was deleted by hand). Namespaces have no glob characters.
            count = 0
            batch: list[str] = []
            async for key in self._redis.scan_iter(
                match=f"{self.namespace}:task:*", count=_SCAN_COUNT
            ):
                batch.append(key)
                if len(batch) >= _SCAN_COUNT:
                    count += await self._call(self._redis.delete(*batch))
                    batch.clear()
            if batch:
                count += await self._call(self._redis.delete(*batch))
            await self._call(self._redis.delete(self._index_key))
            return int(count)

    async def health(self) -> StoreHealth:
        buffered = len(self._buffer)
        if self._circuit_open():
            return StoreHealth(False, self._down_detail(), buffered)
        try:
            await self._call(self._redis.ping())
        except StoreUnavailable:
            return StoreHealth(False, self._down_detail(), buffered)
        if buffered:
            return StoreHealth(
                False, f"redis {self._location} up, flushing {buffered} buffered updates", buffered
            )
        return StoreHealth(True, f"redis {self._location} ok", 0)

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self._buffer:
            await self._drain()
        if self._buffer:
            log.error(
                "success-rate store closing with %d updates not written to redis %s: %s",
                len(self._buffer),
                self._location,
                self._last_error,
            )
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    # ---- extra operations (tests, operators) ---------------------------------------------

    @property
    def buffered_updates(self) -> int:
        """Updates waiting in the buffer for Redis."""
        return len(self._buffer)

    async def flush(self) -> bool:
        """Writes the buffered updates now; True when the buffer is empty afterwards."""
        if not self._buffer:
            return True
        drained = await self._drain()
        if drained:
            self._mark_up()
        return drained

    # ---- internals -------------------------------------------------------------------------

    async def _call_script(self, pending: _Pending, *, dry_run: bool, client: Any = None) -> Any:
        keys = [self._claim_key(pending.request_id), self._index_key]
        args: list[str | int] = [
            repr(pending.rho),
            repr(pending.prior),
            1 if dry_run else 0,
            repr(pending.now_unix),
            self._ttl_ms,
            self._request_ttl_ms,
        ]
        for task_id, successes, trials in pending.updates:
            keys.append(self._task_key(task_id))
            args.extend((task_id, successes, trials))
        return await self._script(keys=keys, args=args, client=client)

    def _result(self, reply: Any) -> ApplyResult:
        replayed = int(reply[0]) == 1
        if replayed:
            self._metrics.replay()
        flat = json.loads(reply[1])
        rates = {flat[i]: float(flat[i + 1]) for i in range(0, len(flat), 2)}
        return ApplyResult(rates=rates, replayed=replayed, degraded=False)

    async def _call(self, awaitable: Any) -> Any:
        """Runs a read/reset command; Redis away -> StoreUnavailable (UNAVAILABLE / 503)."""
        try:
            return await awaitable
        except _STORE_ERRORS as error:
            self._mark_down(error)
            raise StoreUnavailable(f"success-rate store unavailable: {self._down_detail()}") from (
                error
            )

    async def _read_hashes(self, task_ids: Sequence[str]) -> list[dict[str, str]]:
        if not task_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(self._task_key(task_id))
        return list(await self._call(pipe.execute()))

    def _degraded(self) -> ApplyResult:
        self._metrics.fallback()
        return ApplyResult(rates={}, replayed=False, degraded=True)

    def _buffered(self, pending: _Pending) -> ApplyResult:
        """Keeps the update for the flusher (dropping the oldest when full)."""
        if self._max_buffered <= 0:
            self._metrics.dropped()
            log.error("success-rate update %s dropped: buffering disabled", pending.request_id)
        else:
            if len(self._buffer) >= self._max_buffered:
                lost = self._buffer.popleft()
                self._metrics.dropped()
                log.error(
                    "success-rate buffer full (%d): dropped update %s",
                    self._max_buffered,
                    lost.request_id,
                )
            self._buffer.append(pending)
            self._metrics.buffered(len(self._buffer))
            if not self._closed and (self._flusher is None or self._flusher.done()):
                self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        return self._degraded()

    async def _flush_loop(self) -> None:
        """Probes Redis every ``flush_interval_s`` while updates are buffered, and writes them."""
        while self._buffer and not self._closed:
            await asyncio.sleep(self._flush_interval_s)
            await self.flush()

    async def _drain(self) -> bool:
        """Writes the buffer in FIFO order, a pipelined chunk per round trip.

        An entry leaves the buffer only once Redis answered for it; a chunk that failed midway is
        sent again whole, which is safe: entries already applied come back as replays.
        """
        async with self._drain_lock:
            while self._buffer:
                chunk = list(itertools.islice(self._buffer, _FLUSH_CHUNK))
                try:
                    with self._metrics.timed("flush"):
                        pipe = self._redis.pipeline(transaction=False)
                        for pending in chunk:
                            await self._call_script(pending, dry_run=False, client=pipe)
                        replies = await pipe.execute()
                except _STORE_ERRORS as error:
                    self._mark_down(error)
                    return False
                replays = sum(int(reply[0]) == 1 for reply in replies)
                for _ in range(replays):
                    self._metrics.replay()
                # Pop by sequence number: appends (and drops of the oldest) may have happened
                # while the chunk was in flight.
                last_seq = chunk[-1].seq
                written = 0
                while self._buffer and self._buffer[0].seq <= last_seq:
                    self._buffer.popleft()
                    written += 1
                self._metrics.flushed(written)
                self._metrics.buffered(len(self._buffer))
                log.info("flushed %d buffered success-rate updates (%d replays)", written, replays)
            return True

    def _circuit_open(self) -> bool:
        return time.monotonic() < self._down_until

    def _mark_down(self, error: BaseException) -> None:
        if not self._down_until:
            log.warning("success-rate store %s unreachable: %r", self._location, error)
        self._last_error = f"{type(error).__name__}: {error}"
        self._down_until = time.monotonic() + self._cooldown_s
        self._metrics.up(False)

    def _mark_up(self) -> None:
        if self._down_until:
            log.info("success-rate store %s reachable again", self._location)
            self._down_until = 0.0
        self._metrics.up(True)

    def _down_detail(self) -> str:
        return (
            f"redis {self._location} unreachable ({self._last_error}); "
            f"{len(self._buffer)} updates buffered"
        )


def _record(task_id: str, fields: dict[str, str], default_prior: float) -> TaskRecord:
    s, n = float(fields["S"]), float(fields["N"])
    return TaskRecord(
        task_id=task_id,
        success_rate=history.success_rate(s, n, default_prior),
        decayed_successes=s,
        decayed_trials=n,
        total_successes=int(fields["total_successes"]),
        total_trials=int(fields["total_trials"]),
        updates=int(fields["updates"]),
        last_update_unix=float(fields["last_update"]),
    )


def _redact(url: str) -> str:
    """The URL without its password, for logs and health details."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))
