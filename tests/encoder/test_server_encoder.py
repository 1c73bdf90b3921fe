"""The encoder through real servers: two ``proxmo-server`` subprocesses on real sockets with the
torch-cpu encoder and the shared Redis embedding cache. ENCODER similarity works end to end,
GetServerInfo reports the backend, and the second server encodes nothing the first one did."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import redis
from proxmo.encoder.embedder import shared_cache_key
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc

from .alfworld_states import alfworld_groups
from .conftest import delete_keys

ROOT = Path(__file__).resolve().parents[2]
SERVER_BIN = Path(sys.executable).parent / "proxmo-server"
PACKAGED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
FP16_ADVANTAGE_ATOL = 2e-4  # see test_embedder.py: fp16 shared-cache values, measured ~1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, log_path: Path, *args: str) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(SERVER_BIN), "--host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
             "--http-port", str(self.http_port), "--compute-threads", "1",
             "--encoder-backend", "torch-cpu", "--encoder-threads", "1", *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.stub = pb_grpc.CreditAssignmentServiceStub(self.channel)

    def wait_ready(self, timeout: float = 180.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.logs()}")
            try:
                url = f"http://127.0.0.1:{self.http_port}/readyz"
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.logs()}")

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            series, value = line.rsplit(" ", 1)
            metric, _, label_text = series.partition("{")
            found = dict(p.split("=", 1) for p in label_text.rstrip("}").split(",") if p)
            if metric == name and all(found.get(k, "").strip('"') == v for k, v in labels.items()):
                return float(value)
        return 0.0

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def two_servers(tmp_path: Path, redis_url: str) -> Iterator[tuple[Server, Server, str]]:
    namespace = f"enc-test-{uuid.uuid4().hex[:8]}"
    args = ("--redis-url", redis_url, "--namespace", namespace, "--embedding-cache-redis",
            "--similarity", "encoder")
    servers = [Server(tmp_path / f"server-{i}.log", *args) for i in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        yield servers[0], servers[1], namespace
    finally:
        for server in servers:
            server.stop()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        client.close()
        delete_keys(redis_url, keys)


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
