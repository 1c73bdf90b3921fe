"""No compute worker outlives its server (issue: orphaned forkserver and workers).

A real ``proxmo-server`` with worker processes, in its own process group (as systemd, honcho,
foreman or ``tini -g`` run it), is ended each way a server ends: SIGTERM to its pid, SIGTERM to
its whole group, SIGINT to its group (Ctrl-C), SIGKILL of the server alone. Within a few seconds
of the server's exit no process of its group may remain (read from /proc: the group id survives
re-parenting, so an orphan still counts).

``make test`` runs the two ways that used to leave orphans (SIGTERM to the group, SIGKILL of the
server); ``make soak`` (``PROXMO_SOAK=1``) runs all four.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from support.proxmo_server import ProxmoServer

WORKERS = 1
GRACE_S = 5.0
SOAK = os.environ.get("PROXMO_SOAK") == "1"
WAYS = ["sigterm-group", "sigkill-pid", *(["sigterm-pid", "sigint-group"] if SOAK else [])]


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(entry))
    return members


def _wait_gone(pgid: int, timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        left = group_members(pgid)
        if not left:
            return []
        time.sleep(0.1)
    return group_members(pgid)


@pytest.mark.parametrize("how", WAYS)
def test_workers_end_with_the_server(tmp_path: Path, how: str) -> None:
    server = ProxmoServer(["--compute-workers", str(WORKERS), "--encoder-backend", "none"],
                          tmp_path / "server.log", new_session=True)
    try:
        server.wait_ready(timeout=120)
        pgid = server.proc.pid
        # the server, the fork server and the workers (and perhaps a resource tracker)
        assert len(group_members(pgid)) >= 2 + WORKERS, server.logs()
        if how == "sigterm-pid":
            os.kill(pgid, signal.SIGTERM)
        elif how == "sigterm-group":
            os.killpg(pgid, signal.SIGTERM)
        elif how == "sigint-group":
            os.killpg(pgid, signal.SIGINT)
        else:
            os.kill(pgid, signal.SIGKILL)
        server.proc.wait(timeout=60)
        left = _wait_gone(pgid, GRACE_S)
        assert not left, (how, left, server.logs()[-3000:])
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        for pid in group_members(server.proc.pid):  # never leave one behind for the next test
            os.kill(pid, signal.SIGKILL)
        server.stop()
