"""What both front doors share: the Engine, the store, readiness, admission, metrics, logs.

The gRPC servicer and the REST app only translate their transport to and from the methods
here, so that a request means the same thing, is admitted the same way and is logged and
counted the same way on either door. Nothing is computed here: ``compute`` hands the request
to ``Engine.compute``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import proxmo
from proxmo.core.config import Similarity
from proxmo.engine import Engine, check_ids, field_errors
from proxmo.errors import DeadlineExceeded, InvalidArgument, LimitExceeded, NotReady
from proxmo.limits import Limits
from proxmo.proto import pb
from proxmo.secrets import mask_urls
from proxmo.server.admission import Admission, Lifecycle
from proxmo.server.config import Settings
from proxmo.server.metrics import ServerMetrics
from proxmo.server.status import ErrorStatus
from proxmo.store.base import SuccessRateStore, TaskRecord

log = logging.getLogger("proxmo.server")

_ENUM_SIMILARITY = {
    Similarity.TFIDF: pb.SIMILARITY_TFIDF,
    Similarity.ENCODER: pb.SIMILARITY_ENCODER,
    Similarity.EXACT: pb.SIMILARITY_EXACT,
    Similarity.PRECOMPUTED: pb.SIMILARITY_PRECOMPUTED,
}


class EmbedderInfo(Protocol):
    """What the server reads from ``proxmo.encoder.Embedder``."""

    def info(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Check:
    """One line of ``/readyz?verbose``."""

    name: str
    ok: bool          # False makes the server not ready
    status: str       # "ok", "degraded", "failed", "disabled", "starting", "draining"
    detail: str


def new_request_id() -> str:
    """An id for logs and error messages of a request that came without one."""
    return f"srv-{uuid.uuid4().hex}"


class Runtime:
    """The shared request path. One per process, built by ``proxmo.server.app.build``."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: SuccessRateStore,
        metrics: ServerMetrics,
        git_sha: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.git_sha = git_sha
        self.lifecycle = Lifecycle()
        self.admission = Admission(settings.max_concurrency, metrics.inflight)
        # Attached once the encoder has loaded (seconds on CPU, minutes for a first TensorRT
        # build): the ports, /livez and health answer meanwhile.
        self._engine: Engine | None = None
        self.embedder: EmbedderInfo | None = None
        self._active_calls = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def request_id_of(self, request: pb.ComputeAdvantagesRequest) -> str:
        """The id a request is logged and answered under: its own, cut to ``max_id_chars``
        (a longer one is refused by the limits, and must not fill the error's metadata), or
        a new one."""
        return request.request_id[:self.settings.limits.max_id_chars] or new_request_id()

    def attach(self, engine: Engine, embedder: EmbedderInfo | None) -> None:
        self._engine = engine
        self.embedder = embedder

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise NotReady("server is starting (loading the encoder), retry shortly")
        return self._engine

    # --- calls in progress (what a drain waits for) ----------------------------------------

    @contextmanager
    def call(self) -> Iterator[None]:
        """Marks one service call (unary, stream or REST) in progress."""
        self._active_calls += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active_calls -= 1
            if self._active_calls == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no service call is in progress; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- computing ------------------------------------------------------------------------

    async def compute(
        self,
        request: pb.ComputeAdvantagesRequest,
        *,
        deadline: float | None,
        received_at: float,
        wait_for_slot: bool,
    ) -> pb.ComputeAdvantagesResponse:
        """Ready check, admission (refuse at once, or wait when ``wait_for_slot``), deadline
        check, then ``Engine.compute``. ``deadline``/``received_at`` are time.monotonic()."""
        self.lifecycle.check_ready()
        slot = self.admission.waiting_slot() if wait_for_slot else self.admission.unary_slot()
        async with slot:
            # Checked again after a possible wait: a stream may have waited past its deadline.
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline exceeded before the work started; nothing done")
            return await self.engine.compute(request, deadline=deadline, received_at=received_at)

    async def prefetch_states(
        self, request: pb.PrefetchStatesRequest
    ) -> pb.PrefetchStatesResponse:
        """Ready check, then ``Engine.prefetch_states``. No admission slot: it queues work that
        runs only while no computation waits, and the queue is bounded."""
        self.lifecycle.check_ready()
        return await self.engine.prefetch_states(request)

    # --- success rates --------------------------------------------------------------------

    async def success_rates(self, request: pb.GetSuccessRatesRequest) -> pb.GetSuccessRatesResponse:
        """By task ids (unknown ones left out) or one page by prefix."""
        self._check_task_ids(request.task_ids)
        check_ids("prefix", request.prefix, self.engine.limits)
        # A page token is a task id in base64 (up to 4 UTF-8 bytes a character).
        if len(request.page_token) > 8 * self.settings.limits.max_id_chars:
            raise LimitExceeded("page_token", "is not a token this server issued (too long)")
        with field_errors():
            if request.task_ids:
                records = await self.store.get(list(request.task_ids))
                next_token = ""
            else:
                records, next_token = await self.store.scan(
                    request.prefix, request.page_size, request.page_token
                )
        return pb.GetSuccessRatesResponse(
            tasks=[task_to_proto(r) for r in records], next_page_token=next_token
        )

    async def reset_success_rates(
        self, request: pb.ResetSuccessRatesRequest
    ) -> pb.ResetSuccessRatesResponse:
        """Deletes the named tasks, or (``all_tasks``) every task of this namespace."""
        if request.all_tasks and request.task_ids:
            raise InvalidArgument("all_tasks", "exclusive with task_ids: give one or the other")
        if not request.all_tasks and not request.task_ids:
            raise InvalidArgument("task_ids", "give the task ids to reset, or set all_tasks")
        self._check_task_ids(request.task_ids)
        for i, task_id in enumerate(request.task_ids):
            if not task_id:
                raise InvalidArgument(f"task_ids[{i}]", "must not be empty")
        targets: Sequence[str] | None = None if request.all_tasks else list(request.task_ids)
        with field_errors():
            deleted = await self.store.reset(targets)
        log.info("success rates reset", extra={"tasks": "all" if targets is None
                                                else len(targets), "deleted": deleted})
        return pb.ResetSuccessRatesResponse(deleted=deleted)

    def _check_task_ids(self, task_ids: Sequence[str]) -> None:
        """At most ``max_tasks_per_request`` ids, each within ``max_id_chars``."""
        limits = self.engine.limits
        if len(task_ids) > limits.max_tasks_per_request:
            raise LimitExceeded("task_ids", f"{len(task_ids)} task ids exceed the limit of "
                                f"{limits.max_tasks_per_request}")
        for i, task_id in enumerate(task_ids):
            check_ids(f"task_ids[{i}]", task_id, limits)

    # --- description and readiness --------------------------------------------------------

    def server_info(self) -> pb.GetServerInfoResponse:
        similarities = [pb.SIMILARITY_TFIDF, pb.SIMILARITY_EXACT, pb.SIMILARITY_PRECOMPUTED]
        if self.embedder is not None:
            similarities.insert(1, pb.SIMILARITY_ENCODER)
        return pb.GetServerInfoResponse(
            version=proxmo.__version__,
            git_sha=self.git_sha,
            default_preset="proxmo",
            presets=self.engine.server_presets(),
            default_similarity=_ENUM_SIMILARITY[self.engine.default_similarity],
            similarities=similarities,
            encoder=self.encoder_info(),
            limits=limits_to_proto(self.settings.limits,
                                   max_concurrency=self.settings.max_concurrency),
            success_rate_store=self.store.name,
            success_rate_namespace=self.store.namespace,
        )

    def encoder_info(self) -> pb.EncoderInfo:
        if self.embedder is None:
            return pb.EncoderInfo(backend="none")
        info = self.embedder.info()
        return pb.EncoderInfo(
            model_id=str(info.get("model_id", "")),
            model_sha256=str(info.get("model_sha256", "")),
            backend=str(info.get("backend", "")),
            device=str(info.get("device", "")),
            dtype=str(info.get("dtype", "")),
            dimension=int(info.get("dimension", 0)),
            fallback_reasons=[str(r) for r in info.get("fallback_reasons", [])],
            ready=bool(info.get("ready", False)),
            states_per_second=float(info.get("texts_per_second", 0.0)),
        )

    async def checks(self) -> list[Check]:
        """Readiness checks. The store being down is shown as degraded but keeps the server
        ready: HISTORY then falls back to the batch estimate (fail-open, visibly)."""
        phase = self.lifecycle.phase.value
        checks = [Check("server", self.lifecycle.ready, phase, f"phase {phase}")]
        if self._engine is None:
            checks.append(Check("engine", False, "starting", "loading"))
        else:
            checks.append(Check("engine", True, "ok", "default similarity "
                                f"{self._engine.default_similarity.name}"))
        try:
            health = await self.store.health()
            store_status = "ok" if health.ok else "degraded"
            detail = f"{self.store.name} ({self.store.namespace}): {health.detail}"
            if health.buffered_updates:
                detail += f"; {health.buffered_updates} updates buffered"
        except Exception as exc:  # a broken health probe is a degraded store, not a crash
            store_status, detail = "degraded", f"{self.store.name}: health check failed: {exc}"
        checks.append(Check("store", True, store_status, mask_urls(detail)))
        if self._engine is None:
            checks.append(Check("encoder", False, "starting", "loading"))
        elif self.embedder is None:
            checks.append(Check("encoder", True, "disabled", "no encoder loaded"))
        else:
            enc = self.encoder_info()
            checks.append(Check(
                "encoder", enc.ready, "ok" if enc.ready else "starting",
                f"{enc.backend} on {enc.device} ({enc.dtype}), {enc.model_id}",
            ))
        return checks

    # --- accounting -----------------------------------------------------------------------

    def finish(
        self,
        *,
        transport: str,
        rpc: str,
        started: float,
        request_id: str,
        response: pb.ComputeAdvantagesResponse | None = None,
        error: ErrorStatus | None = None,
        exc: BaseException | None = None,
    ) -> None:
        """Count, time and log one finished request (answer or error)."""
        seconds = time.monotonic() - started
        code = error.code if error is not None else "OK"
        self.metrics.requests.labels(transport, rpc, code).inc()
        self.metrics.duration.labels(transport, rpc, code).observe(seconds)
        fields: dict[str, Any] = {
            "request_id": request_id, "transport": transport, "rpc": rpc, "code": code,
            "ms": round(seconds * 1000, 3),
        }
        if response is not None:
            t = response.timing
            fields.update(
                request_id=response.request_id,
                trajectories=len(response.trajectories),
                groups=len(response.groups),
                rows=t.num_steps,
                replayed=response.replayed,
                queue_ms=round(t.queue_ns / 1e6, 3),
                featurize_ms=round(t.featurize_ns / 1e6, 3),
                store_ms=round(t.store_ns / 1e6, 3),
                compute_ms=round(t.compute_ns / 1e6, 3),
            )
        if error is None:
            log.info("request done", extra=fields)
            return
        self.metrics.rejected.labels(error.reject_reason).inc()
        if error.internal:
            log.error("request failed: internal error", extra=fields, exc_info=exc)
        else:
            log.info("request refused: %s", error.message, extra=fields)


def limits_to_proto(limits: Limits, *, max_concurrency: int) -> pb.Limits:
    """GetServerInfo's limits: every per-request limit under its own name, and the server's
    concurrency limit."""
    return pb.Limits(max_concurrency=max_concurrency, **asdict(limits))


def task_to_proto(record: TaskRecord) -> pb.TaskSuccessRate:
    """A store record as the wire's TaskSuccessRate."""
    task = pb.TaskSuccessRate(
        task_id=record.task_id,
        success_rate=record.success_rate,
        decayed_successes=record.decayed_successes,
        decayed_trials=record.decayed_trials,
        total_successes=record.total_successes,
        total_trials=record.total_trials,
        updates=record.updates,
    )
    if record.last_update_unix > 0:
        task.last_update_time.FromNanoseconds(int(record.last_update_unix * 1e9))
    return task
