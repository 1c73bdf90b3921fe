"""A real ``proxmo-server`` subprocess on free ports, shared by the server, hardening, encoder,
deploy and soak suites (and ``tests/soak/loadgen.py --spawn``).

``ProxmoServer(args, log_path)`` starts ``proxmo-server --host 127.0.0.1 --grpc-port G
--http-port H *args`` at once (offline: no model download), its stdout and stderr going to
``log_path`` so failures can quote it. ``wait_ready()`` returns once the server is warm: ``/readyz``
200 and gRPC health SERVING (the two flip a moment apart). ``stop()``: SIGTERM, SIGKILL after a
timeout, the exit status.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc

from support.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
SERVER_BIN = Path(sys.executable).parent / "proxmo-server"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_MESSAGE_LIMITS = [("grpc.max_receive_message_length", 256 << 20),
                   ("grpc.max_send_message_length", 256 << 20)]
Server = TypeVar("Server", bound="ProxmoServer")


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name{labels...}`` in Prometheus text ``text`` (0 when absent);
    labels not given may have any value."""
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
        if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
            return float(value)
    return 0.0


class ProxmoServer:
    """One ``proxmo-server`` subprocess on 127.0.0.1 (started by the constructor, not waited
    for). ``ports`` = (gRPC, HTTP), free ones by default; ``env`` is added to this process's
    environment and the offline variables; ``new_session``: the server leads its own session
    and process group (pgid = its pid), as under systemd or ``tini -g``. Usable as a context
    manager (``stop()`` on exit)."""

    def __init__(self, args: Sequence[str], log_path: Path, *,
                 env: Mapping[str, str] | None = None, ports: Sequence[int] = (),
                 new_session: bool = False) -> None:
        self.grpc_port, self.http_port = ports or free_ports(2)
        self.log_path = log_path
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self._channel: grpc.Channel | None = None
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [str(SERVER_BIN), "--host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
             "--http-port", str(self.http_port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, **OFFLINE_ENV, **(env or {})}, start_new_session=new_session,
        )

    def __enter__(self: Server) -> Server:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 60.0, *, ca: Path | None = None) -> None:
        """Waits until ``/readyz`` answers 200 and gRPC health is SERVING; raises with the log
        if the process exits or the timeout passes. ``ca``: the server speaks TLS on both
        ports, with a certificate for ``localhost`` signed by ``ca``."""
        if ca is None:
            http_url, verify = self.http_url, True
            channel = grpc.insecure_channel(self.grpc_target)
        else:
            http_url = f"https://localhost:{self.http_port}"
            verify = ssl.create_default_context(cafile=str(ca))
            channel = grpc.secure_channel(f"localhost:{self.grpc_port}",
                                          grpc.ssl_channel_credentials(ca.read_bytes()))
        health = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.logs()}")
                try:
                    ready = httpx.get(f"{http_url}/readyz", verify=verify,
                                      timeout=1).status_code == 200
                    if ready and health.Check(health_pb2.HealthCheckRequest(), timeout=1).status \
                            == health_pb2.HealthCheckResponse.SERVING:
                        return
                except (httpx.HTTPError, grpc.RpcError):
                    pass
                time.sleep(0.05)
        finally:
            channel.close()
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.logs()}")

    @property
    def channel(self) -> grpc.Channel:
        """A plaintext channel to the gRPC port (256 MiB message limits), closed by ``stop()``."""
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.grpc_target, options=_MESSAGE_LIMITS)
        return self._channel

    @property
    def stub(self) -> pb_grpc.CreditAssignmentServiceStub:
        return pb_grpc.CreditAssignmentServiceStub(self.channel)

    def health(self, service: str = "") -> int:
        """The gRPC health status of ``service`` ("" = the whole server)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of ``/metrics`` (0 when absent)."""
        return metric_value(httpx.get(f"{self.http_url}/metrics", timeout=5).text, name,
                            **labels)

    def logs(self) -> str:
        """Everything the server printed so far."""
        self._log.flush()
        return self.log_path.read_text()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the server drains), SIGKILL if still running after ``timeout`` s; the exit
        status. Idempotent."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)
