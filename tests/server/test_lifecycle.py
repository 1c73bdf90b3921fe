"""Start-up (NOT_SERVING until warm), the encoder server, SIGTERM drain, INTERNAL errors."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

import grpc
import httpx
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proxmo.core.config import Similarity
from proxmo.engine import Engine
from proxmo.server.admission import Phase
from proxmo.server.config import Settings
from proxmo.server.grpc_service import build_grpc_server, set_serving
from proxmo.server.metrics import ServerMetrics
from proxmo.server.rest import create_app
from proxmo.server.runtime import Runtime
from proxmo.store.base import ApplyResult, TaskUpdate
from proxmo.store.memory import MemoryStore
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc

from .conftest import StartServer, free_ports, make_request, unique

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_encoder_server_starts_not_serving_then_serves(start_server: StartServer) -> None:
    """The default server (encoder on CPU): ports answer at once, health NOT_SERVING and
    /readyz 503 until the encoder is loaded and warm, then SERVING with ENCODER as default."""
    proc = start_server(wait=False, encoder=True)
    seen_health: list[int] = []
    seen_ready: list[int] = []
    info_while_starting: list[str] = []
    end = time.monotonic() + 120
    while time.monotonic() < end and SERVING not in seen_health:
        assert proc.proc.poll() is None, proc.logs()
        try:
            seen_health.append(proc.health())
            seen_ready.append(httpx.get(f"{proc.http_url}/readyz", timeout=2).status_code)
            assert httpx.get(f"{proc.http_url}/livez", timeout=2).status_code == 200
            if seen_health[-1] == NOT_SERVING and not info_while_starting:
                try:
                    proc.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=2)
                except grpc.RpcError as error:
                    info_while_starting.append(error.code().name)
        except (grpc.RpcError, httpx.HTTPError):
            pass  # not listening yet
        time.sleep(0.05)
    assert seen_health and seen_health[0] == NOT_SERVING and seen_health[-1] == SERVING
    assert seen_health == sorted(seen_health, key=lambda s: s == SERVING)  # one transition
    assert 503 in seen_ready
    assert info_while_starting == ["UNAVAILABLE"]
    assert proc.health("proxmo.v1.CreditAssignmentService") == SERVING
    proc.wait_ready()

    info = proc.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert info.default_similarity == pb.SIMILARITY_ENCODER
    assert pb.SIMILARITY_ENCODER in info.similarities
    assert info.encoder.backend == "torch-cpu" and info.encoder.device == "cpu"
    assert info.encoder.dimension == 384 and info.encoder.ready
    assert info.encoder.model_id.endswith("all-MiniLM-L6-v2")
    assert len(info.encoder.model_sha256) == 64
    response = proc.stub.ComputeAdvantages(make_request(dry_run=True), timeout=60)
    assert response.resolved_config.similarity == pb.SIMILARITY_ENCODER
    assert response.timing.num_encoded_states > 0
    assert "default similarity: ENCODER" in proc.logs()
    assert proc.stop() == 0


def _watch_health(target: str, seen: list[int], stop: threading.Event) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for answer in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60):
                seen.append(answer.status)
                if stop.is_set():
                    return
        except grpc.RpcError:
            return  # the server went away


def test_sigterm_drains_in_flight_work_and_exits_0(start_server: StartServer) -> None:
    proc = start_server("--grace-period-s", "30", "--max-total-steps", "400000")
    statuses: list[int] = []
    done_watching = threading.Event()
    watcher = threading.Thread(target=_watch_health,
                               args=(proc.grpc_target, statuses, done_watching))
    watcher.start()
    prefix = unique("drain")
    # ~200k rows: seconds of work on the server's one compute thread.
    in_flight = proc.stub.ComputeAdvantages.future(
        make_request(groups=512, per_group=8, steps=50, task_prefix=prefix, request_id=prefix),
        timeout=120)
    end = time.monotonic() + 30
    while proc.metric("proxmo_inflight_requests") != 1 and time.monotonic() < end:
        time.sleep(0.01)
    proc.signal()

    response = in_flight.result()  # finished, not cut off
    assert response.request_id == prefix and len(response.trajectories) == 512 * 8
    assert proc.proc.wait(timeout=60) == 0
    done_watching.set()
    watcher.join(timeout=10)
    assert statuses[0] == SERVING and NOT_SERVING in statuses
    logs = proc.logs()
    # The request was still running when the drain began, and it completed afterwards.
    assert logs.index("draining (stop signal)") < logs.index(f"request done request_id={prefix}")
    assert logs.rstrip().endswith("stopped")
    with pytest.raises(grpc.RpcError) as caught:
        proc.stub.ComputeAdvantages(make_request(), timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


class _BrokenStore(MemoryStore):
    """A store with a bug: the kind of unexpected exception INTERNAL is for."""

    async def apply(self, request_id: str, updates: Sequence[TaskUpdate], *, half_life: float,
                    prior: float, dry_run: bool) -> ApplyResult:
        raise KeyError("secret-internal-detail at /srv/proxmo/store.py:42")


def test_unexpected_errors_are_internal_with_a_request_id_and_no_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        from prometheus_client import CollectorRegistry

        grpc_port, http_port = free_ports(2)
        settings = Settings(host="127.0.0.1", grpc_port=grpc_port, http_port=http_port,
                            encoder_backend="none")
        registry = CollectorRegistry()
        store = _BrokenStore()
        runtime = Runtime(settings=settings, store=store, metrics=ServerMetrics(registry),
                          git_sha="")
        engine = Engine(store=store, embedder=None, default_similarity=Similarity.TFIDF,
                        registry=registry, compute_threads=1)
        runtime.attach(engine, None)
        server, health_servicer = await build_grpc_server(runtime)
        await server.start()
        runtime.lifecycle.phase = Phase.SERVING
        await set_serving(health_servicer)
        try:
            request = make_request(request_id="req-boom")  # HISTORY: reaches the store
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await pb_grpc.CreditAssignmentServiceStub(channel).ComputeAdvantages(
                        request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            assert caught.value.details() == "internal error (request_id=req-boom)"

            transport = httpx.ASGITransport(app=create_app(runtime, registry))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answer = await client.post("/v1/advantages",
                                           content=json_format.MessageToJson(request))
            assert answer.status_code == 500
            assert answer.json() == {"error": {
                "code": "INTERNAL", "message": "internal error (request_id=req-boom)",
                "request_id": "req-boom"}}
            assert "secret-internal-detail" not in answer.text
        finally:
            await server.stop(None)
            engine.close()

    with caplog.at_level(logging.ERROR, logger="proxmo.server"):
        asyncio.run(scenario())
    failures = [r for r in caplog.records if r.getMessage() == "request failed: internal error"]
    assert len(failures) == 2
    assert all(getattr(r, "request_id", "") == "req-boom" for r in failures)
    assert all(r.exc_info and "secret-internal-detail" in str(r.exc_info[1]) for r in failures)
