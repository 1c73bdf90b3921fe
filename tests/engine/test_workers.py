"""Compute worker processes: the same answers as in-process, errors that keep their field across
the process boundary, and a pool that survives a killed worker. Real processes, real signals."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time
from collections.abc import Iterator

import pytest
from proxmo.core.config import PRESETS, Similarity
from proxmo.engine import Engine
from proxmo.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotReady,
    Overloaded,
    ProxmoError,
)
from proxmo.limits import Limits
from proxmo.server.config import SettingsError, load_settings
from proxmo.store.memory import MemoryStore
from proxmo.workers import WorkerLost
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import group_request, run

SIMILARITIES = {  # every similarity that runs without the encoder
    "TFIDF": pb.SIMILARITY_TFIDF,
    "EXACT": pb.SIMILARITY_EXACT,
    "PRECOMPUTED": pb.SIMILARITY_PRECOMPUTED,
}


@pytest.fixture(scope="module")
def pool_engine() -> Iterator[Engine]:
    """Two warmed worker processes, shared by the module (a pool start costs ~1 s)."""
    engine = Engine(store=MemoryStore(), embedder=None, default_similarity=Similarity.TFIDF,
                    compute_workers=2)
    run(engine.start())
    yield engine
    engine.close()


def _local_engine() -> Engine:
    return Engine(store=MemoryStore(), embedder=None, default_similarity=Similarity.TFIDF,
                  compute_threads=1)


def _request(preset: str, similarity: str, request_id: str) -> pb.ComputeAdvantagesRequest:
    """Two groups with their own task ids (fresh histories per case), an embedding per step."""
    tag = f"{preset}-{similarity}"
    request = group_request(
        request_id=request_id, preset=preset, similarity=SIMILARITIES[similarity],
        groups=((f"a-{tag}", (True, False, False, True)), (f"b-{tag}", (False, True, True))),
        task_ids={f"a-{tag}": f"task-a-{tag}", f"b-{tag}": f"task-b-{tag}"},
    )
    for i, trajectory in enumerate(request.trajectories):
        for t, step in enumerate(trajectory.steps):
            step.state_embedding.extend([1.0, float((i + t) % 3), 0.25 * t])
    return request


def _without_timing(response: pb.ComputeAdvantagesResponse) -> pb.ComputeAdvantagesResponse:
    response.ClearField("timing")
    return response


# --- the same numbers -------------------------------------------------------------------------


@pytest.mark.parametrize("similarity", list(SIMILARITIES))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_pool_answers_equal_in_process_answers(
    pool_engine: Engine, preset: str, similarity: str
) -> None:
    """Every preset (HISTORY ones take the two-stage path through the store) and similarity:
    identical responses, twice in a row so that the second HISTORY call reads the history."""
    local = _local_engine()
    pool_engine.store = MemoryStore()
    try:
        for k in range(2):
            request = _request(preset, similarity, f"{preset}-{similarity}-{k}")
            expected = run(local.compute(request))
            got = run(pool_engine.compute(request))
            assert expected.timing.num_steps == got.timing.num_steps > 0
            assert _without_timing(got) == _without_timing(expected)
    finally:
        local.close()


def test_pool_timing_is_filled(pool_engine: Engine) -> None:
    response = run(pool_engine.compute(_request("paper", "TFIDF", "timing")))
    t = response.timing
    assert t.featurize_ns > 0 and t.compute_ns > 0 and t.total_ns >= t.compute_ns
    assert t.num_steps == 20 and t.num_unique_states == 3


def test_concurrent_requests_spread_over_the_workers(pool_engine: Engine) -> None:
    request = _request("paper", "TFIDF", "many")

    async def many() -> list[pb.ComputeAdvantagesResponse]:
        return await asyncio.gather(*(pool_engine.compute(request) for _ in range(6)))

    responses = [_without_timing(r) for r in run(many())]
    assert all(r == responses[0] for r in responses)


# --- errors keep their type, field and message across processes ------------------------------


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("trajectories[3].steps[7].reward", "must be finite, got nan"),
        LimitExceeded("trajectories", "5000 trajectories exceed the limit of 4096"),
        FailedPrecondition("config.similarity", "no encoder"),
        DeadlineExceeded("deadline exceeded before features"),
        Overloaded(),
        NotReady("draining"),
        WorkerLost("worker died"),
    ],
)
def test_errors_pickle_with_field_and_message(error: ProxmoError) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert (back.field, back.message, str(back)) == (error.field, error.message, str(error))
    assert (back.grpc_code, back.http_status) == (error.grpc_code, error.http_status)


def _bad_reward() -> pb.ComputeAdvantagesRequest:
    request = group_request()
    request.trajectories[2].steps[1].reward = float("nan")
    return request


def _bad_preset() -> pb.ComputeAdvantagesRequest:
    return group_request(preset="no-such-preset")


def _missing_embedding() -> pb.ComputeAdvantagesRequest:
    request = _request("paper", "PRECOMPUTED", "missing")
    request.trajectories[1].steps[0].ClearField("state_embedding")
    return request


@pytest.mark.parametrize(
    ("build", "error_type", "field"),
    [
        (_bad_reward, InvalidArgument, "trajectories[2].steps[1].reward"),
        (_bad_preset, InvalidArgument, "config.preset"),
        (_missing_embedding, InvalidArgument, "trajectories[1].steps[0].state_embedding"),
    ],
)
def test_worker_errors_keep_their_field(
    pool_engine: Engine, build: object, error_type: type[ProxmoError], field: str
) -> None:
    request = build()  # type: ignore[operator]
    with pytest.raises(error_type) as in_pool:
        run(pool_engine.compute(request))
    local = _local_engine()
    try:
        with pytest.raises(error_type) as in_process:
            run(local.compute(request))
    finally:
        local.close()
    assert in_pool.value.field == field
    assert str(in_pool.value) == str(in_process.value)


def test_limit_error_from_a_worker(pool_engine: Engine) -> None:
    request = group_request()
    request.trajectories[1].steps[1].state = "x" * 100
    saved = pool_engine.limits
    pool_engine.limits = Limits(max_state_chars=80)
    try:
        with pytest.raises(LimitExceeded) as caught:
            run(pool_engine.compute(request))
    finally:
        pool_engine.limits = saved
    assert caught.value.field == "trajectories[1].steps[1].state"
    assert caught.value.grpc_code == "RESOURCE_EXHAUSTED"


def test_deadline_passing_inside_a_worker(pool_engine: Engine) -> None:
    request = group_request(preset="paper")
    for trajectory in request.trajectories:
        trajectory.steps.extend([pb.Step(state=f"s{k}") for k in range(900)])
    with pytest.raises(DeadlineExceeded):
        run(pool_engine.compute(request, deadline=time.monotonic() + 0.002))


# --- start, death, restart, shutdown ----------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until reaped; it is dead all the same.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def test_start_warms_every_worker_and_close_stops_them() -> None:
    engine = Engine(store=MemoryStore(), embedder=None, default_similarity=Similarity.TFIDF,
                    compute_workers=2)
    try:
        run(engine.start())
        assert engine.pool is not None
        pids = engine.pool.pids()
        assert len(pids) == 2 and all(_alive(p) for p in pids) and os.getpid() not in pids
    finally:
        engine.close()
    assert not any(_alive(p) for p in pids)


def test_in_process_engine_starts_no_process() -> None:
    engine = _local_engine()
    try:
        run(engine.start())
        assert engine.pool is None
        assert run(engine.compute(group_request())).trajectories
    finally:
        engine.close()


def test_a_killed_worker_fails_only_its_request_and_the_pool_comes_back() -> None:
    engine = Engine(store=MemoryStore(), embedder=None, default_similarity=Similarity.TFIDF,
                    compute_workers=1)
    local = _local_engine()
    slow = group_request(preset="paper")
    for i, trajectory in enumerate(slow.trajectories):
        trajectory.steps.extend(
            # 250 distinct states a trajectory: within the 1,024 a group may hold under PSA
            [pb.Step(state=f"room {i} item {k % 250}") for k in range(900)]
        )
    small = group_request(preset="paper")

    async def kill_mid_request() -> BaseException | None:
        await engine.start()
        assert engine.pool is not None
        [pid] = engine.pool.pids()
        task = asyncio.create_task(engine.compute(slow))
        # Wait until the call is on the worker: a fixed sleep raced the parent's own checks on
        # a loaded machine (the worker, killed while idle, was replaced; the call succeeded).
        while engine.pool.idle_workers():
            await asyncio.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        try:
            await task
        except WorkerLost as error:
            return error
        return None

    try:
        error = run(kill_mid_request())
        assert isinstance(error, WorkerLost)
        assert (error.grpc_code, error.http_status) == ("UNAVAILABLE", 503)
        assert engine.pool is not None and engine.pool.restarts == 1
        # The next request runs on the new worker, with the right answer.
        expected = _without_timing(run(local.compute(small)))
        assert _without_timing(run(engine.compute(small))) == expected
    finally:
        engine.close()
        local.close()


def test_a_worker_killed_while_idle_costs_no_request() -> None:
    engine = Engine(store=MemoryStore(), embedder=None, default_similarity=Similarity.TFIDF,
                    compute_workers=1)
    try:
        run(engine.start())
        assert engine.pool is not None
        [pid] = engine.pool.pids()
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)  # the executor notices the death and marks the pool broken
        response = run(engine.compute(group_request()))
        assert len(response.trajectories) == 4
        assert engine.pool.restarts == 1 and engine.pool.pids() != [pid]
    finally:
        engine.close()


def test_ctrl_c_to_the_process_group_leaves_the_workers_to_the_server() -> None:
    """SIGINT/SIGTERM reach every process of a terminal's group; the workers ignore them so
    that the server's drain decides when they stop."""
    engine = Engine(store=MemoryStore(), embedder=None, default_similarity=Similarity.TFIDF,
                    compute_workers=1)
    try:
        run(engine.start())
        assert engine.pool is not None
        [pid] = engine.pool.pids()
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.2)
        assert _alive(pid)
        assert len(run(engine.compute(group_request())).trajectories) == 4
        assert engine.pool.restarts == 0
    finally:
        engine.close()


# --- settings ---------------------------------------------------------------------------------


def test_compute_workers_setting() -> None:
    assert load_settings([], {}).compute_workers == "auto"
    assert load_settings([], {}).compute_worker_count == len(os.sched_getaffinity(0))
    assert load_settings(["--compute-workers", "0"], {}).compute_worker_count == 0
    assert load_settings([], {"PROXMO_COMPUTE_WORKERS": "3"}).compute_worker_count == 3
    for bad in ("-1", "two", "1.5", ""):
        with pytest.raises(SettingsError, match="compute_workers"):
            load_settings(["--compute-workers", bad], {})
