"""The Engine: the one inference core behind the gRPC servicer, the REST app and the CLI.

    stage 1 (compute):  limits -> convert + validate -> resolve config -> TF-IDF / PRECOMPUTED
    main process:       encoder (ENCODER similarity) -> success-rate store (HISTORY)
    stage 2 (compute):  [dense features] -> estimator -> response

The stages run on the compute executor: worker processes (``compute_workers`` > 0, the server:
the CPU-bound core holds the GIL, so only processes spread it over cores) or threads in this
process (``compute_workers`` 0: the CLI and unit tests, no start-up cost). A request that needs
neither the encoder nor the store runs both stages in ONE call. Stages are module-level
functions of picklable arguments, so both executors run the very same code; protobuf messages
cross the process boundary as their wire bytes (pickling a message serializes it).

Every stage checks the caller's deadline first and stops there once it has passed: in
particular the success-rate store is never written after the deadline. The response is built
only after everything has been computed, so nothing half-computed is ever returned.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from proxmo.convert import build_response, preset_to_proto, request_to_core
from proxmo.core.batch import StepBatch, ValidationError
from proxmo.core.config import (
    PRESETS,
    SIGMOID_ONE_MINUS_HALF,
    EstimatorConfig,
    Similarity,
    required_features,
    resolve_config,
    uses_history,
)
from proxmo.core.episode import batch_success_counts
from proxmo.core.estimators import AdvantageResult, Components, combine, compute_components
from proxmo.core.history import task_batch_counts
from proxmo.core.step import (
    StateFeatures,
    dense_features,
    group_distinct_states,
    precomputed_features,
)
from proxmo.core.tfidf import tfidf_features
from proxmo.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NonFiniteResult,
)
from proxmo.limits import Limits
from proxmo.proto import pb
from proxmo.store.base import ApplyResult, SuccessRateStore, TaskUpdate
from proxmo.workers import ComputePool, usable_cores

T = TypeVar("T")

log = logging.getLogger("proxmo.engine")


class Embedding(Protocol):
    """What ``proxmo.encoder.EmbedResult`` carries that the engine reads."""

    vectors: np.ndarray  # float64 [n, d], rows L2-normalized
    encoded: int  # distinct texts the encoder actually ran on (cache misses)


class Prefetched(Protocol):
    """What ``proxmo.encoder.PrefetchResult`` carries."""

    distinct: int
    cached: int
    queued: int
    dropped: int


class TextEmbedder(Protocol):
    """What the engine needs from ``proxmo.encoder.Embedder``."""

    async def embed_detailed(
        self, texts: Sequence[str], *, deadline: float | None = None
    ) -> Embedding: ...

    async def prefetch(self, texts: Sequence[str], *, wait: bool = False) -> Prefetched: ...


# Upper bounds of a ComputeAdvantagesResponse's wire size: per step 4 packed doubles; per
# trajectory its id and the 4 arrays' tags and lengths; per group its ids and report fields;
# once the request id, the resolved config and the timing.
_ANSWER_STEP_BYTES = 32
_ANSWER_TRAJECTORY_BYTES = 48
_ANSWER_GROUP_BYTES = 112
_ANSWER_FIXED_BYTES = 512


def check_ids(field: str, value: str, limits: Limits) -> None:
    """LimitExceeded when the id ``value`` of ``field`` is longer than ``max_id_chars``."""
    if len(value) > limits.max_id_chars:
        raise LimitExceeded(
            field, f"{len(value)} characters exceed the limit of {limits.max_id_chars}"
        )


def check_limits(request: pb.ComputeAdvantagesRequest, limits: Limits) -> None:
    """Raise LimitExceeded for the first limit the request exceeds (cheap: no copies)."""
    n_traj = len(request.trajectories)
    if n_traj > limits.max_trajectories:
        raise LimitExceeded(
            "trajectories",
            f"{n_traj} trajectories exceed the limit of {limits.max_trajectories}",
        )
    check_ids("request_id", request.request_id, limits)
    tasks: set[str] = set()
    groups: set[str] = set()
    answer_bytes = _ANSWER_FIXED_BYTES + len(request.request_id.encode())
    # A trajectory of at most this many wire bytes cannot hold a state over the limit (a
    # character takes >= 1 byte) nor an embedding over it (a packed float takes 4 bytes), so
    # its steps need no look; ByteSize() is computed in C, a step-by-step scan is not.
    small_enough = min(limits.max_state_chars, 4 * limits.max_embedding_dim)
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
        for name in ("trajectory_id", "group_id", "task_id"):
            check_ids(f"trajectories[{i}].{name}", getattr(trajectory, name), limits)
        task = trajectory.task_id or trajectory.group_id
        if task not in tasks:
            tasks.add(task)
            if len(tasks) > limits.max_tasks_per_request:
                raise LimitExceeded(
                    f"trajectories[{i}].task_id",
                    f"more than {limits.max_tasks_per_request} distinct task ids in one "
                    "request (the limit); split the batch",
                )
        answer_bytes += (_ANSWER_TRAJECTORY_BYTES + len(trajectory.trajectory_id.encode())
                         + _ANSWER_STEP_BYTES * n_steps)
        if trajectory.group_id not in groups:
            groups.add(trajectory.group_id)
            answer_bytes += (_ANSWER_GROUP_BYTES + len(trajectory.group_id.encode())
                             + len(task.encode()))
        if trajectory.ByteSize() <= small_enough:
            continue
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
    if answer_bytes > limits.max_message_bytes:
        raise LimitExceeded(
            "trajectories",
            f"the answer would take up to {answer_bytes} bytes, over the largest message "
            f"({limits.max_message_bytes} bytes): send fewer steps or shorter ids",
        )


def check_group_states(batch: StepBatch, row_state: np.ndarray, limits: Limits) -> None:
    """Raise LimitExceeded naming the first group with more distinct states than
    ``max_group_distinct_states`` (before PSA, the only step whose work is quadratic in them)."""
    counts = group_distinct_states(batch, row_state)
    over = np.flatnonzero(counts > limits.max_group_distinct_states)
    if over.size:
        group = int(over[0])
        first = int(np.flatnonzero(batch.traj_group == group)[0])
        raise LimitExceeded(
            f"trajectories[{first}].group_id",
            f"group {batch.group_ids[group]!r} has {counts[group]} distinct states, over the "
            f"limit of {limits.max_group_distinct_states} (PSA compares every pair of a group's "
            "distinct states; split the group or use EXACT similarity)",
        )


def check_prefetch_limits(request: pb.PrefetchStatesRequest, limits: Limits) -> None:
    """A PrefetchStates request holds at most a batch's worth of states, each within the
    state limit."""
    if len(request.states) > limits.max_total_steps:
        raise LimitExceeded(
            "states",
            f"{len(request.states)} states exceed the limit of {limits.max_total_steps}",
        )
    for i, state in enumerate(request.states):
        if len(state) > limits.max_state_chars:
            raise LimitExceeded(
                f"states[{i}]",
                f"{len(state)} characters exceed the limit of {limits.max_state_chars}",
            )


def _check_deadline(deadline: float | None, stage: str) -> None:
    # time.monotonic() is CLOCK_MONOTONIC, one clock for every process of the machine, so a
    # deadline taken in the server process holds in a compute worker too.
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"deadline exceeded before {stage}; no further work was done")


@contextmanager
def field_errors() -> Iterator[None]:
    """The core's ValidationError (raised by the core and by the store's checks) becomes
    InvalidArgument with its field: a ProxmoError, which both doors and the CLI answer, and
    which survives the trip back from a worker process. The one place this conversion is made:
    around each compute stage (as a decorator) and each call into the store."""
    try:
        yield
    except ValidationError as error:
        raise InvalidArgument.from_validation(error) from None


# --- the compute stages (run on the compute executor: a worker process or a thread) ------------


@dataclass(frozen=True)
class Prepared:
    """Stage 1's answer when the main process has work to add (encoder, store)."""

    batch: StepBatch
    cfg: EstimatorConfig
    features: StateFeatures | None  # TF-IDF / PRECOMPUTED; None: none needed, A^S = 0, ENCODER
    needs_encoder: bool  # ENCODER similarity: the main process embeds batch.states
    featurize_s: float
    # HISTORY: the estimator's p-independent part, computed and checked finite BEFORE the store
    # is written (with_components), and the time it took.
    components: Components | None = None
    components_s: float = 0.0


@field_errors()
def prepare(
    request: pb.ComputeAdvantagesRequest,
    limits: Limits,
    default_similarity: Similarity,
    deadline: float | None,
) -> Prepared:
    """Stage 1: limits, conversion, validation, config, then the features that need no
    encoder. O(steps) Python work."""
    _check_deadline(deadline, "validation")
    check_limits(request, limits)
    core = request_to_core(request)
    batch = StepBatch.from_trajectories(core.trajectories)
    cfg = resolve_config(core.preset, core.overrides, default_similarity=default_similarity)
    _check_deadline(deadline, "features")
    started = time.monotonic()
    similarity = required_features(cfg)
    features: StateFeatures | None = None
    if similarity in (Similarity.TFIDF, Similarity.ENCODER):
        check_group_states(batch, batch.row_state, limits)
    if similarity is Similarity.TFIDF:
        features = tfidf_features(batch)
    elif similarity is Similarity.PRECOMPUTED:
        features = precomputed_features(batch)
        check_group_states(batch, features.row_index, limits)  # distinct vectors, not texts
    return Prepared(batch, cfg, features, similarity is Similarity.ENCODER,
                    time.monotonic() - started)


@field_errors()
def score(
    prepared: Prepared,
    *,
    request_id: str,
    embeddings: np.ndarray | None,
    group_rates: np.ndarray | None,
    fallback: np.ndarray,
    replayed: bool,
    timing: pb.Timing,
    deadline: float | None,
) -> pb.ComputeAdvantagesResponse:
    """Stage 2: the estimator (its components, unless ``with_components`` ran already, then
    PSC and the combination), the final finiteness check, and the response. ``embeddings``
    (ENCODER): the vectors of ``batch.states``, made into features here (counted in
    featurize_ns). ``timing`` holds everything measured so far; compute_ns is added here.
    Raises NonFiniteResult rather than answer a NaN or an infinity."""
    dense_s = 0.0
    if prepared.components is None:
        featurized_s = prepared.featurize_s
        prepared = with_components(prepared, embeddings=embeddings, deadline=deadline)
        dense_s = prepared.featurize_s - featurized_s
    batch, components = prepared.batch, prepared.components
    assert components is not None  # with_components sets it
    started = time.monotonic()
    result = combine(batch, prepared.cfg, components, group_success_rate=group_rates)
    check_finite_result(result, batch)
    compute_s = prepared.components_s + time.monotonic() - started
    _check_deadline(deadline, "building the response")
    response = build_response(request_id=request_id, batch=batch, result=result,
                              cfg=prepared.cfg, fallback=fallback, replayed=replayed,
                              timing=timing)
    response.timing.featurize_ns += _ns(dense_s)
    response.timing.compute_ns = _ns(compute_s)
    return response


@field_errors()
def with_components(
    prepared: Prepared, *, embeddings: np.ndarray | None, deadline: float | None
) -> Prepared:
    """The estimator's p-independent part (returns, A^E before PSC, A^S), checked: every value
    finite and the combined advantage bounded for every p (see check_finite_components).
    HISTORY requests run this before the store is written, so a request that would end in a
    non-finite answer stores nothing. ``embeddings`` as for ``score`` (dense features: their
    time is added to featurize_s)."""
    features = prepared.features
    featurize_s = prepared.featurize_s
    if embeddings is not None:
        started = time.monotonic()
        # batch.states are the distinct texts; rows map to them through batch.row_state.
        features = dense_features(embeddings, prepared.batch.row_state)
        featurize_s += time.monotonic() - started
    _check_deadline(deadline, "the estimator")
    started = time.monotonic()
    components = compute_components(prepared.batch, prepared.cfg, features=features)
    check_finite_components(components, prepared.cfg, prepared.batch)
    # the features have served: nothing after this reads them, so they cross no process again
    return replace(prepared, features=None, featurize_s=featurize_s, components=components,
                   components_s=time.monotonic() - started)


def check_finite_components(components: Components, cfg: EstimatorConfig,
                            batch: StepBatch) -> None:
    """Raise NonFiniteResult unless every component is finite and, per row, the bound of the
    combined advantage |A| <= episode_weight w_max |A^E| + omega |A^S| is finite, with w_max =
    1 + beta (sigmoid(1) - 1/2) the largest PSC weight for any p in [0, 1]: then no p the
    store can give makes the answer overflow."""
    w_max = 1.0 + cfg.psc_beta * SIGMOID_ONE_MINUS_HALF if cfg.applies_psc else 1.0
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is what we look for
        bound = cfg.episode_weight * w_max * np.abs(components.episode_base) + (
            cfg.step_weight * np.abs(components.step_advantages))
    for name, values in (("returns", components.returns), ("advantages", bound),
                         ("effective neighbours", components.effective_neighbors)):
        _check_finite(name, values, batch)


def check_finite_result(result: AdvantageResult, batch: StepBatch) -> None:
    """The last check before an answer (docs/algorithm.md section 5a): every per-row value and
    every group diagnostic finite, else NonFiniteResult (INTERNAL)."""
    for name, values in (
        ("advantages", result.advantages),
        ("episode advantages", result.episode_advantages),
        ("step advantages", result.step_advantages),
        ("returns", result.returns),
    ):
        _check_finite(name, values, batch)
    g = result.groups
    diagnostics = np.concatenate([
        g.success_rate, g.weight_success, g.weight_failure, g.singleton_fraction,
        g.mean_effective_neighbors, g.hgpo_long_history_fraction, g.graph_mean_distance,
        g.graph_unreachable_fraction])
    if not np.isfinite(diagnostics).all():
        raise NonFiniteResult("", "the estimator produced a non-finite group diagnostic; "
                              "nothing was stored (a bug: please report it)")


def _check_finite(name: str, values: np.ndarray, batch: StepBatch) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        raise NonFiniteResult(
            "", f"the estimator produced non-finite {name} ({values[row]} at "
            f"{batch.row_field(row, 'reward').removesuffix('.reward')}); nothing was stored "
            "(a bug: please report it)")


def prepare_and_score(
    request: pb.ComputeAdvantagesRequest,
    limits: Limits,
    default_similarity: Similarity,
    deadline: float | None,
    request_id: str,
    queue_ns: int,
) -> pb.ComputeAdvantagesResponse | Prepared:
    """Stage 1, then stage 2 in the same call when the main process has nothing to add (no
    encoder, no store): one round trip to a worker instead of two. Otherwise the Prepared,
    with its checked components when it needs the store and not the encoder."""
    prepared = prepare(request, limits, default_similarity, deadline)
    if prepared.needs_encoder:
        return prepared
    if uses_history(prepared.cfg):
        return with_components(prepared, embeddings=None, deadline=deadline)
    return score(
        prepared,
        request_id=request_id,
        embeddings=None,
        group_rates=None,
        fallback=np.zeros(prepared.batch.n_groups, dtype=bool),
        replayed=False,
        timing=_timing(prepared, queue_ns=queue_ns, featurize_s=prepared.featurize_s),
        deadline=deadline,
    )


def _timing(prepared: Prepared, *, queue_ns: int, featurize_s: float, store_s: float = 0.0,
            encoded: int = 0) -> pb.Timing:
    return pb.Timing(
        queue_ns=queue_ns,
        featurize_ns=_ns(featurize_s),
        store_ns=_ns(store_s),
        num_steps=prepared.batch.n_rows,
        num_unique_states=len(prepared.batch.states),
        num_encoded_states=encoded,
    )


def warmup_request(preset: str = "") -> pb.ComputeAdvantagesRequest:
    """Two tiny groups, one success and one failure each, on one task; a dry run (nothing is
    stored). ``preset`` empty: the server's default, which also touches its encoder and
    store."""
    request = pb.ComputeAdvantagesRequest(request_id="warmup", dry_run=True)
    if preset:
        request.config.preset = preset
    for g in range(2):
        for i in range(2):
            trajectory = request.trajectories.add(trajectory_id=f"w{g}{i}", group_id=f"w{g}",
                                                  task_id="proxmo-warmup")
            trajectory.steps.add(state="you are in a room", reward=0.0)
            trajectory.steps.add(state=f"you see item {i}", reward=float(i))
    return request


def warm_worker() -> None:
    """Initializer of every compute worker: one BLAS/OpenMP thread each (the pool already has
    one worker per core), then one tiny batch so that the first real request finds every
    import done and every code path compiled."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    # "paper": TF-IDF and the estimator, in the worker alone (no encoder, no store)
    prepare_and_score(warmup_request("paper"), Limits(), Similarity.TFIDF, None, "worker-warmup",
                      0)


# --- the engine ------------------------------------------------------------------------------


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
        self.nonfinite = Counter(
            "proxmo_nonfinite_results",
            "Requests refused as INTERNAL because the estimator produced a NaN or an infinity "
            "(never answered, nothing stored; a bug).",
            registry=registry,
        )
        self.workers_replaced = Counter(
            "proxmo_compute_workers_replaced",
            "Compute worker processes replaced, by reason: stopped (the caller's deadline "
            "passed or the client left) or died (killed, e.g. out of memory).",
            ["reason"],
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
        compute_workers: int = 0,
    ) -> None:
        """``compute_workers`` N > 0 runs the compute stages on N worker processes (started
        lazily, or all at once by ``start``); 0 runs them on ``compute_threads`` threads in this
        process (0: one per CPU core). ``registry`` None keeps the metrics private to this
        engine (tests, the CLI)."""
        if compute_workers < 0:
            raise ValueError(f"compute_workers must be >= 0, got {compute_workers}")
        self.store = store
        self.embedder = embedder
        self.default_similarity = default_similarity
        self.limits = limits if limits is not None else Limits()
        self.compute_workers = compute_workers
        self._metrics = _Metrics(registry if registry is not None else CollectorRegistry())
        self._pool: ComputePool | None = None
        self._threads: ThreadPoolExecutor | None = None
        if compute_workers:
            replaced = self._metrics.workers_replaced
            self._pool = ComputePool(
                compute_workers, initializer=warm_worker, preload=("proxmo.engine",),
                on_replace=lambda stopped: replaced.labels(
                    "stopped" if stopped else "died").inc())
        else:
            self._threads = ThreadPoolExecutor(
                max_workers=compute_threads or usable_cores(), thread_name_prefix="proxmo-compute"
            )

    @property
    def pool(self) -> ComputePool | None:
        """The worker processes (None in-process)."""
        return self._pool

    async def start(self) -> None:
        """Start and warm every compute worker now (servers: before reporting SERVING), so
        that no request pays for a process start. In-process: nothing to do."""
        if self._pool is not None:
            await self._pool.start()

    def close(self) -> None:
        """Stop the compute workers or threads (waits for running computations)."""
        if self._pool is not None:
            self._pool.close()
        if self._threads is not None:
            self._threads.shutdown(wait=True)

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

    async def _run(self, deadline: float | None, fn: Callable[..., T], /, *args: Any,
                   **kwargs: Any) -> T:
        """One compute stage on the compute executor, given up at ``deadline``: a worker
        process running it then is stopped (and replaced), as it is when the caller's task is
        cancelled (the client left); a thread cannot be stopped, its answer is dropped."""
        call = functools.partial(fn, *args, **kwargs)
        if self._pool is not None:
            return await self._pool.run(call, deadline=deadline)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._threads, call), remaining)
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded while computing; the answer was dropped") \
                from None

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
        Raises LimitExceeded, InvalidArgument, FailedPrecondition, DeadlineExceeded,
        WorkerLost when a compute worker died under the request, or NonFiniteResult (INTERNAL,
        counted in proxmo_nonfinite_results_total, logged with the request id; with HISTORY it
        is raised before the store is written).
        """
        start = time.monotonic()
        received = received_at if received_at is not None else start
        _check_deadline(deadline, "validation")
        request_id = request.request_id or str(uuid.uuid4())
        queue_ns = _ns(start - received)
        try:
            outcome = await self._run(deadline, prepare_and_score, request, self.limits,
                                      self.default_similarity, deadline, request_id, queue_ns)
            store_s: float | None = None
            if isinstance(outcome, Prepared):
                response, store_s = await self._complete(outcome, request, request_id,
                                                         queue_ns, deadline)
            else:
                response = outcome
        except NonFiniteResult as error:
            self._metrics.nonfinite.inc()
            log.error("non-finite result refused: %s", error.message,
                      extra={"request_id": request_id})
            raise
        response.timing.total_ns = _ns(time.monotonic() - received)
        self._record(response, store_s)
        return response

    async def prefetch_states(
        self, request: pb.PrefetchStatesRequest
    ) -> pb.PrefetchStatesResponse:
        """Queue the request's states for background embedding (see ``Embedder.prefetch``).
        Raises LimitExceeded, or FailedPrecondition when this server has no encoder."""
        check_prefetch_limits(request, self.limits)
        if self.embedder is None:
            raise FailedPrecondition(
                "states",
                "PrefetchStates feeds the sentence encoder, and this server runs without one "
                "(its ENCODER similarity is off)",
            )
        result = await self.embedder.prefetch(list(request.states), wait=request.wait)
        return pb.PrefetchStatesResponse(
            distinct_states=result.distinct, cached_states=result.cached,
            queued_states=result.queued, dropped_states=result.dropped,
        )

    async def _complete(
        self,
        prepared: Prepared,
        request: pb.ComputeAdvantagesRequest,
        request_id: str,
        queue_ns: int,
        deadline: float | None,
    ) -> tuple[pb.ComputeAdvantagesResponse, float | None]:
        """The main process's part (encoder, store), then stage 2. Returns the response and
        the store's time (None: HISTORY not used)."""
        batch, cfg = prepared.batch, prepared.cfg
        _check_deadline(deadline, "features")
        embeddings: np.ndarray | None = None
        encoded = 0
        encoder_s = 0.0
        if prepared.needs_encoder:
            if self.embedder is None:
                raise FailedPrecondition(
                    "config.similarity",
                    "ENCODER similarity needs the server's sentence encoder, and this server "
                    "runs without one (use TFIDF, EXACT or PRECOMPUTED)",
                )
            started = time.monotonic()
            embedding = await self.embedder.embed_detailed(batch.states, deadline=deadline)
            encoder_s = time.monotonic() - started
            embeddings, encoded = embedding.vectors, embedding.encoded

        group_rates: np.ndarray | None = None
        fallback = np.zeros(batch.n_groups, dtype=bool)
        replayed = False
        store_s: float | None = None
        if uses_history(cfg):
            if prepared.components is None:  # ENCODER: the components need the embeddings
                prepared = await self._run(deadline, with_components, prepared,
                                           embeddings=embeddings, deadline=deadline)
                embeddings = None
            # prepared.components are finite here (with_components): only now is it written
            _check_deadline(deadline, "the success-rate store")
            started = time.monotonic()
            applied = await self._apply_history(request_id, batch, cfg, dry_run=request.dry_run)
            store_s = time.monotonic() - started
            replayed = applied.replayed
            group_rates, fallback = _history_rates(batch, cfg, applied)

        _check_deadline(deadline, "the estimator")
        timing = _timing(prepared, queue_ns=queue_ns, featurize_s=prepared.featurize_s + encoder_s,
                         store_s=store_s or 0.0, encoded=encoded)
        response = await self._run(
            deadline, score, prepared, request_id=request_id, embeddings=embeddings,
            group_rates=group_rates, fallback=fallback, replayed=replayed, timing=timing,
            deadline=deadline,
        )
        return response, store_s

    async def _apply_history(
        self, request_id: str, batch: StepBatch, cfg: EstimatorConfig, *, dry_run: bool
    ) -> ApplyResult:
        """One update per task: all of this batch's groups with that task together."""
        task_ids, successes, trials = task_batch_counts(batch, cfg)
        updates = [
            TaskUpdate(task, int(s), int(n))
            for task, s, n in zip(task_ids, successes, trials, strict=True)
        ]
        with field_errors():
            return await self.store.apply(
                request_id,
                updates,
                half_life=cfg.history_half_life,
                prior=cfg.history_prior,
                dry_run=dry_run,
            )

    def _record(self, response: pb.ComputeAdvantagesResponse, store_s: float | None) -> None:
        m = self._metrics
        timing = response.timing
        m.rows.inc(timing.num_steps)
        m.groups.inc(len(response.groups))
        m.trajectories.inc(len(response.trajectories))
        for group in response.groups:
            m.sources.labels(_source_label(group)).inc()
        m.stage.labels("features").observe(timing.featurize_ns / 1e9)
        if store_s is not None:
            m.stage.labels("store").observe(store_s)
        m.stage.labels("compute").observe(timing.compute_ns / 1e9)


def _history_rates(
    batch: StepBatch, cfg: EstimatorConfig, applied: ApplyResult
) -> tuple[np.ndarray | None, np.ndarray]:
    """Group p's from the store's task p's, and bool[n_groups] fallback flags.

    A degraded store (or, defensively, a task it did not report, or a p outside [0, 1] from a
    corrupted record) falls back to the batch estimate S_b / N_b; a fully degraded store
    returns None so the core computes BATCH itself.
    """
    n_groups = batch.n_groups
    if applied.degraded:
        return None, np.ones(n_groups, dtype=bool)
    successes, trials = batch_success_counts(batch, cfg)
    rates = np.empty(n_groups, dtype=np.float64)
    fallback = np.zeros(n_groups, dtype=bool)
    for g, task_id in enumerate(batch.group_task):
        p = applied.rates.get(task_id)
        if p is None or not 0.0 <= p <= 1.0:  # NaN fails the comparison too
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


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))

