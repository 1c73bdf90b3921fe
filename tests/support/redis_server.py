"""A private ``redis-server`` that a test may SIGKILL and restart on the same port, and small
Redis helpers shared by the store, hardening and soak suites."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from support.ports import free_ports

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for ``localhost`` / ``127.0.0.1`` and its key (PEM files)."""

    cert: Path
    key: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()


class RedisServer:
    """A private redis-server that a test may SIGKILL and restart on the same port.

    Persistence is append-only with fsync on every write, so a restart after SIGKILL keeps every
    acknowledged write (a production Redis holding training history should run with AOF too);
    without it a restart would lose the history itself, not just the outage's updates. Optional
    ``password`` (requirepass) and ``tls`` (the plain port is then closed and only the TLS port
    listens).
    """

    def __init__(self, directory: Path, *, password: str = "",
                 tls: Certificate | None = None) -> None:
        [self.port] = free_ports(1)
        self.password = password
        self.tls = tls
        self._dir = directory
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.cert}"

    def client(self) -> redis.Redis:
        kwargs: dict[str, object] = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
        if self.password:
            kwargs["password"] = self.password
        if self.tls is not None:
            kwargs.update(ssl=True, ssl_ca_certs=str(self.tls.cert))
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def start(self) -> None:
        command: list[str] = [REDIS_SERVER, "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "yes", "--appendfsync", "always",
                              "--dir", str(self._dir), "--logfile", ""]
        if self.tls is None:
            command += ["--port", str(self.port)]
        else:
            command += ["--port", "0", "--tls-port", str(self.port),
                        "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                        "--tls-ca-cert-file", str(self.tls.cert), "--tls-auth-clients", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline or self._process.poll() is not None:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; open connections just die."""
        if self._process is not None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=5)
            self._process = None


def delete_namespace(url: str, namespace: str) -> None:
    """Deletes every key of ``namespace`` (tasks, index, request claims)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
