"""Start a real ``proxmo-server`` (from the main venv) on free ports, and stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SERVER_BIN = Path(os.environ.get("PROXMO_SERVER_BIN", ROOT / ".venv" / "bin" / "proxmo-server"))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ProxmoServer:
    """One ``proxmo-server`` subprocess with the CPU encoder (so ENCODER similarity works).

    ``redis_url`` empty: the in-memory success-rate store. Either way the example gives every
    run its own task ids, so histories (PSC with HISTORY) never leak between runs.
    """

    def __init__(self, log_path: Path, *, redis_url: str = "", namespace: str = "") -> None:
        if not SERVER_BIN.exists():
            raise FileNotFoundError(f"{SERVER_BIN} is missing: build the main venv (make venv)")
        grpc_port, http_port = _free_ports(2)
        self.target = f"127.0.0.1:{grpc_port}"
        self.http = f"http://127.0.0.1:{http_port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        args = [
            str(SERVER_BIN), "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--http-port", str(http_port), "--similarity", "tfidf",
            "--encoder-backend", "torch-cpu", "--encoder-threads", "1", "--compute-threads", "1",
        ]  # fmt: skip
        if redis_url:
            args += ["--redis-url", redis_url, "--namespace", namespace or "proxmo-examples"]
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )  # fmt: skip

    # Generous: on 2 cores shared by many jobs the encoder load alone took over 120 s.
    def wait_ready(self, timeout: float = 600.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxmo-server exited {self.proc.returncode}: {self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.http}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"proxmo-server not ready in {timeout} s: {self.logs()}")

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> ProxmoServer:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
