"""docs/algorithm.md section 5a at the engine: accepted ranges, and the last guard against a
non-finite answer (INTERNAL, logged with the request id, counted, nothing stored).

Validation keeps every accepted request finite, so the guard can only be reached through a bug.
These tests play that bug: they let the real ``prepare`` validate a request and then scale its
rewards past the accepted range (what a validation hole would let through), and run the real
Engine (threads, a real MemoryStore) on it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from proxmo import engine as engine_module
from proxmo.core.batch import MAX_ABS_REWARD
from proxmo.core.config import Similarity, resolve_config
from proxmo.core.estimators import combine, compute_components
from proxmo.engine import (
    Engine,
    Prepared,
    check_finite_components,
    check_finite_result,
)
from proxmo.errors import InvalidArgument, NonFiniteResult
from proxmo.store.memory import MemoryStore
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import group_request, run, trajectory

_REAL_PREPARE = engine_module.prepare


def _inflating_prepare(factor: float) -> Any:
    """The real stage 1, then every reward times ``factor`` (past validation)."""
    real = _REAL_PREPARE

    def prepare(*args: Any, **kwargs: Any) -> Prepared:
        prepared = real(*args, **kwargs)
        batch = dataclasses.replace(prepared.batch, rewards=prepared.batch.rewards * factor)
        return dataclasses.replace(prepared, batch=batch)

    return prepare


@pytest.mark.parametrize("preset", ["proxmo", "paper", "gigpo", "grpo", "rloo"])
def test_a_non_finite_result_is_internal_counted_logged_and_stores_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, preset: str
) -> None:
    store = MemoryStore()
    registry = CollectorRegistry()
    engine = Engine(store=store, embedder=None, default_similarity=Similarity.TFIDF,
                    registry=registry, compute_threads=1)
    # rewards of 1e308 overflow the returns, the group statistics and the advantages
    monkeypatch.setattr(engine_module, "prepare", _inflating_prepare(1e308))
    request = group_request(request_id="nonfinite-1", preset=preset,
                            groups=(("g0", (True, False, True)),), similarity=pb.SIMILARITY_TFIDF)
    try:
        with caplog.at_level(logging.ERROR, logger="proxmo.engine"), \
                pytest.raises(NonFiniteResult) as raised:
            run(engine.compute(request))
        # nothing stored: the HISTORY update comes after the check (proxmo preset)
        assert run(store.get(["g0"])) == []
        # the same request id is not claimed: a corrected retry is a first application
        monkeypatch.setattr(engine_module, "prepare", _inflating_prepare(1.0))
        answer = run(engine.compute(request))
        assert not answer.replayed
    finally:
        engine.close()
    error = raised.value
    assert error.grpc_code == "INTERNAL" and error.http_status == 500
    assert "non-finite" in error.message and "nothing was stored" in error.message
    assert registry.get_sample_value("proxmo_nonfinite_results_total") == 1
    [record] = [r for r in caplog.records if r.name == "proxmo.engine"]
    assert getattr(record, "request_id", None) == "nonfinite-1"


def test_the_components_check_runs_before_the_encoder_path_store() -> None:
    """ENCODER + HISTORY: the components are computed in their own stage after the encoder and
    checked before the store; PRECOMPUTED stands in for the vectors here (same code path once
    the features exist)."""
    trajs = [trajectory(f"t{i}", "g", [1.0, float(i % 2)], embeddings=[[1.0, 0.0], [0.0, 1.0]])
             for i in range(3)]
    request = pb.ComputeAdvantagesRequest(request_id="r", trajectories=trajs,
                                          config=pb.EstimatorConfig(preset="proxmo"))
    prepared = _REAL_PREPARE(request, engine_module.Limits(), Similarity.PRECOMPUTED, None)
    assert prepared.components is None
    bad = dataclasses.replace(prepared, batch=dataclasses.replace(
        prepared.batch, rewards=prepared.batch.rewards * 1e308))
    with pytest.raises(NonFiniteResult):
        engine_module.with_components(bad, embeddings=None, deadline=None)
    good = engine_module.with_components(prepared, embeddings=None, deadline=None)
    assert good.components is not None


def test_components_bound_covers_every_success_rate() -> None:
    """Finite components whose combination could overflow for some p are refused up front."""
    cfg = resolve_config("paper", {"similarity": "EXACT"})
    request = group_request(groups=(("g0", (True, False)),))
    prepared = _REAL_PREPARE(request, engine_module.Limits(), Similarity.TFIDF, None)
    components = compute_components(prepared.batch, cfg)
    check_finite_components(components, cfg, prepared.batch)
    huge = dataclasses.replace(components, episode_base=np.full_like(components.episode_base,
                                                                     1.75e308))
    with pytest.raises(NonFiniteResult, match=r"trajectories\[0\]\.steps\[0\]"):
        check_finite_components(huge, cfg, prepared.batch)


def test_final_check_names_the_row() -> None:
    cfg = resolve_config("paper", {"similarity": "EXACT"})
    request = group_request(groups=(("g0", (True, False)),))
    prepared = _REAL_PREPARE(request, engine_module.Limits(), Similarity.TFIDF, None)
    result = combine(prepared.batch, cfg, compute_components(prepared.batch, cfg))
    check_finite_result(result, prepared.batch)
    advantages = result.advantages.copy()
    advantages[-1] = np.nan
    with pytest.raises(NonFiniteResult, match=r"trajectories\[1\]\.steps\[2\]"):
        check_finite_result(dataclasses.replace(result, advantages=advantages), prepared.batch)


@pytest.mark.parametrize(
    ("reward", "field"),
    [(MAX_ABS_REWARD * 1.0000001, "trajectories[0].steps[1].reward"),
     (-1e308, "trajectories[0].steps[1].reward")],
)
def test_rewards_beyond_the_range_are_invalid(engine: Engine, reward: float, field: str) -> None:
    request = pb.ComputeAdvantagesRequest(
        trajectories=[trajectory("a", "g", [0.0, reward]), trajectory("b", "g", [0.0, 1.0])])
    with pytest.raises(InvalidArgument) as raised:
        run(engine.compute(request))
    assert raised.value.field == field
    # at the bound itself: accepted, finite
    request.trajectories[0].steps[1].reward = -MAX_ABS_REWARD
    answer = run(engine.compute(request))
    assert all(np.isfinite(t.advantages).all() for t in answer.trajectories)


def test_history_prior_shrinks_a_tasks_first_batch(engine: Engine, store: MemoryStore) -> None:
    """docs/algorithm.md section 2: no stored history: S = N = 0, so p = (S_b + a)/(N_b + 2a)."""
    request = group_request(request_id="prior-1", preset="proxmo",
                            groups=(("g0", (True, True, True, False)),),
                            similarity=pb.SIMILARITY_TFIDF, history_prior=1.0)
    answer = run(engine.compute(request))
    assert answer.groups[0].success_rate == (3 + 1) / (4 + 2)
    [record] = run(store.get(["g0"]))
    assert (record.decayed_successes, record.decayed_trials) == (3.0, 4.0)
