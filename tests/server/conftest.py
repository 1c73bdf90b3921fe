"""Real servers for the server tests: ``proxmo-server`` subprocesses on free ports.

``server`` is one session-wide server with default settings except ``--encoder-backend none``
(loading torch costs seconds; the encoder has its own module). ``start_server(...)`` starts
extra servers with special settings and stops them after the test.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from proxmo_client.v1 import proxmo_pb2 as pb
from support.ports import free_ports  # noqa: F401 (for the tests)
from support.proxmo_server import (  # noqa: F401 (OFFLINE_ENV, ROOT: for the tests)
    OFFLINE_ENV,
    ROOT,
    ProxmoServer,
)
from support.states import STATES

BIN = Path(sys.executable).parent
CLI_BIN = BIN / "proxmo"



class ServerProcess(ProxmoServer):
    """A ``ProxmoServer`` with the test defaults: one compute thread, no encoder unless
    ``encoder`` (loading torch costs seconds); ``args`` come after them and win."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 encoder: bool = False, ports: Sequence[int] = ()) -> None:
        defaults = ["--compute-threads", "1", *([] if encoder else ["--encoder-backend", "none"])]
        super().__init__([*defaults, *args], log_path, env=env, ports=ports)


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
    with ServerProcess([], tmp_path_factory.mktemp("server") / "server.log") as proc:
        proc.wait_ready()
        yield proc


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
