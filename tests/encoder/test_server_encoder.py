"""The encoder through real servers: two ``proxmo-server`` subprocesses on real sockets with the
torch-cpu encoder and the shared Redis embedding cache. ENCODER similarity works end to end,
GetServerInfo reports the backend, and the second server encodes nothing the first one did."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from proxmo.encoder.cache import shared_cache_key
from proxmo_client.v1 import proxmo_pb2 as pb
from support.proxmo_server import ProxmoServer
from support.redis_server import delete_namespace

from .alfworld_states import alfworld_groups
from .conftest import delete_keys

PACKAGED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
FP16_ADVANTAGE_ATOL = 2e-4  # see test_embedder.py: fp16 shared-cache values, measured ~1e-5


class Server(ProxmoServer):
    """A server with the torch-cpu encoder on one thread."""

    def __init__(self, log_path: Path, *args: str) -> None:
        super().__init__(["--compute-threads", "1", "--encoder-backend", "torch-cpu",
                          "--encoder-threads", "1", *args], log_path)


@pytest.fixture
def two_servers(tmp_path: Path, redis_url: str) -> Iterator[tuple[Server, Server, str]]:
    namespace = f"enc-test-{uuid.uuid4().hex[:8]}"
    args = ("--redis-url", redis_url, "--namespace", namespace, "--embedding-cache-redis",
            "--similarity", "encoder")
    servers = [Server(tmp_path / f"server-{i}.log", *args) for i in range(2)]
    try:
        for server in servers:
            server.wait_ready(timeout=180)
        yield servers[0], servers[1], namespace
    finally:
        for server in servers:
            server.stop()
        delete_namespace(redis_url, namespace)


def encoder_request(nonce: str, similarity: int) -> pb.ComputeAdvantagesRequest:
    request = pb.ComputeAdvantagesRequest(
        dry_run=True,  # both servers then read the same (empty) success-rate history
        config=pb.EstimatorConfig(preset="proxmo", similarity=similarity),
    )
    for g, group in enumerate(alfworld_groups(2, 4, 6, seed=11)):
        for k, states in enumerate(group):
            trajectory = request.trajectories.add(
                trajectory_id=f"g{g}t{k}", group_id=f"g{g}", task_id=f"task-{g}-{nonce}"
            )
            for t, state in enumerate(states):
                reward = 1.0 if t == len(states) - 1 and k % 2 == 0 else 0.0
                trajectory.steps.add(state=f"{state} [{nonce}]", reward=reward)
    return request


def advantages(response: pb.ComputeAdvantagesResponse) -> np.ndarray:
    return np.array([a for t in response.trajectories for a in t.advantages])


@pytest.mark.slow
def test_encoder_similarity_and_shared_cache_across_two_servers(
    two_servers: tuple[Server, Server, str], redis_url: str, nonce: str
) -> None:
    first, second, _ = two_servers
    info = first.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).encoder
    assert (info.backend, info.device, info.dtype) == ("torch-cpu", "cpu", "float32")
    assert (info.dimension, info.model_sha256, info.ready) == (384, PACKAGED_SHA256, True)
    assert info.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert list(info.fallback_reasons) == []

    request = encoder_request(nonce, pb.SIMILARITY_ENCODER)
    distinct = len({s.state for t in request.trajectories for s in t.steps})
    try:
        fresh = first.stub.ComputeAdvantages(request, timeout=120)
        assert fresh.timing.num_encoded_states == distinct
        assert fresh.timing.num_unique_states == distinct

        encoded_before = second.metric("proxmo_encoder_texts_encoded_total")
        hits_before = second.metric("proxmo_encoder_cache_hits_total", cache="redis")
        shared = second.stub.ComputeAdvantages(request, timeout=120)
        # The second server encoded nothing: every state came from the first one's work.
        assert shared.timing.num_encoded_states == 0
        assert second.metric("proxmo_encoder_texts_encoded_total") == encoded_before
        assert second.metric("proxmo_encoder_cache_hits_total", cache="redis") == (
            hits_before + distinct
        )
        np.testing.assert_allclose(
            advantages(shared), advantages(fresh), rtol=0, atol=FP16_ADVANTAGE_ATOL
        )
        # ENCODER similarity really shapes the step term: TF-IDF gives other advantages.
        tfidf = first.stub.ComputeAdvantages(
            encoder_request(nonce, pb.SIMILARITY_TFIDF), timeout=120
        )
        assert np.abs(advantages(tfidf) - advantages(fresh)).max() > 1e-3
    finally:
        ours = {
            shared_cache_key(PACKAGED_SHA256, "float32", s.state)
            for t in request.trajectories for s in t.steps
        }
        delete_keys(redis_url, sorted(ours))
