"""The compose stack, run for real (``make deploy-smoke``): the CPU image built offline, started
with redis and prometheus on a local Docker engine (deploy/docker/stack.sh), checked through the
containers. Skipped unless ``PROXMO_DEPLOY_ENV`` names the ``build/deploy.env`` that
``make deploy-up`` writes.

The tests run in file order and share the stack: the Redis and down/up checks build on the
totals the earlier batches stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proxmo.core.config import Similarity
from proxmo.engine import Engine
from proxmo.store.memory import MemoryStore
from proxmo_client import ProxmoClient
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc
from support.states import STATES

from ..conftest import ROOT

ENV_FILE = os.environ.get("PROXMO_DEPLOY_ENV", "")
if not ENV_FILE:
    pytest.skip("the compose stack is not up: `make deploy-smoke` runs these",
                allow_module_level=True)

RUN = uuid.uuid4().hex[:8]  # task ids of this run, so a kept volume never mixes runs
TASKS = [f"smoke-{RUN}-{g}" for g in range(3)]
PER_GROUP = 4


def _stack_env() -> dict[str, str]:
    """The ``export NAME=value`` lines of build/deploy.env."""
    env = {}
    for line in Path(ENV_FILE).read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            env[name] = shlex.split(value)[0] if value else ""
    return env


STACK = _stack_env()
GRPC_TARGET = f"127.0.0.1:{STACK['PROXMO_GRPC_PORT']}"
HTTP_URL = f"http://127.0.0.1:{STACK['PROXMO_HTTP_PORT']}"
PROMETHEUS_URL = f"http://127.0.0.1:{STACK['PROXMO_PROMETHEUS_PORT']}"


def docker(*args: str, timeout: float = 180) -> str:
    """``docker ARGS`` with the stack's environment, from the repository root; its stdout."""
    result = subprocess.run(["docker", *args], env={**os.environ, **STACK}, cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout


def container_id(service: str) -> str:
    return docker("compose", "ps", "-aq", service).strip()


def wait_serving(timeout: float = 180) -> None:
    with ProxmoClient(GRPC_TARGET) as client:
        client.wait_until_serving(timeout=timeout)
    deadline = time.monotonic() + timeout
    while httpx.get(f"{HTTP_URL}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "proxmo-cpu never became ready"
        time.sleep(0.5)


def history_batch(request_id: str) -> pb.ComputeAdvantagesRequest:
    """A batch that adds PER_GROUP trials to each task of TASKS (HISTORY: stored in Redis)."""
    request = pb.ComputeAdvantagesRequest(
        request_id=request_id,
        config=pb.EstimatorConfig(success_rate_source=pb.SUCCESS_RATE_SOURCE_HISTORY))
    for g, task in enumerate(TASKS):
        for k in range(PER_GROUP):
            trajectory = request.trajectories.add(trajectory_id=f"t{g}-{k}", group_id=f"g{g}",
                                                  task_id=task)
            for t in range(4):
                trajectory.steps.add(state=STATES[(g + k * t) % len(STATES)],
                                     reward=float(t == 3 and k % 2 == 0))
    return request


def totals() -> dict[str, int]:
    """total_trials of each task, as the server reads them back from Redis."""
    with ProxmoClient(GRPC_TARGET) as client:
        answer = client.get_success_rates(TASKS, timeout=30)
    stored = {t.task_id: t.total_trials for t in answer.tasks}
    return {task: stored.get(task, 0) for task in TASKS}


def send(count: int, prefix: str) -> None:
    with grpc.insecure_channel(GRPC_TARGET) as channel:
        stub = pb_grpc.CreditAssignmentServiceStub(channel)
        for n in range(count):
            stub.ComputeAdvantages(history_batch(f"{prefix}-{RUN}-{n}"), timeout=60)


def test_every_container_is_healthy_and_the_server_is_not_root() -> None:
    for service in ("proxmo-cpu", "redis", "prometheus"):
        state = json.loads(docker("inspect", container_id(service)))[0]["State"]
        assert state["Status"] == "running", (service, state)
        assert state["Health"]["Status"] == "healthy", (service, state["Health"])
    assert docker("compose", "exec", "-T", "proxmo-cpu", "id", "-u").strip() == "10001"
    # The image's own HEALTHCHECK (liveness), run as the engine runs it, answers 0 too.
    image = json.loads(docker("image", "inspect", "proxmo-local/proxmo:cpu"))[0]
    assert image["Config"]["Healthcheck"]["Test"] == ["CMD", "proxmo-probe", "/livez"]
    assert image["Config"]["User"] == "10001:10001"
    docker("compose", "exec", "-T", "proxmo-cpu", "proxmo-probe", "/livez")


def test_grpc_health_serving() -> None:
    with grpc.insecure_channel(GRPC_TARGET) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_compute_advantages_equals_the_in_process_engine() -> None:
    request = history_batch("")
    request.config.Clear()
    request.config.similarity = pb.SIMILARITY_TFIDF
    request.config.success_rate_source = pb.SUCCESS_RATE_SOURCE_BATCH
    with grpc.insecure_channel(GRPC_TARGET) as channel:
        remote = pb_grpc.CreditAssignmentServiceStub(channel).ComputeAdvantages(request,
                                                                                timeout=60)
    engine = Engine(store=MemoryStore(), embedder=None, default_similarity=Similarity.TFIDF,
                    compute_threads=1)
    try:
        local = asyncio.run(engine.compute(request))
    finally:
        engine.close()
    assert len(remote.trajectories) == len(request.trajectories)
    assert [json_format.MessageToDict(t) for t in remote.trajectories] == \
        [json_format.MessageToDict(t) for t in local.trajectories]
    assert [json_format.MessageToDict(g) for g in remote.groups] == \
        [json_format.MessageToDict(g) for g in local.groups]
    assert remote.resolved_config == local.resolved_config


def test_prometheus_scrapes_proxmo() -> None:
    deadline = time.monotonic() + 60
    while True:
        targets = httpx.get(f"{PROMETHEUS_URL}/api/v1/targets", timeout=5).json()
        proxmo = [t for t in targets["data"]["activeTargets"] if t["labels"]["job"] == "proxmo"]
        if proxmo and proxmo[0]["health"] == "up":
            break
        assert time.monotonic() < deadline, proxmo
        time.sleep(1)
    query = httpx.get(f"{PROMETHEUS_URL}/api/v1/query", params={"query": 'up{job="proxmo"}'},
                      timeout=5).json()
    assert query["data"]["result"][0]["value"][1] == "1"


def test_success_rates_survive_a_redis_restart() -> None:
    send(3, "before-restart")
    assert totals() == {t: 3 * PER_GROUP for t in TASKS}
    docker("compose", "restart", "redis")  # SIGTERM: Redis writes its AOF, then loads it again
    docker("compose", "up", "-d", "--no-build", "--wait", "--wait-timeout", "120")
    assert totals() == {t: 3 * PER_GROUP for t in TASKS}
    send(1, "after-restart")  # the server reconnects and keeps counting
    assert totals() == {t: 4 * PER_GROUP for t in TASKS}


def test_success_rates_survive_down_and_up_with_volumes_kept() -> None:
    before = totals()
    assert before == {t: 4 * PER_GROUP for t in TASKS}
    docker("compose", "down", "--timeout", "40")  # containers gone, named volumes kept
    assert not docker("compose", "ps", "-aq").strip()
    docker("compose", "up", "-d", "--no-build", "--wait", "--wait-timeout", "300", timeout=360)
    wait_serving()
    assert totals() == before


def test_sigterm_during_requests_loses_nothing() -> None:
    """SIGTERM to proxmo-cpu while clients send: every answered batch is stored exactly once,
    every refused one (UNAVAILABLE / CANCELLED while draining) not at all."""
    before = totals()
    outcomes: list[str] = []

    async def client(c: int) -> None:
        async with grpc.aio.insecure_channel(GRPC_TARGET) as channel:
            stub = pb_grpc.CreditAssignmentServiceStub(channel)
            for n in range(400):
                try:
                    await stub.ComputeAdvantages(history_batch(f"sigterm-{RUN}-{c}-{n}"),
                                                 timeout=30)
                except grpc.aio.AioRpcError as error:
                    outcomes.append(error.code().name)
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        return  # the server is going away
                    continue
                outcomes.append("OK")

    async def load() -> None:
        clients = asyncio.gather(*(client(c) for c in range(4)))
        while outcomes.count("OK") < 8:
            await asyncio.sleep(0.05)
        # From inside the load: requests are in flight when the signal lands.
        await asyncio.to_thread(docker, "compose", "kill", "-s", "SIGTERM", "proxmo-cpu")
        await clients

    asyncio.run(load())
    codes = Counter(outcomes)
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, codes
    assert codes["OK"] >= 8 and codes["UNAVAILABLE"] >= 1, codes
    deadline = time.monotonic() + 60
    while json.loads(docker("inspect", container_id("proxmo-cpu")))[0]["State"]["Running"]:
        assert time.monotonic() < deadline, "proxmo-cpu did not exit after SIGTERM"
        time.sleep(0.5)
    state = json.loads(docker("inspect", container_id("proxmo-cpu")))[0]["State"]
    assert state["ExitCode"] == 0, state  # drained, not killed
    # Every answer the server computed reached its client: its own log's OK count is ours.
    logged = [json.loads(line.partition("| ")[2]) for line in
              docker("compose", "logs", "--no-color", "proxmo-cpu").splitlines()
              if f'"request_id":"sigterm-{RUN}-' in line]
    assert sum(entry["code"] == "OK" for entry in logged) == codes["OK"]
    assert "grace period over" not in docker("compose", "logs", "proxmo-cpu")
    docker("compose", "up", "-d", "--no-build", "--wait", "--wait-timeout", "300", timeout=360)
    wait_serving()
    assert totals() == {t: before[t] + PER_GROUP * codes["OK"] for t in TASKS}
