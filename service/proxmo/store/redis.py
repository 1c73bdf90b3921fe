"""Redis success-rate store: shared by every replica, survives restarts, degrades, never fails.
Runs on one Redis, a Sentinel-managed primary, or a Redis Cluster (docs/store.md).

Keys (``ns`` = namespace; on a cluster ``ns:{b}``, b = crc32(task_id) mod CLUSTER_BUCKETS, so
that every key of one bucket shares a hash slot):
  ``ns:task:<task_id>``  hash S, N, total_successes, total_trials, updates, last_update;
                         sliding TTL (PEXPIRE on each update; Redis 7.0 has no per-field expiry)
  ``ns:tasks``           sorted set of task ids, all score 0: ZRANGEBYLEX pages by prefix in
                         task-id order without SCAN's whole-keyspace walk; entries whose hash
                         expired are trimmed lazily by ``scan``
  ``ns:tasks:expiry``    sorted set of task ids by expiry time: counts stored tasks for the cap
  ``ns:req:<id>``        the claim of a request id: the JSON S', N' of its first application

One Lua script call per key group (the whole request on one Redis; one per bucket on a cluster)
in one round trip (EVALSHA; redis-py reloads it on NOSCRIPT): it reads the group's claim, and on
a replay returns the stored S', N' without writing; otherwise it reads each task's history,
checks the stored-task cap, decays S, N in IEEE doubles (same operation order as
``proxmo.core.history.apply_update``; p comes from ``history.success_rate`` in Python, so
bit-identical to MemoryStore), writes unless dry-run, and claims the id in the group (SET NX PX).
All keys are in KEYS, cost O(tasks); a script is atomic, so two trainers never see a torn history
and the p's come from the very history they update. Claims per group keep a request that spans
several slots exactly-once per task update, whichever of its groups a failure interrupted.

Faults: an outage (connection error, a timeout Redis's PING confirms, a store-wide refusal such as
LOADING or READONLY; not one request's own failure) opens a short circuit (``cooldown_s``: later
requests skip Redis instead of each paying the timeout), the update is kept in a bounded FIFO
buffer (oldest dropped and counted when full) and ``apply`` answers ``degraded=True`` (the engine
uses BATCH).
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
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxmo.core import history
from proxmo.core.batch import ECHO_CHARS, cut
from proxmo.errors import NotReady
from proxmo.secrets import mask_url
from proxmo.store.base import (
    DEFAULT_MAX_BUFFERED,
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

log = logging.getLogger(__name__)

# One script per key group (the whole request on a standalone Redis or Sentinel; one bucket of
# its tasks on a Redis Cluster, see ``_groups``): every key of one call shares a hash slot.
# KEYS: [1] claim key, [2] index key, [3] expiry index key, [4..] task keys.
# ARGV: [1] rho, [2] mode 0 write / 1 dry-run / 2 capacity check only, [3] now (unix s),
#       [4] task TTL ms, [5] claim TTL ms, [6] max tasks in this group's index (0: no cap),
#       [7] 1: touch the claim on a replay (a write for WAIT to wait on),
#       then per task: task_id, S_b, N_b.
# Returns {0 applied | 1 replayed | 2 over capacity, JSON [task_id, S', N', ...] | stored count}.
# The script only decays (S' = rho S + S_b, N' = rho N + N_b, S = N = 0 without history); p comes
# from proxmo.core.history in Python. Numbers as "%.17g" keep the float64.
APPLY_SCRIPT = """
local claimed = redis.call('GET', KEYS[1])
if claimed then
  if ARGV[7] == '1' and ARGV[2] == '0' then
    redis.call('PEXPIRE', KEYS[1], ARGV[5])
  end
  return {1, claimed}
end
local mode = ARGV[2]
local write = mode == '0'
local now = tonumber(ARGV[3])
local cap = tonumber(ARGV[6])
local olds = {}
local new_tasks = 0
for i = 4, #KEYS do
  olds[i] = redis.call('HMGET', KEYS[i], 'S', 'N', 'last_update')
  if not olds[i][2] then
    new_tasks = new_tasks + 1
  end
end
if cap > 0 and new_tasks > 0 then
  -- forget index entries whose task expired (a bounded number per call), then count
  local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now * 1000, 'LIMIT', 0, 128)
  if #gone > 0 then
    redis.call('ZREM', KEYS[3], unpack(gone))
    redis.call('ZREM', KEYS[2], unpack(gone))
  end
  local stored = redis.call('ZCARD', KEYS[3])
  if stored + new_tasks > cap then
    return {2, tostring(stored)}
  end
end
if mode == '2' then
  return {0, '[]'}
end
local rho = tonumber(ARGV[1])
local expires = string.format('%.17g', now * 1000 + tonumber(ARGV[4]))
local out = {}
for i = 4, #KEYS do
  local arg = 8 + (i - 4) * 3
  local task_id = ARGV[arg]
  local old = olds[i]
  -- the same operations as proxmo.core.history.apply_update, so both stores agree bit for bit
  local s = string.format('%.17g', rho * (tonumber(old[1]) or 0) + tonumber(ARGV[arg + 1]))
  local n = string.format('%.17g', rho * (tonumber(old[2]) or 0) + tonumber(ARGV[arg + 2]))
  out[#out + 1] = task_id
  out[#out + 1] = s
  out[#out + 1] = n
  if write then
    local last = math.max(now, tonumber(old[3]) or 0)
    redis.call('HSET', KEYS[i], 'S', s, 'N', n, 'last_update', string.format('%.17g', last))
    redis.call('HINCRBY', KEYS[i], 'total_successes', ARGV[arg + 1])
    redis.call('HINCRBY', KEYS[i], 'total_trials', ARGV[arg + 2])
    redis.call('HINCRBY', KEYS[i], 'updates', 1)
    redis.call('PEXPIRE', KEYS[i], ARGV[4])
    redis.call('ZADD', KEYS[2], 0, task_id)
    redis.call('ZADD', KEYS[3], expires, task_id)
  end
end
-- an object {v = 2, r = [task_id, S', N', ...]}: claims written by earlier versions are plain
-- arrays [task_id, p, ...], and a rolling upgrade must still read them as replays
local rates = cjson.encode({v = 2, r = out})
if write then
  redis.call('SET', KEYS[1], rates, 'NX', 'PX', ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
return {0, rates}
"""

def _claimed_rates(claim: Any, prior: float) -> dict[str, float]:
    """p per task from a script reply or a stored claim.

    Current claims are ``{"v": 2, "r": [task_id, S', N', ...]}`` (p from
    ``proxmo.core.history``); claims written before version 2 are ``[task_id, p, ...]`` and
    still count as replays during a rolling upgrade (their p is reported as stored).
    """
    if isinstance(claim, dict):
        flat = claim.get("r") or []  # cjson writes an empty array as {}
        return {
            flat[i]: history.success_rate(float(flat[i + 1]), float(flat[i + 2]), prior)
            for i in range(0, len(flat), 3)
        }
    return {claim[i]: float(claim[i + 1]) for i in range(0, len(claim), 2)}


# What can go wrong talking to Redis: connection errors, timeouts, server-side refusals (RedisError
# covers them), and OS-level errors. ``_is_outage`` tells a store-wide outage (circuit opens,
# updates are buffered) from a failure of one request's own call (that request only).
_STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)
# Server replies that mean "the store cannot take writes now" rather than "this call is bad".
_OUTAGE_REPLY_ERRORS: tuple[type[BaseException], ...] = (
    BusyLoadingError,
    ReadOnlyError,
    ClusterDownError,
    TryAgainError,
    MasterDownError,
    OutOfMemoryError,
)
_OUTAGE_REPLY_PREFIXES = ("BUSY", "NOREPLICAS", "MISCONF", "CLUSTERDOWN", "MASTERDOWN", "LOADING",
                          "READONLY", "OOM", "TRYAGAIN")
_FLUSH_CHUNK = 128  # scripts per pipelined round trip when draining the buffer
_SCAN_COUNT = 1000
_ERROR_CHARS = 200  # of a Redis error's text in logs and in the store's health detail
# On a Redis Cluster, tasks are spread over this many hash-tagged buckets (``<ns>:{<b>}:...``);
# every key of one bucket shares a hash slot. Changing it relocates every key.
CLUSTER_BUCKETS = 64
# A call's deadline grows with its work: ``timeout_s`` + per task + per byte of ids sent. Measured
# end to end (client encoding, loopback Redis 7.0, script, reply) on a 2-vCPU machine under heavy
# load (docs/store.md): ~170 us per task and ~130 ns per byte; these allow about 2x that, so
# only a Redis that stopped answering runs out of time.
_SECONDS_PER_TASK = 350e-6
_SECONDS_PER_BYTE = 250e-9
_SECONDS_PER_CALL = 5e-3  # each script call of a request (cluster: one per bucket) costs the client
# The sockets' own timeout is only a backstop: every call runs under its own scaled deadline.
_SOCKET_TIMEOUT_S = 60.0

_WRITE, _DRY_RUN, _CHECK = 0, 1, 2  # the script's modes


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


_Group = tuple[int | None, tuple[tuple[str, int, int], ...]]  # (bucket, its tasks' updates)


class RedisStore(SuccessRateStore):
    """Success-rate history in Redis: standalone, Sentinel-managed or Cluster (redis-py asyncio)."""

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
        cluster: bool = False,
        sentinels: Sequence[str] = (),
        sentinel_master: str = "",
        wait_replicas: int = 0,
        wait_timeout_s: float = 1.0,
        max_tasks: int = DEFAULT_MAX_TASKS,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        if cluster and sentinels:
            raise ValueError("redis cluster and sentinels exclude each other")
        if cluster and wait_replicas:
            raise ValueError("wait_replicas needs a standalone or Sentinel-managed Redis")
        self._cluster = cluster
        self._location = (
            f"sentinel {','.join(sentinels)} master {sentinel_master}" if sentinels
            else ("cluster " if cluster else "") + mask_url(url)
        )
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self._request_ttl_ms = max(1, round(request_ttl_seconds * 1000))
        self._max_buffered = max_buffered
        self._default_prior = default_prior
        self._timeout_s = timeout_s
        self._cooldown_s = cooldown_s
        self._flush_interval_s = flush_interval_s
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = max(1, round(wait_timeout_s * 1000))
        self._max_tasks = max_tasks
        # The cap is kept per key group: the whole namespace, or each cluster bucket's share.
        self._group_cap = -(-max_tasks // CLUSTER_BUCKETS) if cluster and max_tasks else max_tasks
        self._redis: Any = _connect(
            url, cluster=cluster, sentinels=sentinels, sentinel_master=sentinel_master,
            timeout_s=timeout_s, max_connections=max_connections,
        )
        self._script = self._redis.register_script(APPLY_SCRIPT)
        self._metrics = StoreMetrics(registry)

        self._buffer: deque[_Pending] = deque()
        self._seq = itertools.count()
        self._drain_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._down_until = 0.0  # time.monotonic(); Redis is skipped until then
        self._last_error = ""
        self._closed = False
        self._cluster_loaded = False

    # ---- keys ----------------------------------------------------------------------------

    def _bucket(self, task_id: str) -> int | None:
        """The cluster bucket of a task (None on a standalone Redis: one key group)."""
        if not self._cluster:
            return None
        return zlib.crc32(task_id.encode("utf-8", "surrogatepass")) % CLUSTER_BUCKETS

    def _buckets(self) -> list[int | None]:
        return list(range(CLUSTER_BUCKETS)) if self._cluster else [None]

    def _prefix(self, bucket: int | None) -> str:
        """``ns`` or, on a cluster, ``ns:{b}``: the braces make Redis hash only ``b``."""
        return self.namespace if bucket is None else f"{self.namespace}:{{{bucket}}}"

    def _task_key(self, task_id: str) -> str:
        return f"{self._prefix(self._bucket(task_id))}:task:{task_id}"

    def _index_key(self, bucket: int | None) -> str:
        return f"{self._prefix(bucket)}:tasks"

    def _expiry_key(self, bucket: int | None) -> str:
        return f"{self._prefix(bucket)}:tasks:expiry"

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
                    return self._result(
                        await self._run_groups(pending, mode=_DRY_RUN, cap=0), pending.prior
                    )
                except _STORE_ERRORS as error:
                    if await self._is_outage(error):
                        self._mark_down(error)
                    return self._degraded()

            if self._circuit_open():
                return self._buffered(pending)
            # Updates buffered earlier go first, so a task's updates keep their order.
            if self._buffer and not await self._drain():
                return self._buffered(pending)
            try:
                replies = await self._apply_live(pending)
            except _STORE_ERRORS as error:
                return await self._failed(pending, error)
            self._mark_up()
            return self._result(replies, pending.prior)

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
        buckets = self._buckets()
        with self._metrics.timed("scan"):
            while True:
                if after and after >= prefix:
                    lower = b"(" + after.encode()
                else:
                    lower = b"[" + prefix_bytes if prefix else b"-"
                wanted = size - len(records) + 1  # one more than fits tells "there is a next"
                # Every bucket's index is ordered; the page is the smallest ids of their union.
                pipe = self._redis.pipeline(transaction=False)
                for bucket in buckets:
                    pipe.zrangebylex(self._index_key(bucket), lower, upper, start=0, num=wanted)
                per_bucket: list[list[str]] = await self._call(pipe.execute())
                candidates = sorted(itertools.chain.from_iterable(per_bucket))
                ids = candidates[:wanted]
                exhausted = len(candidates) <= wanted and all(
                    len(found) < wanted for found in per_bucket
                )
                hashes = await self._read_hashes(ids)
                expired = [t for t, h in zip(ids, hashes, strict=True) if not h]
                if expired:  # their hashes expired: trim the index lazily
                    await self._forget(expired)
                for task_id, fields in zip(ids, hashes, strict=True):
                    if not fields:
                        continue
                    if len(records) == size:  # one more exists: this page is full
                        return records, encode_page_token(records[-1].task_id)
                    records.append(_record(task_id, fields, self._default_prior))
                if exhausted:  # the indexes have no more ids in range
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
                deleted = await self._call(pipe.execute())
                await self._forget(ids)
                return int(sum(deleted))
            # SCAN, not the index: it also finds hashes the index lost (e.g. an index that
            # expired or was deleted by hand). Namespaces have no glob characters; on a cluster
            # redis-py scans every primary.
            pattern = f"{self.namespace}:{{*}}:task:*" if self._cluster else \
                f"{self.namespace}:task:*"
            count = 0
            batch: list[str] = []
            try:
                async for key in self._redis.scan_iter(match=pattern, count=_SCAN_COUNT):
                    batch.append(key)
                    if len(batch) >= _SCAN_COUNT:
                        count += await self._delete(batch)
                        batch.clear()
            except _STORE_ERRORS as error:
                raise await self._unavailable(error) from error
            if batch:
                count += await self._delete(batch)
            await self._delete(
                [key for b in self._buckets() for key in (self._index_key(b), self._expiry_key(b))]
            )
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
        if not self._cluster:
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

    def _groups(self, pending: _Pending) -> list[_Group]:
        """The request's updates by key group: one group on a standalone Redis, one per bucket
        on a cluster. Each group is one script call with its own request-id claim
        (``<prefix>:req:<id>``), so a task's update is claimed exactly once wherever the
        request's other groups stand (applied, failed, replayed)."""
        groups: dict[int | None, list[tuple[str, int, int]]] = {}
        for update in pending.updates:
            groups.setdefault(self._bucket(update[0]), []).append(update)
        return [(bucket, tuple(updates)) for bucket, updates in groups.items()]

    def _budget(self, pending: _Pending, calls: int = 1) -> float:
        """Seconds the ``calls`` script calls applying ``pending`` may take together: scaled to
        its tasks, bytes and calls."""
        sent = sum(len(t) + 24 for t, _, _ in pending.updates) * 2 + len(pending.request_id)
        return (self._timeout_s + len(pending.updates) * _SECONDS_PER_TASK
                + sent * _SECONDS_PER_BYTE + calls * _SECONDS_PER_CALL)

    def _script_call(self, pending: _Pending, group: _Group, *, mode: int, cap: int,
                     client: Any) -> Any:
        bucket, updates = group
        prefix = self._prefix(bucket)
        keys = [f"{prefix}:req:{pending.request_id}", self._index_key(bucket),
                self._expiry_key(bucket)]
        args: list[str | int] = [
            repr(pending.rho),
            mode,
            repr(pending.now_unix),
            self._ttl_ms,
            self._request_ttl_ms,
            cap,
            1 if self._wait_replicas else 0,
        ]
        for task_id, successes, trials in updates:
            keys.append(f"{prefix}:task:{task_id}")
            args.extend((task_id, successes, trials))
        return self._script(keys=keys, args=args, client=client)

    async def _apply_live(self, pending: _Pending) -> list[Any]:
        """Applies one request; raises StoreFull (nothing written) when its new tasks would pass
        the cap. A request spanning several cluster buckets is checked in every bucket first, so
        a full bucket never leaves the request half applied."""
        cap = self._group_cap
        groups = self._groups(pending)
        if cap and len(groups) > 1:
            self._raise_if_full(await self._run_groups(pending, mode=_CHECK, cap=cap))
            cap = 0  # checked; concurrent requests may pass it by their own new tasks at most
        replies = await self._run_groups(pending, mode=_WRITE, cap=cap, groups=groups)
        self._raise_if_full(replies)
        return replies

    async def _run_groups(self, pending: _Pending, *, mode: int, cap: int,
                          groups: list[_Group] | None = None) -> list[Any]:
        """One script call per key group, under the request's scaled deadline. With
        ``wait_replicas``, a write is answered only after WAIT saw that many replicas take it."""
        groups = self._groups(pending) if groups is None else groups
        budget = self._budget(pending, len(groups))
        if self._cluster:  # groups on several nodes: concurrently, each its own connection
            await self._load_cluster()
            calls = [self._script_call(pending, g, mode=mode, cap=cap, client=None)
                     for g in groups]
            outcomes = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), budget
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            return list(outcomes)
        if mode != _WRITE or not self._wait_replicas:
            return [await asyncio.wait_for(
                self._script_call(pending, groups[0], mode=mode, cap=cap, client=None), budget
            )]
        pipe = self._redis.pipeline(transaction=False)
        await self._script_call(pending, groups[0], mode=mode, cap=cap, client=pipe)
        pipe.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms)
        reply, acknowledged = await asyncio.wait_for(
            pipe.execute(), budget + self._wait_timeout_ms / 1000
        )
        self._check_replicas(int(acknowledged))
        return [reply]

    async def _load_cluster(self) -> None:
        """Once: learns the cluster's slots and loads the script on every primary (a cold start
        costs several round trips, more than one call's budget). A primary promoted later
        answers NOSCRIPT once; redis-py then loads the script everywhere and retries."""
        if self._cluster_loaded:
            return
        await asyncio.wait_for(self._redis.initialize(), self._timeout_s * 8)
        await asyncio.wait_for(self._redis.script_load(APPLY_SCRIPT), self._timeout_s * 8)
        self._cluster_loaded = True

    def _check_replicas(self, acknowledged: int) -> None:
        if acknowledged < self._wait_replicas:
            # Applied on the primary, not yet on enough replicas: not acknowledged. The update
            # stays buffered; its retry is a replay that waits again.
            raise NotEnoughReplicas(
                f"NOREPLICAS {acknowledged} of {self._wait_replicas} replicas acknowledged "
                f"within {self._wait_timeout_ms} ms"
            )

    def _raise_if_full(self, replies: list[Any]) -> None:
        for reply in replies:
            if int(reply[0]) == 2:
                per = " per key bucket of a Redis Cluster" if self._cluster else ""
                raise StoreFull.at(reply[1], f"{self._group_cap}{per}; store_max_tasks = "
                                   f"{self._max_tasks}")

    def _result(self, replies: list[Any], prior: float) -> ApplyResult:
        """Merges the groups' replies (S', N' per task; p from ``proxmo.core.history``);
        replayed only when every group was a replay."""
        rates: dict[str, float] = {}
        for reply in replies:
            rates.update(_claimed_rates(json.loads(reply[1]), prior))
        replayed = all(int(reply[0]) == 1 for reply in replies)
        if replayed:
            self._metrics.replay()
        return ApplyResult(rates=rates, replayed=replayed, degraded=False)

    async def _failed(self, pending: _Pending, error: BaseException) -> ApplyResult:
        """A live apply failed: an outage buffers it and opens the circuit; one request's own
        failure stays that request's (the store stays up for everybody else)."""
        if await self._is_outage(error):
            # Also when the reply was lost after Redis applied it: the claim makes the buffered
            # retry a no-op replay.
            self._mark_down(error)
            return self._buffered(pending)
        if _is_timeout(error):
            # Redis answers, this call was slow: a script that reached Redis runs to completion,
            # so the buffered retry is a cheap claim hit. The circuit stays closed.
            log.warning("success-rate update %s timed out on a live redis; retried from the "
                        "buffer", cut(pending.request_id, ECHO_CHARS))
            return self._buffered(pending)
        # A reply error of this call only (nothing store-wide): its retry would fail the same.
        self._metrics.dropped()
        log.error("success-rate update %s refused by redis, not stored: %s",
                  cut(pending.request_id, ECHO_CHARS), cut(str(error), _ERROR_CHARS))
        return self._degraded()

    async def _is_outage(self, error: BaseException) -> bool:
        """Connection errors and store-wide refusals are outages; a timeout is one only when
        Redis does not answer a PING either; any other reply error is the call's own."""
        if isinstance(error, NotEnoughReplicas):
            return True
        if _is_timeout(error):
            try:
                await asyncio.wait_for(self._redis.ping(), self._timeout_s)
            except _STORE_ERRORS:
                return True
            return False
        if isinstance(error, ResponseError):
            return isinstance(error, _OUTAGE_REPLY_ERRORS) or str(error).startswith(
                _OUTAGE_REPLY_PREFIXES
            )
        return True

    async def _call(self, awaitable: Any) -> Any:
        """Runs a read/reset command; Redis away -> StoreUnavailable (UNAVAILABLE / 503)."""
        try:
            return await asyncio.wait_for(awaitable, self._timeout_s * 4)
        except _STORE_ERRORS as error:
            raise await self._unavailable(error) from error

    async def _unavailable(self, error: BaseException) -> StoreUnavailable:
        if await self._is_outage(error):
            self._mark_down(error)
        return StoreUnavailable(f"success-rate store unavailable: {self._down_detail()}")

    async def _delete(self, keys: list[str]) -> int:
        return int(await self._call(self._redis.delete(*keys))) if keys else 0

    async def _forget(self, task_ids: Sequence[str]) -> None:
        """Removes task ids from their buckets' indexes."""
        by_bucket: dict[int | None, list[str]] = {}
        for task_id in task_ids:
            by_bucket.setdefault(self._bucket(task_id), []).append(task_id)
        pipe = self._redis.pipeline(transaction=False)
        for bucket, ids in by_bucket.items():
            pipe.zrem(self._index_key(bucket), *ids)
            pipe.zrem(self._expiry_key(bucket), *ids)
        await self._call(pipe.execute())

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
        """Writes the buffer in FIFO order.

        An entry leaves the buffer only once Redis answered for it; a chunk that failed midway is
        sent again whole, which is safe: entries already applied come back as replays. Replays
        skip the stored-task cap (the buffer's size bounds what it can add). A standalone Redis
        takes a pipelined chunk per round trip; a cluster takes one request at a time (its groups
        concurrently), so a task's updates still arrive in order.
        """
        async with self._drain_lock:
            while self._buffer:
                chunk = list(itertools.islice(self._buffer, 1 if self._cluster else _FLUSH_CHUNK))
                try:
                    with self._metrics.timed("flush"):
                        replies = await self._replay_chunk(chunk)
                except _STORE_ERRORS as error:
                    if await self._is_outage(error):
                        self._mark_down(error)
                    return False
                written = 0
                replays = 0
                for pending, reply in zip(chunk, replies, strict=True):
                    if isinstance(reply, BaseException):  # this entry's own refusal
                        self._metrics.dropped()
                        log.error("buffered success-rate update %s refused by redis, not stored:"
                                  " %s", cut(pending.request_id, ECHO_CHARS),
                                  cut(str(reply), _ERROR_CHARS))
                    elif all(int(group[0]) == 1 for group in reply):
                        replays += 1
                        self._metrics.replay()
                # Pop by sequence number: appends (and drops of the oldest) may have happened
                # while the chunk was in flight.
                last_seq = chunk[-1].seq
                while self._buffer and self._buffer[0].seq <= last_seq:
                    self._buffer.popleft()
                    written += 1
                self._metrics.flushed(written)
                self._metrics.buffered(len(self._buffer))
                log.info("flushed %d buffered success-rate updates (%d replays)", written, replays)
            return True

    async def _replay_chunk(self, chunk: list[_Pending]) -> list[Any]:
        """Per entry: its groups' replies, or the reply error of that entry alone. Outages raise."""
        if self._cluster:
            try:
                return [await self._run_groups(chunk[0], mode=_WRITE, cap=0)]
            except ResponseError as error:
                if await self._is_outage(error):
                    raise
                return [error]
        pipe = self._redis.pipeline(transaction=False)
        for pending in chunk:
            await self._script_call(pending, self._groups(pending)[0], mode=_WRITE, cap=0,
                                    client=pipe)
        if self._wait_replicas:
            pipe.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms)
        budget = sum(self._budget(p) for p in chunk) + self._wait_timeout_ms / 1000
        replies = await asyncio.wait_for(pipe.execute(raise_on_error=False), budget)
        if self._wait_replicas:
            acknowledged = replies.pop()
            if isinstance(acknowledged, BaseException):
                raise acknowledged
            self._check_replicas(int(acknowledged))
        out: list[Any] = []
        for reply in replies:
            if isinstance(reply, BaseException):
                if await self._is_outage(reply):
                    raise reply
                out.append(reply)
            else:
                out.append([reply])
        return out

    def _circuit_open(self) -> bool:
        return time.monotonic() < self._down_until

    def _mark_down(self, error: BaseException) -> None:
        if not self._down_until:
            log.warning("success-rate store %s unreachable: %r", self._location, error)
        self._last_error = f"{type(error).__name__}: {cut(str(error), _ERROR_CHARS)}"
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


class NotEnoughReplicas(RedisError):
    """WAIT saw fewer replicas than ``wait_replicas`` take a write: not acknowledged."""


def _is_timeout(error: BaseException) -> bool:
    return isinstance(error, (asyncio.TimeoutError, RedisTimeoutError))


def _connect(url: str, *, cluster: bool, sentinels: Sequence[str], sentinel_master: str,
             timeout_s: float, max_connections: int) -> Any:
    """The redis-py client: a cluster client, a Sentinel-managed primary, or one server.

    Socket timeouts are a backstop only; each call runs under its own scaled deadline. One quick
    retry on a connection error replaces a pooled connection that a restart killed.
    """
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    common: dict[str, Any] = {
        "socket_timeout": _SOCKET_TIMEOUT_S,
        "socket_connect_timeout": timeout_s,
        "decode_responses": True,
    }
    if cluster:
        return aioredis.RedisCluster.from_url(url, max_connections=max_connections, **common)
    if sentinels:
        parts = urlsplit(url) if url else None
        if parts is not None:
            common.update(username=parts.username, password=parts.password,
                          db=int(parts.path.strip("/") or 0))
        addresses = [_host_port(address) for address in sentinels]
        sentinel = Sentinel(addresses, sentinel_kwargs={  # type: ignore[no-untyped-call]
            "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
        })
        return sentinel.master_for(sentinel_master, retry=retry, **common)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,  # waiting for a free pooled connection
        retry=retry,
        **common,
    )
    return aioredis.Redis(connection_pool=pool)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"sentinel address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


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
