"""Real servers for the server tests: ``proxmo-server`` subprocesses on free ports.

``server`` is one session-wide server with default settings except ``--encoder-backend none``
(loading torch costs seconds; the encoder has its own module). ``start_server(...)`` starts
extra servers with special settings and stops them after the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVER_BIN = BIN / "proxmo-server"
CLI_BIN = BIN / "proxmo"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

STATES = (
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1.",
    "You arrive at cabinet 1. The cabinet 1 is closed.",
    "You open the cabinet 1. In it, you see a soapbar 1 and a spraybottle 2.",
    "You arrive at countertop 1. On the countertop 1, you see a apple 2 and a mug 1.",
    "You pick up the mug 1 from the countertop 1.",
    "You arrive at sinkbasin 1. On the sinkbasin 1, you see nothing.",
)


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together, so the OS cannot hand one out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ServerProcess:
    """One ``proxmo-server`` subprocess; its stderr goes to ``log_path``."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 encoder: bool = False, ports: Sequence[int] = ()) -> None:
        self.grpc_port, self.http_port = ports or free_ports(2)
        self.log_path = log_path
        command = [str(SERVER_BIN), "--host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                   "--http-port", str(self.http_port), "--compute-threads", "1"]
        if not encoder:
            command += ["--encoder-backend", "none"]
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [*command, *args], stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, **OFFLINE_ENV, **(env or {})},
        )
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self._channel: grpc.Channel | None = None

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.http_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.logs()}")

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(
                self.grpc_target, options=[("grpc.max_receive_message_length", 256 << 20),
                                           ("grpc.max_send_message_length", 256 << 20)])
        return self._channel

    @property
    def stub(self) -> pb_grpc.CreditAssignmentServiceStub:
        return pb_grpc.CreditAssignmentServiceStub(self.channel)

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics (0 when absent)."""
        text = httpx.get(f"{self.http_url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            series, value = line.rsplit(" ", 1)
            metric, _, label_text = series.partition("{")
            if metric != name:
                continue
            found = dict(
                part.split("=", 1) for part in label_text.rstrip("}").split(",") if part
            )
            if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
                return float(value)
        return 0.0

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self._channel is not None:
            self._channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """``start_server(*args, wait=True, env=None, encoder=False, ports=())`` -> a started
    ServerProcess (ready unless ``wait=False``)."""
    started: list[ServerProcess] = []

    def start(*args: str, wait: bool = True, env: dict[str, str] | None = None,
              encoder: bool = False, ports: Sequence[int] = ()) -> ServerProcess:
        server = ServerProcess(args, tmp_path / f"server-{len(started)}.log", env, encoder,
                               ports)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One default server (no encoder) for the whole session; tests use unique ids."""
    proc = ServerProcess([], tmp_path_factory.mktemp("server") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


# --- requests ---------------------------------------------------------------------------------


def make_request(
    *,
    groups: int = 2,
    per_group: int = 4,
    steps: int = 3,
    request_id: str = "",
    task_prefix: str = "task",
    preset: str = "proxmo",
    dry_run: bool = False,
    **config: Any,
) -> pb.ComputeAdvantagesRequest:
    """A deterministic ALFWorld-like batch: group g's trajectory k succeeds when k is even."""
    request = pb.ComputeAdvantagesRequest(request_id=request_id, dry_run=dry_run,
                                          config=pb.EstimatorConfig(preset=preset, **config))
    for g in range(groups):
        for k in range(per_group):
            trajectory = request.trajectories.add(
                trajectory_id=f"g{g}-t{k}", group_id=f"g{g}", task_id=f"{task_prefix}-{g}")
            for t in range(steps):
                state = STATES[(t + k * (g + 1)) % len(STATES)] + f" step {t % 4}"
                reward = 1.0 if (t == steps - 1 and k % 2 == 0) else 0.0
                trajectory.steps.add(state=state, reward=reward, invalid_action=(t + k) % 7 == 3)
    return request


def unique(prefix: str) -> str:
    """A task/request id prefix no other test uses (the module server is shared)."""
    return f"{prefix}-{time.monotonic_ns()}"


def response_dict(response: pb.ComputeAdvantagesResponse) -> dict[str, Any]:
    """A response as the CLI prints it, without the timings (they differ run to run)."""
    from google.protobuf import json_format

    copy = pb.ComputeAdvantagesResponse()
    copy.CopyFrom(response)
    copy.ClearField("timing")
    out: dict[str, Any] = json.loads(json_format.MessageToJson(
        copy, always_print_fields_with_no_presence=True))
    out.pop("timing", None)
    return out
