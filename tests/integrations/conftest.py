"""Trainer-integration tests: a real ``proxmo-server`` (from the main .venv) on free ports.

``test_verl.py``, ``test_verl_fork.py`` and ``test_trl.py`` need the trainers venv
(``make trainers-venv``; run them with ``make test-trainers``). Where verl, TRL or ray is not
importable (the main venv),
those files are not collected at all, so the main ``pytest`` run stays green and fast;
``test_rows.py`` (numpy and the client only) runs in both.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The server lives in the main venv (the trainers venv has only the client).
SERVER_BIN = Path(os.environ.get("PROXMO_SERVER_BIN", ROOT / ".venv" / "bin" / "proxmo-server"))
REDIS_URL = os.environ.get("PROXMO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

collect_ignore = [
    name
    for name, module in (("test_verl.py", "verl"), ("test_trl.py", "trl"),
                         ("test_verl_fork.py", "ray"))
    if importlib.util.find_spec(module) is None
]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Server:
    """One ``proxmo-server`` subprocess (no encoder: TF-IDF similarity; Redis store)."""

    def __init__(self, log_path: Path) -> None:
        if not SERVER_BIN.exists():
            pytest.skip(f"{SERVER_BIN} is missing: build the main venv first (make venv)")
        grpc_port, http_port = _free_ports(2)
        self.target = f"127.0.0.1:{grpc_port}"
        self.namespace = f"proxmo-integrations-{time.monotonic_ns()}"
        self._http = f"http://127.0.0.1:{http_port}"
        self._log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [str(SERVER_BIN), "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
             "--http-port", str(http_port), "--encoder-backend", "none",
             "--compute-threads", "1", "--redis-url", REDIS_URL, "--namespace", self.namespace],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self._http}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        self._log.flush()
        return self._log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    proc = Server(tmp_path_factory.mktemp("proxmo-server") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
