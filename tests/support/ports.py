"""Free loopback ports for the servers the tests and benches start."""

from __future__ import annotations

import socket


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
