"""The Engine: the one inference core behind the gRPC servicer, the REST app and the CLI.

    limits -> convert + validate -> resolve config -> features -> store (HISTORY) -> estimator
           -> response

Every stage checks the caller's deadline first and stops there once it has passed: in
particular the success-rate store is never written after the deadline. The response is built
only after everything has been computed, so nothing half-computed is ever returned. CPU-bound
stages run on a small thread pool, which keeps the event loop (health checks, other requests)
responsive.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from proxmo_client.v1 import proxmo_pb2 as pb

from proxmo.convert import build_response, preset_to_proto, request_to_core
from proxmo.core.batch import StepBatch, ValidationError
from proxmo.core.config import (
    PRESETS,
    EstimatorConfig,
    Similarity,
    required_features,
    resolve_config,
    uses_history,
)
from proxmo.core.episode import batch_success_counts
from proxmo.core.estimators import compute_advantages
from proxmo.core.step import StateFeatures, dense_features, precomputed_features
from proxmo.core.tfidf import tfidf_features
from proxmo.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, LimitExceeded
from proxmo.store.base import ApplyResult, SuccessRateStore, TaskUpdate

T = TypeVar("T")


class Embedding(Protocol):
    """What ``proxmo.encoder.EmbedResult`` carries that the engine reads."""

    vectors: np.ndarray  # float64 [n, d], rows L2-normalized
    encoded: int  # distinct texts the encoder actually ran on (cache misses)


class TextEmbedder(Protocol):
    """What the engine needs from ``proxmo.encoder.Embedder``."""

    async def embed_detailed(self, texts: Sequence[str]) -> Embedding: ...


@dataclass(frozen=True)
class Limits:
    """Per-request size limits; exceeding one raises LimitExceeded naming the field."""

    max_trajectories: int = 4096
    max_steps_per_trajectory: int = 1000
    max_total_steps: int = 200_000
    max_state_chars: int = 16_384
    max_embedding_dim: int = 4096


def check_limits(request: pb.ComputeAdvantagesRequest, limits: Limits) -> None:
    """Raise LimitExceeded for the first limit the request exceeds (cheap: no copies)."""
    n_traj = len(request.trajectories)
    if n_traj > limits.max_trajectories:
        raise LimitExceeded(
            "trajectories",
            f"{n_traj} trajectories exceed the limit of {limits.max_trajectories}",
        )
    total = 0
    for i, trajectory in enumerate(request.trajectories):
        n_steps = len(trajectory.steps)
        if n_steps > limits.max_steps_per_trajectory:
            raise LimitExceeded(
                f"trajectories[{i}].steps",
                f"{n_steps} steps exceed the limit of {limits.max_steps_per_trajectory}",
            )
        total += n_steps
        if total > limits.max_total_steps:
            total = sum(len(t.steps) for t in request.trajectories)
            raise LimitExceeded(
                "trajectories",
                f"{total} steps in total exceed the limit of {limits.max_total_steps}",
            )
        for t, step in enumerate(trajectory.steps):
            if len(step.state) > limits.max_state_chars:
                raise LimitExceeded(
                    f"trajectories[{i}].steps[{t}].state",
                    f"{len(step.state)} characters exceed the limit of {limits.max_state_chars}",
                )
            if len(step.state_embedding) > limits.max_embedding_dim:
                raise LimitExceeded(
                    f"trajectories[{i}].steps[{t}].state_embedding",
                    f"{len(step.state_embedding)} values exceed the limit of "
                    f"{limits.max_embedding_dim}",
                )


def _check_deadline(deadline: float | None, stage: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"deadline exceeded before {stage}; no further work was done")


@dataclass(frozen=True)
class _Prepared:
    batch: StepBatch
    cfg: EstimatorConfig


class _Metrics:
    """Prometheus metrics of the engine (names per the Prometheus naming guide)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows = Counter(
            "proxmo_rows_processed", "Step rows scored.", registry=registry
        )
        self.groups = Counter(
            "proxmo_groups_processed", "Groups scored.", registry=registry
        )
        self.trajectories = Counter(
            "proxmo_trajectories_processed", "Trajectories scored.", registry=registry
        )
        self.sources = Counter(
            "proxmo_success_rate_source",
            "Groups scored, by where their success rate came from "
            "(batch, row_mean, history, batch_fallback).",
            ["source"],
            registry=registry,
        )
        self.stage = Histogram(
            "proxmo_engine_stage_duration_seconds",
            "Time spent per engine stage (features, store, compute).",
            ["stage"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                     5, 10, 30),
        )


class Engine:
    """Computes one ComputeAdvantagesResponse per ComputeAdvantagesRequest."""

    def __init__(
        self,
        *,
        store: SuccessRateStore,
        embedder: TextEmbedder | None,
        default_similarity: Similarity,
        limits: Limits | None = None,
        registry: CollectorRegistry | None = None,
        compute_threads: int = 0,
    ) -> None:
        """``compute_threads`` 0 means one per CPU core; ``registry`` None keeps the metrics
        private to this engine (tests, the CLI)."""
        self.store = store
        self.embedder = embedder
        self.default_similarity = default_similarity
        self.limits = limits if limits is not None else Limits()
        self._metrics = _Metrics(registry if registry is not None else CollectorRegistry())
        self._executor = ThreadPoolExecutor(
            max_workers=compute_threads or os.cpu_count() or 1,
            thread_name_prefix="proxmo-compute",
        )

    def close(self) -> None:
        """Stop the worker threads (waits for running computations)."""
        self._executor.shutdown(wait=True)

    def server_presets(self) -> list[pb.Preset]:
        """Every preset fully resolved with this server's default similarity."""
        return [
            preset_to_proto(
                name,
                spec.description,
                resolve_config(name, default_similarity=self.default_similarity),
            )
            for name, spec in PRESETS.items()
        ]

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """Run CPU-bound core work on the pool; the core's ValidationError becomes
        InvalidArgument with its field."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, _core_call, fn)

    async def compute(
        self,
        request: pb.ComputeAdvantagesRequest,
        *,
        deadline: float | None = None,
        received_at: float | None = None,
    ) -> pb.ComputeAdvantagesResponse:
        """Score one batch.

        ``deadline`` and ``received_at`` are ``time.monotonic()`` values; ``received_at``
        (default: now) starts ``timing.total_ns``, and ``timing.queue_ns`` is the time from it
        to the start of the work (the server's admission wait). The encoder's time, waiting
        for its micro-batch included, counts in ``featurize_ns``, so the stages never overlap.
        Raises LimitExceeded, InvalidArgument, FailedPrecondition or DeadlineExceeded.
        """
        start = time.monotonic()
        received = received_at if received_at is not None else start
        _check_deadline(deadline, "validation")
        request_id = request.request_id or str(uuid.uuid4())
        prepared = await self._in_thread(lambda: self._prepare(request))
        batch, cfg = prepared.batch, prepared.cfg

        _check_deadline(deadline, "features")
        t0 = time.monotonic()
        features, encoded = await self._features(batch, cfg)
        featurize_s = time.monotonic() - t0

        n_groups = len(batch.group_ids)
        group_rates: np.ndarray | None = None
        fallback = np.zeros(n_groups, dtype=bool)
        replayed = False
        store_s = 0.0
        if uses_history(cfg):
            _check_deadline(deadline, "the success-rate store")
            t0 = time.monotonic()
            applied = await self._apply_history(request_id, batch, cfg, dry_run=request.dry_run)
            store_s = time.monotonic() - t0
            replayed = applied.replayed
            group_rates, fallback = _history_rates(batch, cfg, applied)

        _check_deadline(deadline, "the estimator")
        t0 = time.monotonic()
        result = await self._in_thread(
            lambda: compute_advantages(
                batch, cfg, features=features, group_success_rate=group_rates
            )
        )
        compute_s = time.monotonic() - t0
        _check_deadline(deadline, "building the response")

        timing = pb.Timing(
            queue_ns=_ns(start - received),
            featurize_ns=_ns(featurize_s),
            store_ns=_ns(store_s),
            compute_ns=_ns(compute_s),
            num_steps=batch.n_rows,
            num_unique_states=len(batch.states),
            num_encoded_states=encoded,
        )
        response = await self._in_thread(
            lambda: build_response(
                request_id=request_id,
                batch=batch,
                result=result,
                cfg=cfg,
                fallback=fallback,
                replayed=replayed,
                timing=timing,
            )
        )
        response.timing.total_ns = _ns(time.monotonic() - received)
        self._record(response, featurize_s, store_s if uses_history(cfg) else None, compute_s)
        return response

    # --- stages ----------------------------------------------------------------------------

    def _prepare(self, request: pb.ComputeAdvantagesRequest) -> _Prepared:
        """Limits, conversion, validation and config (on the pool: O(steps) Python work)."""
        check_limits(request, self.limits)
        core = request_to_core(request)
        batch = StepBatch.from_trajectories(core.trajectories)
        cfg = resolve_config(
            core.preset, core.overrides, default_similarity=self.default_similarity
        )
        return _Prepared(batch=batch, cfg=cfg)

    async def _features(
        self, batch: StepBatch, cfg: EstimatorConfig
    ) -> tuple[StateFeatures | None, int]:
        """PSA's state features (None: no features needed, or A^S = 0) and the number of
        texts the encoder ran on."""
        similarity = required_features(cfg)
        if similarity is None:
            return None, 0
        if similarity is Similarity.TFIDF:
            return await self._in_thread(lambda: tfidf_features(batch)), 0
        if similarity is Similarity.PRECOMPUTED:
            return await self._in_thread(lambda: precomputed_features(batch)), 0
        if self.embedder is None:
            raise FailedPrecondition(
                "config.similarity",
                "ENCODER similarity needs the server's sentence encoder, and this server runs "
                "without one (use TFIDF, EXACT or PRECOMPUTED)",
            )
        # batch.states are the distinct texts; rows map to them through batch.row_state.
        embedding = await self.embedder.embed_detailed(batch.states)
        features = await self._in_thread(
            lambda: dense_features(embedding.vectors, batch.row_state)
        )
        return features, embedding.encoded

    async def _apply_history(
        self, request_id: str, batch: StepBatch, cfg: EstimatorConfig, *, dry_run: bool
    ) -> ApplyResult:
        """One update per task: all of this batch's groups with that task together."""
        successes, trials = batch_success_counts(batch, cfg)
        per_task: dict[str, list[int]] = {}
        for g, task_id in enumerate(batch.group_task):
            counts = per_task.setdefault(task_id, [0, 0])
            counts[0] += int(successes[g])
            counts[1] += int(trials[g])
        updates = [TaskUpdate(task, s, n) for task, (s, n) in per_task.items()]
        try:
            return await self.store.apply(
                request_id,
                updates,
                half_life=cfg.history_half_life,
                prior=cfg.history_prior,
                dry_run=dry_run,
            )
        except ValidationError as error:
            raise InvalidArgument.from_validation(error) from None

    def _record(
        self,
        response: pb.ComputeAdvantagesResponse,
        featurize_s: float,
        store_s: float | None,
        compute_s: float,
    ) -> None:
        m = self._metrics
        m.rows.inc(response.timing.num_steps)
        m.groups.inc(len(response.groups))
        m.trajectories.inc(len(response.trajectories))
        for group in response.groups:
            m.sources.labels(_source_label(group)).inc()
        m.stage.labels("features").observe(featurize_s)
        if store_s is not None:
            m.stage.labels("store").observe(store_s)
        m.stage.labels("compute").observe(compute_s)


def _history_rates(
    batch: StepBatch, cfg: EstimatorConfig, applied: ApplyResult
) -> tuple[np.ndarray | None, np.ndarray]:
    """Group p's from the store's task p's, and bool[n_groups] fallback flags.

    A degraded store (or, defensively, a task it did not report) falls back to the batch
    estimate S_b / N_b; a fully degraded store returns None so the core computes BATCH itself.
    """
    n_groups = batch.n_groups
    if applied.degraded:
        return None, np.ones(n_groups, dtype=bool)
    successes, trials = batch_success_counts(batch, cfg)
    rates = np.empty(n_groups, dtype=np.float64)
    fallback = np.zeros(n_groups, dtype=bool)
    for g, task_id in enumerate(batch.group_task):
        p = applied.rates.get(task_id)
        if p is None or not math.isfinite(p):
            fallback[g] = True
            p = successes[g] / trials[g]
        rates[g] = p
    return rates, fallback


def _source_label(group: pb.GroupReport) -> str:
    """``batch``, ``row_mean``, ``history`` or ``batch_fallback``."""
    if group.success_rate_fallback:
        return "batch_fallback"
    name = pb.SuccessRateSource.Name(group.success_rate_source)
    return name.removeprefix("SUCCESS_RATE_SOURCE_").lower()


def _core_call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except ValidationError as error:
        raise InvalidArgument.from_validation(error) from None


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))

