"""The Python client against the real server: retries keep the request id, so a batch is
counted once in the success-rate history, across a server that is not up yet and a restart."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from proxmo_client import ProxmoClient
from proxmo_client.v1 import proxmo_pb2 as pb

from .conftest import StartServer, free_ports, make_request, unique

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_namespace() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping()
    except redis.RedisError as error:
        pytest.skip(f"no Redis at {REDIS_URL}: {error}")
    return unique("proxmo-test-retry")


def test_retry_across_start_and_restart_counts_the_batch_once(
    start_server: StartServer, redis_namespace: str
) -> None:
    ports = free_ports(2)
    args = ("--redis-url", REDIS_URL, "--namespace", redis_namespace)
    request = make_request(task_prefix="task", groups=2, per_group=4)  # no request_id: client's
    client = ProxmoClient(f"127.0.0.1:{ports[0]}", timeout=90, max_retries=100,
                          retry_backoff_s=0.05, retry_max_backoff_s=0.5)
    answers: list[pb.ComputeAdvantagesResponse] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            answers.append(client.compute_advantages(request))
        except BaseException as error:  # surfaced in the test thread below
            errors.append(error)

    # The client starts before the server exists: UNAVAILABLE (refused, then warming up)
    # is retried with the same request id until the server serves.
    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)
    first = start_server(*args, ports=ports, wait=False)
    caller.join(timeout=120)
    assert not errors, errors
    (answer,) = answers
    request_id = answer.request_id
    assert request_id and not answer.replayed
    assert first.metric("proxmo_requests_total", transport="grpc", rpc="ComputeAdvantages",
                        code="OK") == 1

    # The server restarts; the trainer re-sends the same batch (a lost reply): a replay.
    assert first.stop() == 0
    second = start_server(*args, ports=ports)
    again = client.compute_advantages(request, request_id=request_id)
    assert again.replayed and again.request_id == request_id
    assert [g.success_rate for g in again.groups] == [g.success_rate for g in answer.groups]

    history = client.get_success_rates(["task-0", "task-1"])
    assert [t.task_id for t in history.tasks] == ["task-0", "task-1"]
    for task in history.tasks:
        assert (task.updates, task.total_trials, task.total_successes) == (1, 4, 2)

    # A new request id is a new batch.
    client.compute_advantages(request)
    assert client.get_success_rates(["task-0"]).tasks[0].updates == 2
    assert client.reset_success_rates(all_tasks=True).deleted == 2
    client.close()
    assert second.stop() == 0
