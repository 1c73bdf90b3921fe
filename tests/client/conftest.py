"""Fixtures of the client tests: a real gRPC server on a free loopback port (scripted_server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc
from scripted_server import RunningServer, ScriptedServicer


@pytest.fixture
def scripted_server() -> Iterator[RunningServer]:
    servicer = ScriptedServicer()
    health_servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CreditAssignmentServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield RunningServer(f"127.0.0.1:{port}", servicer, health_servicer)
    finally:
        server.stop(grace=None).wait()
