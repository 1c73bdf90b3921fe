"""ENCODER similarity through the Engine with the real sentence encoder (torch CPU, MiniLM)."""

from __future__ import annotations

import numpy as np
import pytest
from proxmo.convert import request_to_core
from proxmo.core.batch import StepBatch
from proxmo.core.config import Similarity, resolve_config
from proxmo.core.estimators import compute_advantages
from proxmo.core.step import dense_features
from proxmo.engine import Engine
from proxmo.store.memory import MemoryStore
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import group_request, run

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # loads MiniLM on CPU (seconds)


def test_encoder_features_match_the_core_and_are_cached() -> None:
    from proxmo.encoder import EncoderSettings, create_embedder

    request = group_request(preset="paper", similarity=pb.SIMILARITY_ENCODER, tau=0.05,
                            groups=(("g0", (True, False, True, False)),))

    async def scenario() -> tuple[pb.ComputeAdvantagesResponse, pb.ComputeAdvantagesResponse,
                                  np.ndarray]:
        embedder = await create_embedder(EncoderSettings(backend="torch-cpu"))
        engine = Engine(store=MemoryStore(), embedder=embedder,
                        default_similarity=Similarity.ENCODER, compute_threads=1)
        try:
            first = await engine.compute(request)
            second = await engine.compute(request)
            batch = StepBatch.from_trajectories(request_to_core(request).trajectories)
            vectors = await embedder.embed(batch.states)
            return first, second, vectors
        finally:
            engine.close()
            await embedder.close()

    first, second, vectors = run(scenario())
    assert first.resolved_config.similarity == pb.SIMILARITY_ENCODER
    assert first.timing.num_unique_states == 3
    assert first.timing.num_encoded_states == 3  # cold cache
    assert second.timing.num_encoded_states == 0  # every state from the LRU

    batch = StepBatch.from_trajectories(request_to_core(request).trajectories)
    cfg = resolve_config("paper", {"similarity": "ENCODER", "tau": 0.05})
    expected = compute_advantages(batch, cfg, features=dense_features(vectors, batch.row_state))
    got = np.concatenate([list(t.step_advantages) for t in first.trajectories])
    np.testing.assert_allclose(got, expected.step_advantages, rtol=0, atol=1e-12)
    assert np.any(got != 0.0)


def test_encoder_with_history_matches_the_core_and_stores_once() -> None:
    """ENCODER + HISTORY (the default preset): the components are computed from the encoder's
    vectors in their own stage, checked, and only then is the store written."""
    from proxmo.encoder import EncoderSettings, create_embedder

    request = group_request(request_id="enc-hist", preset="proxmo",
                            similarity=pb.SIMILARITY_ENCODER,
                            groups=(("g0", (True, False, True, False)),))
    store = MemoryStore()

    async def scenario() -> tuple[pb.ComputeAdvantagesResponse, np.ndarray]:
        embedder = await create_embedder(EncoderSettings(backend="torch-cpu"))
        engine = Engine(store=store, embedder=embedder,
                        default_similarity=Similarity.ENCODER, compute_threads=1)
        try:
            answer = await engine.compute(request)
            batch = StepBatch.from_trajectories(request_to_core(request).trajectories)
            return answer, await embedder.embed(batch.states)
        finally:
            engine.close()
            await embedder.close()

    answer, vectors = run(scenario())
    assert answer.groups[0].success_rate_source == pb.SUCCESS_RATE_SOURCE_HISTORY
    assert answer.groups[0].success_rate == 0.5  # first batch, prior 0
    batch = StepBatch.from_trajectories(request_to_core(request).trajectories)
    cfg = resolve_config("proxmo", {"similarity": "ENCODER"})
    expected = compute_advantages(batch, cfg, features=dense_features(vectors, batch.row_state),
                                  group_success_rate=np.array([0.5]))
    got = np.concatenate([list(t.advantages) for t in answer.trajectories])
    np.testing.assert_allclose(got, expected.advantages, rtol=0, atol=1e-12)
    [record] = run(store.get(["g0"]))
    assert record.updates == 1
    assert answer.timing.featurize_ns > 0 and answer.timing.compute_ns > 0
