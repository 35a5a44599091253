"""Real Redis Cluster processes on 127.0.0.1 for tests and benchmarks: 3 masters +
3 replicas made by `redis-cli --cluster create`, nothing persisted but nodes.conf."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from symram_vllm.serving.engine_process import free_port

START_TIMEOUT_S = 10.0


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.settimeout(0.5)
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def cluster_binaries() -> tuple[str, str] | None:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


class RedisClusterServers:
    """3 masters + 3 replicas on 127.0.0.1 made by `redis-cli --cluster create`, with a
    1 s cluster-node-timeout so a killed master fails over in about two seconds."""

    NODE_TIMEOUT_MS = 1000

    def __init__(self, workdir: Path, binary: str, cli: str, nodes: int = 6) -> None:
        self.workdir = workdir
        self.binary = binary
        self.cli = cli
        self.ports = [free_port() for _ in range(nodes)]
        # Cluster bus ports chosen too (the default port + 10000 may exceed 65535).
        self._bus = {p: free_port() for p in self.ports}
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def _start_node(self, port: int) -> None:
        node_dir = self.workdir / str(port)
        node_dir.mkdir(exist_ok=True)
        cmd = [
            self.binary, "--port", str(port), "--bind", "127.0.0.1",
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self._bus_port(port)),
            "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
            "--cluster-replica-validity-factor", "0",
            "--save", "", "--appendonly", "no", "--dir", str(node_dir),
            "--loglevel", "warning",
        ]
        with (node_dir / "redis.log").open("ab") as log:
            self.processes[port] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def _bus_port(self, port: int) -> int:
        return self._bus[port]

    def start(self) -> RedisClusterServers:
        for port in self.ports:
            self._start_node(port)
        self._wait(lambda: all(answers_ping(p) for p in self.ports), "nodes answering")
        create = [self.cli, "--cluster", "create",
                  *(f"127.0.0.1:{p}" for p in self.ports),
                  "--cluster-replicas", "1", "--cluster-yes"]
        out = subprocess.run(create, capture_output=True, timeout=60, check=False)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]!r}")
        self.wait_healthy()
        return self

    def info(self, port: int, section: str = "cluster info") -> dict[str, str]:
        out = subprocess.run([self.cli, "-p", str(port), *section.split()],
                             capture_output=True, timeout=5, check=False, text=True)
        pairs = (line.strip().split(":", 1) for line in out.stdout.splitlines() if ":" in line)
        return dict(p for p in pairs if len(p) == 2)

    def masters(self) -> list[int]:
        return [p for p in self.alive() if self.info(p, "info replication").get("role") == "master"]

    def alive(self) -> list[int]:
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says cluster_state:ok and sees 3 masters, each with a replica
        online (so a killed master has someone to fail over to)."""
        def healthy() -> bool:
            live = self.alive()
            if not all(self.info(p).get("cluster_state") == "ok" for p in live):
                return False
            masters = self.masters()
            if len(masters) != 3:
                return False
            if len(live) < len(self.ports):  # a node is down: no full replica set
                return True
            return all(int(self.info(m, "info replication").get("connected_slaves", 0)) >= 1
                       for m in masters)

        self._wait(healthy, "cluster state ok", timeout)

    def master_of(self, key: str) -> int:
        """Port of the master serving `key`'s slot now."""
        from redis.cluster import ClusterNode, RedisCluster

        client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in self.alive()])
        try:
            return int(client.get_node_from_key(key).port)
        finally:
            client.close()

    def wait_replicated(self, master: int, timeout: float = 10.0) -> None:
        """Until every replica of `master` has acknowledged all its writes."""
        def caught_up() -> bool:
            info = self.info(master, "info replication")
            offset = int(info.get("master_repl_offset", 0))
            replicas = [v for k, v in info.items() if k.startswith("slave")
                        and k[5:].isdigit()]
            acked = [int(dict(f.split("=", 1) for f in r.split(",")).get("offset", -1))
                     for r in replicas]
            return bool(acked) and min(acked) >= offset
        self._wait(caught_up, f"replicas of {master} to catch up", timeout)

    def kill(self, port: int) -> None:
        proc = self.processes[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def restart(self, port: int) -> None:
        """Start a killed node again (it rejoins from its nodes.conf, as a replica)."""
        self._start_node(port)
        self._wait(lambda: answers_ping(port), f"node {port} answering")

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)

    @staticmethod
    def _wait(predicate, what: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster: timed out waiting for {what}")
            time.sleep(0.05)
