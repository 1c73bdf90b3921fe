"""Scale-out against real processes: one client balanced over replicas, three replicas on one
Redis staying consistent (retries landing elsewhere, concurrent batches of one task, the shared
encoder cache), and a Sentinel failover under load through the servers with no failed RPC."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from proxmo.server.config import SettingsError, load_settings
from proxmo_client import ProxmoClient
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc
from support.redis_server import delete_namespace

from server.conftest import ServerProcess, StartServer, make_request

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"
HISTORY = {"success_rate_source": pb.SUCCESS_RATE_SOURCE_HISTORY}
LIGHT = ("--compute-workers", "0")  # several servers share this machine's cores


def _ok_calls(server: ServerProcess, rpc: str) -> float:
    return server.metric("proxmo_requests_total", transport="grpc", rpc=rpc, code="OK")


def test_one_client_spreads_its_calls_over_two_replicas(start_server: StartServer) -> None:
    replicas = [start_server(*LIGHT, wait=False), start_server(*LIGHT, wait=False)]
    for replica in replicas:
        replica.wait_ready()
    with ProxmoClient([r.grpc_target for r in replicas]) as client:
        for _ in range(20):
            client.compute_advantages(make_request(groups=2))
    calls = [_ok_calls(r, "ComputeAdvantages") for r in replicas]
    assert sum(calls) == 20
    assert min(calls) >= 5, f"calls not spread over the replicas: {calls}"


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"replicas-{uuid.uuid4().hex[:10]}"
    yield name
    delete_namespace(SHARED_REDIS_URL, name)


def test_three_replicas_on_one_redis_agree(start_server: StartServer, namespace: str) -> None:
    """The fast slice (TF-IDF replicas); ``make soak`` runs it with the encoder and the shared
    embedding cache (tests/soak/test_scale_out_soak.py)."""
    check_replicas_agree(start_server, namespace, encoder=False)


def check_replicas_agree(start_server: StartServer, namespace: str, *, encoder: bool) -> None:
    """Three replicas on one Redis: retries on another replica, concurrent batches of the same
    tasks, identical rates everywhere; with ``encoder``, replicas 0 and 2 load the encoder and
    share the Redis embedding cache, which must serve replica 2 cold."""
    common = (*LIGHT, "--redis-url", SHARED_REDIS_URL, "--namespace", namespace)
    encoding = ("--embedding-cache-redis", "--encoder-backend", "torch-cpu") if encoder else ()
    replicas = [start_server(*common, *encoding, encoder=encoder, wait=False),
                start_server(*common, wait=False),
                start_server(*common, *encoding, encoder=encoder, wait=False)]
    for replica in replicas:
        replica.wait_ready(180)
    stubs = [r.stub for r in replicas]
    if encoder:
        _check_shared_encoder_cache(replicas)
    _check_consistent_history(stubs, namespace)


def _check_shared_encoder_cache(replicas: list[ServerProcess]) -> None:
    """Replica 2 encodes nothing it is sent after replica 0 encoded the same states."""
    stubs = [r.stub for r in replicas]
    nonce = uuid.uuid4().hex
    encoded = make_request(groups=2, task_prefix=f"enc-{nonce}", similarity=pb.SIMILARITY_ENCODER)
    for trajectory in encoded.trajectories:
        for step in trajectory.steps:
            step.state = f"{step.state} [{nonce}]"
    warm = stubs[0].ComputeAdvantages(encoded, timeout=120)
    assert warm.timing.num_encoded_states > 0
    encoded_before = replicas[2].metric("proxmo_encoder_texts_encoded_total")  # its warm-up's
    cold = stubs[2].ComputeAdvantages(encoded, timeout=120)
    assert cold.timing.num_encoded_states == 0
    assert replicas[2].metric("proxmo_encoder_texts_encoded_total") == encoded_before
    assert replicas[2].metric("proxmo_encoder_cache_hits_total", cache="redis") >= (
        warm.timing.num_encoded_states)



def _check_consistent_history(stubs: list[pb_grpc.CreditAssignmentServiceStub],
                              namespace: str) -> None:
    # Retries landing on another replica: each request is counted once, the retry is a replay
    # with the first application's p's.
    tasks = [f"shared-{g}" for g in range(3)]
    sent = 0
    for i in range(6):
        request = make_request(groups=3, request_id=f"{namespace}-retry-{i}", task_prefix="shared",
                               **HISTORY)
        first = stubs[i % 3].ComputeAdvantages(request, timeout=30)
        retry = stubs[(i + 1) % 3].ComputeAdvantages(request, timeout=30)
        assert not first.replayed and retry.replayed
        assert [g.success_rate for g in retry.groups] == [g.success_rate for g in first.groups]
        sent += 1

    # Concurrent batches of the same tasks on all three replicas at once.
    def send(i: int) -> pb.ComputeAdvantagesResponse:
        request = make_request(groups=3, request_id=f"{namespace}-burst-{i}",
                               task_prefix="shared", **HISTORY)
        return stubs[i % 3].ComputeAdvantages(request, timeout=60)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, range(24)))
    assert all(not a.replayed for a in answers)
    sent += len(answers)

    per_replica = [
        stub.GetSuccessRates(pb.GetSuccessRatesRequest(task_ids=tasks), timeout=10).tasks
        for stub in stubs
    ]
    assert per_replica[0] == per_replica[1] == per_replica[2]
    # make_request: 4 trajectories per group, one group per task.
    assert [t.total_trials for t in per_replica[0]] == [4 * sent] * 3
    assert [t.updates for t in per_replica[0]] == [sent] * 3


@pytest.mark.parametrize(("argv", "field"), [
    (["--redis-cluster"], "redis_cluster"),
    (["--redis-cluster", "--redis-url", "redis://a:1", "--redis-sentinels", "s:1",
      "--redis-sentinel-master", "m"], "redis_sentinels"),
    (["--redis-sentinels", "s:1"], "redis_sentinel_master"),
    (["--redis-sentinels", "nohost", "--redis-sentinel-master", "m"], "redis_sentinels"),
    (["--redis-cluster", "--redis-url", "redis://a:1", "--redis-wait-replicas", "1"],
     "redis_wait_replicas"),
    (["--redis-wait-replicas", "1"], "redis_wait_replicas"),
    (["--store-max-tasks", "-1"], "store_max_tasks"),
    (["--store-request-ttl-s", "0"], "store_request_ttl_s"),
])
def test_store_topology_settings_are_checked(argv: list[str], field: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(argv, {})
    assert str(error.value).startswith(f"{field}:")


def test_sentinel_settings_need_no_redis_url() -> None:
    settings = load_settings(["--redis-sentinels", "10.0.0.1:26379,10.0.0.2:26379",
                              "--redis-sentinel-master", "mymaster",
                              "--redis-wait-replicas", "1"], {})
    assert settings.redis_url == "" and settings.redis_wait_replicas == 1
