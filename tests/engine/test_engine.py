"""Engine.compute end to end on real parts: response shape, numbers, HISTORY with the real
MemoryStore and a real (unreachable) RedisStore, deadlines, limits and metrics."""

from __future__ import annotations

import asyncio
import math
import socket
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from proxmo.convert import config_to_proto, request_to_core
from proxmo.core.batch import StepBatch
from proxmo.core.config import Similarity, resolve_config
from proxmo.core.estimators import compute_advantages
from proxmo.core.tfidf import tfidf_features
from proxmo.engine import Engine
from proxmo.errors import DeadlineExceeded, LimitExceeded
from proxmo.limits import Limits
from proxmo.store.memory import MemoryStore
from proxmo.store.redis import RedisStore
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import group_request, run, trajectory

RHO = 0.5 ** (1 / 8)  # default history half-life 8


def _history_request(request_id: str, outcomes: tuple[bool, ...], **kw: object):  # type: ignore[no-untyped-def]
    return group_request(request_id=request_id, preset="proxmo", similarity=pb.SIMILARITY_TFIDF,
                         groups=(("g0", outcomes),), **kw)


# --- response shape and numbers ------------------------------------------------------------


def test_response_shape_follows_the_request(engine: Engine) -> None:
    request = group_request(groups=(("gB", (True, False, True)), ("gA", (False, True))))
    # Interleave the groups: request order must survive, groups in first-appearance order.
    order = [0, 3, 1, 4, 2]
    trajectories = [request.trajectories[i] for i in order]
    del request.trajectories[:]
    request.trajectories.extend(trajectories)
    response = run(engine.compute(request))

    assert response.request_id == "req-1" and not response.replayed
    assert [t.trajectory_id for t in response.trajectories] == [
        t.trajectory_id for t in request.trajectories
    ]
    for sent, got in zip(request.trajectories, response.trajectories, strict=True):
        n = len(sent.steps)
        assert len(got.advantages) == len(got.episode_advantages) == n
        assert len(got.step_advantages) == len(got.returns) == n
        # A = episode + omega * step with omega = 1 (paper preset)
        np.testing.assert_allclose(
            got.advantages, np.add(got.episode_advantages, got.step_advantages), atol=1e-12
        )
    assert [g.group_id for g in response.groups] == ["gB", "gA"]
    gb, ga = response.groups
    assert (gb.task_id, gb.num_trajectories, gb.num_successes) == ("gB", 3, 2)
    assert gb.num_steps == sum(len(t.steps) for t in request.trajectories if t.group_id == "gB")
    assert (ga.num_trajectories, ga.num_successes) == (2, 1)
    assert math.isclose(gb.success_rate, 2 / 3) and math.isclose(ga.success_rate, 0.5)
    assert gb.success_rate_source == pb.SUCCESS_RATE_SOURCE_BATCH
    assert not gb.success_rate_fallback
    assert gb.weight_success > 1.0 > gb.weight_failure
    t = response.timing
    assert t.num_steps == sum(len(tr.steps) for tr in request.trajectories)
    assert t.num_unique_states == 3 and t.num_encoded_states == 0
    assert t.total_ns >= t.featurize_ns + t.compute_ns > 0


def test_numbers_equal_the_core(engine: Engine) -> None:
    request = group_request(groups=(("g0", (True, False, False, True, False)),
                                    ("g1", (False, True, True))))
    request.trajectories[2].steps[0].invalid_action = True
    response = run(engine.compute(request))

    batch = StepBatch.from_trajectories(request_to_core(request).trajectories)
    cfg = resolve_config("paper")
    expected = compute_advantages(batch, cfg, features=tfidf_features(batch))
    offsets = batch.traj_offsets
    for i, got in enumerate(response.trajectories):
        rows = slice(offsets[i], offsets[i + 1])
        assert list(got.advantages) == expected.advantages[rows].tolist()
        assert list(got.episode_advantages) == expected.episode_advantages[rows].tolist()
        assert list(got.step_advantages) == expected.step_advantages[rows].tolist()
        assert list(got.returns) == expected.returns[rows].tolist()
    assert [g.success_rate for g in response.groups] == expected.groups.success_rate.tolist()


def test_resolved_config_has_every_field_and_applies_overrides(engine: Engine) -> None:
    request = group_request(preset="paper", gamma=0.5, scope=pb.SCOPE_SAME_STEP, psc_range=0.1)
    resolved = run(engine.compute(request)).resolved_config
    assert resolved.preset == "paper"
    assert resolved.gamma == 0.5 and resolved.scope == pb.SCOPE_SAME_STEP
    assert math.isclose(resolved.psc_beta, 0.1 / 0.2310585786300049)
    assert resolved.tau == 0.1 and resolved.similarity == pb.SIMILARITY_TFIDF
    expected = resolve_config("paper", {"gamma": 0.5, "scope": "SAME_STEP", "psc_range": 0.1})
    assert resolved == config_to_proto(expected)


def test_default_preset_takes_the_engine_default_similarity(store: MemoryStore) -> None:
    engine = Engine(store=store, embedder=None, default_similarity=Similarity.EXACT,
                    compute_threads=1)
    try:
        request = group_request(preset="")
        response = run(engine.compute(request))
    finally:
        engine.close()
    assert response.resolved_config.preset == "proxmo"
    assert response.resolved_config.similarity == pb.SIMILARITY_EXACT


def test_empty_request_id_gets_a_fresh_uuid(engine: Engine) -> None:
    first = run(engine.compute(_history_request("", (True, False))))
    second = run(engine.compute(_history_request("", (True, False))))
    assert len(first.request_id) == 36 and first.request_id != second.request_id
    assert not first.replayed and not second.replayed


def test_precomputed_similarity(engine: Engine) -> None:
    vectors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0]]
    request = pb.ComputeAdvantagesRequest(request_id="emb", config=pb.EstimatorConfig(
        preset="paper", similarity=pb.SIMILARITY_PRECOMPUTED))
    for k, ok in enumerate((True, False, True)):
        request.trajectories.append(trajectory(f"t{k}", "g", [0.0, 0.0, float(ok)],
                                               embeddings=vectors))
    response = run(engine.compute(request))
    assert response.resolved_config.similarity == pb.SIMILARITY_PRECOMPUTED
    assert response.groups[0].mean_effective_neighbors > 1.0
    assert any(v != 0.0 for t in response.trajectories for v in t.step_advantages)


# --- HISTORY ------------------------------------------------------------------------------


def test_history_first_batch_then_decayed(engine: Engine, store: MemoryStore) -> None:
    first = run(engine.compute(_history_request("a", (True, False, False, True))))
    (g,) = first.groups
    assert g.success_rate == 0.5  # no history: the batch estimate
    assert g.success_rate_source == pb.SUCCESS_RATE_SOURCE_HISTORY
    assert not g.success_rate_fallback and not first.replayed

    second = run(engine.compute(_history_request("b", (True, True, True, False))))
    expected = (RHO * 2 + 3) / (RHO * 4 + 4)
    assert math.isclose(second.groups[0].success_rate, expected, rel_tol=1e-12)
    assert second.groups[0].success_rate != 0.75  # not the batch estimate


def test_replay_reports_first_p_and_does_not_double_count(
    engine: Engine, store: MemoryStore
) -> None:
    run(engine.compute(_history_request("a", (True, False, False, True))))
    first_b = run(engine.compute(_history_request("b", (True, True, True, False))))
    replay_b = run(engine.compute(_history_request("b", (True, True, True, False))))
    assert replay_b.replayed and not first_b.replayed
    assert replay_b.groups[0].success_rate == first_b.groups[0].success_rate
    assert list(replay_b.trajectories) == list(first_b.trajectories)
    (record,) = run(store.get(["g0"]))
    assert (record.updates, record.total_trials, record.total_successes) == (2, 8, 5)


def test_dry_run_writes_nothing(engine: Engine, store: MemoryStore) -> None:
    run(engine.compute(_history_request("a", (True, False, False, True))))
    dry_request = _history_request("dry", (True, True, True, False))
    dry_request.dry_run = True
    dry = run(engine.compute(dry_request))
    # It reports the p a real update would give ...
    assert math.isclose(dry.groups[0].success_rate, (RHO * 2 + 3) / (RHO * 4 + 4))
    # ... and wrote nothing: neither the task nor the request id.
    (record,) = run(store.get(["g0"]))
    assert (record.updates, record.total_trials) == (1, 4)
    real = run(engine.compute(_history_request("dry", (True, True, True, False))))
    assert not real.replayed


def test_groups_of_one_task_are_one_update(engine: Engine, store: MemoryStore) -> None:
    request = group_request(
        request_id="shared", preset="proxmo", similarity=pb.SIMILARITY_TFIDF,
        groups=(("g0", (True, False)), ("g1", (True, True, True, False))),
        task_ids={"g0": "task", "g1": "task"},
    )
    response = run(engine.compute(request))
    # One update of "task" with S_b = 4, N_b = 6: both groups use the task's p.
    assert [g.success_rate for g in response.groups] == [4 / 6, 4 / 6]
    assert [g.task_id for g in response.groups] == ["task", "task"]
    (record,) = run(store.get(["task"]))
    assert (record.updates, record.total_trials, record.total_successes) == (1, 6, 4)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_redis_falls_back_to_the_batch_estimate() -> None:
    async def scenario() -> pb.ComputeAdvantagesResponse:
        store = RedisStore(f"redis://127.0.0.1:{_closed_port()}/0", timeout_s=0.2)
        engine = Engine(store=store, embedder=None, default_similarity=Similarity.TFIDF,
                        compute_threads=1)
        try:
            return await engine.compute(_history_request("down", (True, False, False, False)))
        finally:
            engine.close()
            await store.close()

    response = run(scenario())
    (g,) = response.groups
    assert g.success_rate == 0.25  # the batch estimate
    assert g.success_rate_source == pb.SUCCESS_RATE_SOURCE_BATCH
    assert g.success_rate_fallback
    assert len(response.trajectories) == 4


def test_history_not_used_when_psc_is_off(engine: Engine, store: MemoryStore) -> None:
    response = run(engine.compute(_history_request("off", (True, False), psc_enabled=False)))
    assert response.groups[0].success_rate_source == pb.SUCCESS_RATE_SOURCE_BATCH
    assert not response.groups[0].success_rate_fallback
    assert run(store.scan("", 100, ""))[0] == []


# --- deadlines ----------------------------------------------------------------------------


def test_expired_deadline_does_nothing(engine: Engine, store: MemoryStore) -> None:
    with pytest.raises(DeadlineExceeded) as caught:
        run(engine.compute(_history_request("late", (True, False)),
                           deadline=time.monotonic() - 0.001))
    assert caught.value.grpc_code == "DEADLINE_EXCEEDED"
    assert run(store.scan("", 100, ""))[0] == []


def test_deadline_passing_mid_request_never_writes_the_store(
    engine: Engine, store: MemoryStore
) -> None:
    # Converting and validating 20 000 steps takes far longer than 1 ms, so the deadline
    # passes before the store stage.
    request = _history_request("slow", (True, False))
    request.trajectories[0].steps.extend([pb.Step(state=f"s{k}") for k in range(10_000)])
    request.trajectories[1].steps.extend([pb.Step(state=f"s{k}") for k in range(10_000)])
    big = Engine(store=store, embedder=None, default_similarity=Similarity.TFIDF,
                 limits=Limits(max_steps_per_trajectory=20_000), compute_threads=1)
    try:
        with pytest.raises(DeadlineExceeded):
            run(big.compute(request, deadline=time.monotonic() + 0.001))
    finally:
        big.close()
    assert run(store.scan("", 100, ""))[0] == []


def test_generous_deadline_succeeds(engine: Engine) -> None:
    response = run(engine.compute(group_request(), deadline=time.monotonic() + 60))
    assert len(response.trajectories) == 4


# --- limits -------------------------------------------------------------------------------


def test_too_many_trajectories_default_limit(engine: Engine) -> None:
    request = pb.ComputeAdvantagesRequest(trajectories=[
        pb.Trajectory(trajectory_id=str(i), group_id="g", steps=[pb.Step()]) for i in range(4097)
    ])
    with pytest.raises(LimitExceeded) as caught:
        run(engine.compute(request))
    assert str(caught.value) == "trajectories: 4097 trajectories exceed the limit of 4096"
    assert (caught.value.grpc_code, caught.value.http_status) == ("RESOURCE_EXHAUSTED", 413)


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        (Limits(max_steps_per_trajectory=3), "trajectories[2].steps"),
        (Limits(max_total_steps=10), "trajectories"),
        (Limits(max_state_chars=20), "trajectories[0].steps[0].state"),
        (Limits(max_embedding_dim=2), "trajectories[1].steps[1].state_embedding"),
    ],
)
def test_limits_name_the_field(store: MemoryStore, limits: Limits, field: str) -> None:
    request = group_request(groups=(("g0", (True, False, True, False)),))
    request.trajectories[1].steps[1].state_embedding.extend([0.1, 0.2, 0.3])
    engine = Engine(store=store, embedder=None, default_similarity=Similarity.TFIDF,
                    limits=limits, compute_threads=1)
    try:
        with pytest.raises(LimitExceeded) as caught:
            run(engine.compute(request))
    finally:
        engine.close()
    assert caught.value.field == field
    assert "exceed the limit of" in str(caught.value)


# --- metrics and presets ------------------------------------------------------------------


def test_metrics(store: MemoryStore) -> None:
    registry = CollectorRegistry()
    engine = Engine(store=store, embedder=None, default_similarity=Similarity.TFIDF,
                    registry=registry, compute_threads=1)
    try:
        run(engine.compute(group_request(groups=(("g0", (True, False)), ("g1", (True,))))))
        run(engine.compute(_history_request("h", (True, False, True))))
    finally:
        engine.close()
    value = registry.get_sample_value
    assert value("proxmo_trajectories_processed_total") == 6
    assert value("proxmo_groups_processed_total") == 3
    assert value("proxmo_rows_processed_total") == 2 + 3 + 2 + 2 + 3 + 4
    assert value("proxmo_success_rate_source_total", {"source": "batch"}) == 2
    assert value("proxmo_success_rate_source_total", {"source": "history"}) == 1
    assert value("proxmo_engine_stage_duration_seconds_count", {"stage": "compute"}) == 2
    assert value("proxmo_engine_stage_duration_seconds_count", {"stage": "store"}) == 1


def test_server_presets(engine: Engine) -> None:
    presets = {p.name: p for p in engine.server_presets()}
    assert set(presets) == {"proxmo", "paper", "proxmo-rl", "gigpo", "grpo", "rloo", "hgpo",
                            "graphgpo"}
    assert presets["proxmo"].config.success_rate_source == pb.SUCCESS_RATE_SOURCE_HISTORY
    assert presets["proxmo"].config.similarity == pb.SIMILARITY_TFIDF  # the engine default
    assert presets["gigpo"].config.estimator == pb.ESTIMATOR_GIGPO
    assert all(p.description for p in presets.values())


# --- the event loop stays responsive --------------------------------------------------------


def test_event_loop_keeps_running_during_a_large_compute(engine: Engine) -> None:
    request = pb.ComputeAdvantagesRequest(request_id="big",
                                          config=pb.EstimatorConfig(preset="paper"))
    for i in range(200):
        traj = request.trajectories.add(trajectory_id=f"t{i}", group_id=f"g{i % 16}")
        for k in range(100):
            traj.steps.add(state=f"you see item {k % 37} near room {i % 11}",
                           reward=float(k == 99 and i % 2))

    async def scenario() -> tuple[int, float]:
        gaps: list[float] = []

        async def ticker() -> None:  # what a health check needs: the loop to get a turn
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.001)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await engine.compute(request)
        task.cancel()
        return len(gaps), max(gaps)

    ticks, longest_gap = run(scenario())
    # All CPU work runs on the pool; generous bounds: the test machine is shared.
    assert ticks >= 5
    assert longest_gap < 0.5
