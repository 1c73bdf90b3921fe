"""Real multi-process Redis topologies for the scale-out tests: a Redis Cluster (masters and
replicas, ``redis-cli --cluster create``) and a Sentinel-managed primary with replicas (sentinels
are ``redis-server --sentinel``, the same binary Debian's ``redis-sentinel`` links to).

Every process listens on 127.0.0.1 only, on ports <= 45535 (a cluster node also listens on
port + 10000 for its bus), and dies with ``stop()``.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from support.redis_server import REDIS_SERVER

REDIS_CLI = "redis-cli"


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def low_free_ports(n: int, *, bus: bool = False) -> list[int]:
    """n free ports in 20000..45535 (with ``bus``, port + 10000 is free too)."""
    found: list[int] = []
    while len(found) < n:
        port = random.randint(20000, 45535)
        if port in found or not _free(port) or (bus and not _free(port + 10000)):
            continue
        found.append(port)
    return found


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


class _Processes:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, port: int, *args: str) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [REDIS_SERVER, *args, "--port", str(port), "--bind", "127.0.0.1", "--dir",
             str(node_dir), "--save", "", "--logfile", str(node_dir / "log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=port, socket_timeout=0.5)
        try:
            _wait(client.ping, 10, f"redis on {port}")
        finally:
            client.close()

    def kill(self, port: int) -> None:
        """SIGKILL: no shutdown, no final save."""
        process = self.processes.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=5)

    def stop(self) -> None:
        for port in list(self.processes):
            self.kill(port)


class LocalCluster(_Processes):
    """``masters`` masters with ``replicas`` replicas each; ``url`` names the first node."""

    def __init__(self, directory: Path, *, masters: int = 3, replicas: int = 1) -> None:
        super().__init__(directory)
        self.ports = low_free_ports(masters * (1 + replicas), bus=True)
        self.replicas = replicas

    @property
    def url(self) -> str:
        """A running node (the first that still runs: a test may have killed some)."""
        return f"redis://127.0.0.1:{next(iter(self.processes))}/0"

    def start(self) -> None:
        for port in self.ports:
            self.spawn(port, "--cluster-enabled", "yes", "--cluster-config-file",
                       f"nodes-{port}.conf", "--cluster-node-timeout", "1000",
                       "--appendonly", "yes", "--appendfsync", "always")
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )
        _wait(self.healthy, 30, "cluster_state:ok on every node")
        _wait(self.replicas_synced, 30, "every replica in sync with its master")

    def replicas_synced(self) -> bool:
        """Every replica finished its sync (one that never did cannot be promoted)."""
        replicas = [r for rs in self.masters().values() for r in rs]
        for port in replicas:
            client = redis.Redis(port=port, socket_timeout=0.5, decode_responses=True)
            try:
                if client.info("replication").get("master_link_status") != "up":
                    return False
            finally:
                client.close()
        return len(replicas) == len(self.ports) - len(self.masters())

    def healthy(self) -> bool:
        """Every running node says cluster_state:ok and the slots are all served."""
        for port in self.processes:
            client = redis.Redis(port=port, socket_timeout=0.5)
            try:
                info = client.cluster("info")
            finally:
                client.close()
            if info.get("cluster_state") != "ok" or int(info["cluster_slots_ok"]) != 16384:
                return False
        return True

    def masters(self) -> dict[int, list[int]]:
        """Master port -> its replicas' ports, as the running nodes see it."""
        client = redis.Redis(port=next(iter(self.processes)), socket_timeout=0.5)
        try:
            nodes = client.cluster("nodes")
        finally:
            client.close()
        by_id = {info["node_id"]: int(address.split(":")[1].split("@")[0])
                 for address, info in nodes.items()}
        out: dict[int, list[int]] = {}
        for address, info in nodes.items():
            port = int(address.split(":")[1].split("@")[0])
            if "master" in info["flags"] and "fail" not in info["flags"]:
                out.setdefault(port, [])
        for info in nodes.values():
            if "slave" in info["flags"] and info["master_id"] in by_id:
                master = by_id[info["master_id"]]
                if master in out:
                    out[master].append(by_id[info["node_id"]])
        return out

    def kill_master_and_wait_for_promotion(self, master: int) -> int:
        """SIGKILLs ``master``; returns the port of the replica the cluster promoted."""
        replicas = self.masters()[master]
        self.kill(master)

        def promoted() -> bool:
            return any(r in self.masters() for r in replicas) and self.healthy()

        _wait(promoted, 30, f"a replica of {master} promoted")
        return next(r for r in replicas if r in self.masters())


class LocalSentinel(_Processes):
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels watching master ``name``."""

    def __init__(self, directory: Path, *, replicas: int = 1, sentinels: int = 3,
                 name: str = "proxmo-primary") -> None:
        super().__init__(directory)
        ports = low_free_ports(1 + replicas + sentinels)
        self.primary, self.replica_ports = ports[0], ports[1:1 + replicas]
        self.sentinel_ports = ports[1 + replicas:]
        self.name = name

    @property
    def sentinels(self) -> str:
        """The ``--redis-sentinels`` value."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def start(self) -> None:
        persistence = ("--appendonly", "yes", "--appendfsync", "always")
        self.spawn(self.primary, *persistence)
        for port in self.replica_ports:
            self.spawn(port, *persistence, "--replicaof", "127.0.0.1", str(self.primary))
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"sentinel monitor {self.name} 127.0.0.1 {self.primary} 2\n"
                f"sentinel down-after-milliseconds {self.name} 1000\n"
                f"sentinel failover-timeout {self.name} 5000\n"
                f"sentinel parallel-syncs {self.name} 1\n"
            )
            self.spawn(port, str(conf), "--sentinel")

        def replicas_online() -> bool:
            client = redis.Redis(port=self.primary, socket_timeout=0.5)
            try:
                info = client.info("replication")
                states = [info[f"slave{i}"]["state"] for i in range(int(info["connected_slaves"]))]
                return states == ["online"] * len(self.replica_ports)
            finally:
                client.close()

        _wait(replicas_online, 20, "replicas online (synced)")

    def current_primary(self) -> int:
        """The primary's port as the first live sentinel reports it."""
        for port in self.sentinel_ports:
            if port not in self.processes:
                continue
            client = redis.Redis(port=port, socket_timeout=0.5, decode_responses=True)
            try:
                return int(client.sentinel_get_master_addr_by_name(self.name)[1])
            finally:
                client.close()
        raise RuntimeError("no sentinel running")

    def kill_primary_and_wait_for_failover(self) -> int:
        """SIGKILLs the primary; returns the port of the replica the sentinels promoted."""
        old = self.current_primary()
        self.kill(old)

        def promoted() -> bool:
            port = self.current_primary()
            if port == old:
                return False
            client = redis.Redis(port=port, socket_timeout=0.5)
            try:
                return client.info("replication")["role"] == "master"
            finally:
                client.close()

        _wait(promoted, 30, "the sentinels' failover")
        return self.current_primary()
