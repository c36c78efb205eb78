"""Real Ray clusters for the launcher tests: `ray start --block` nodes on this machine, each with its own temp
folder and ports, stopped by the pid of their `ray start` process (never `ray stop`, which stops every Ray on the
machine).

Clusters run with RAY_AUTH_MODE=disabled (Ray 2.60 would otherwise require its token from every client). A
one-node cluster keeps every address on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's "local-only"
switch); a cluster that a second node joins needs the switch on (Ray refuses other nodes otherwise), so Ray
resolves the nodes' address to the machine's. The dashboard (job API) stays on 127.0.0.1 either way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _ports import free_ports  # tests/_ports.py

RAY = str(Path(sys.executable).parent / "ray")


def ray_env(multi_node: bool = False) -> dict[str, str]:
    """The environment of the `ray start` processes, the job submitter and the job (this interpreter's `python`)."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1" if multi_node else "0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    return env


def need_ray_default() -> None:
    """Skip without ray[default] (the dashboard serves the job API), except under CI=true, where it fails."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        reason = "Ray job submission needs ray[default] (pip install 'ray[default]')"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the Ray launcher tests must run)")
        pytest.skip(reason)


@dataclass
class RayNode:
    """One `ray start --block` process and what it started."""

    name: str
    proc: subprocess.Popen
    temp: Path
    log: Path
    extra: dict = field(default_factory=dict)

    def raylet_pid(self) -> int:
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if child.name() == "raylet":
                return child.pid
        raise AssertionError(f"node {self.name} has no raylet:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RayCluster:
    """A head node with its dashboard on 127.0.0.1, and any number of worker nodes joined to it."""

    def __init__(self, *, multi_node: bool = False) -> None:
        self.env = ray_env(multi_node)
        self.root = Path(tempfile.mkdtemp(prefix="uray-"))  # short: Ray puts unix sockets in it
        self.nodes: list[RayNode] = []
        self.gcs_port = 0
        self.dashboard = ""

    def _start(self, name: str, args: list[str]) -> RayNode:
        temp = self.root / name
        temp.mkdir(parents=True, exist_ok=True)
        log = temp.with_suffix(".log")
        agent, agent_grpc, runtime_env, metrics = free_ports(4)
        with open(log, "a") as out:
            proc = subprocess.Popen(
                [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
                 f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                 f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
                 "--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=200000000",
                 "--disable-usage-stats", *args],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )
        node = RayNode(name=name, proc=proc, temp=temp, log=log)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: float, resources: dict[str, float] | None = None) -> RayNode:
        self.gcs_port, dash, client = free_ports(3)
        head = self._start("head", [
            "--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--num-cpus={num_cpus}",
            *([f"--resources={json.dumps(resources)}"] if resources else []),
        ])
        self.dashboard = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 180
        while True:
            assert head.proc.poll() is None, head.log.read_text()
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2) as resp:
                    if resp.status == 200:
                        return head
            except urllib.error.HTTPError as err:
                if err.code == 401:  # token authentication on: the dashboard answers, and wants the token
                    return head
            except OSError:
                pass
            assert time.monotonic() < deadline, "the Ray dashboard did not answer in 180 s"
            time.sleep(0.5)

    def start_worker(self, name: str, num_cpus: float, resources: dict[str, float]) -> RayNode:
        """Join a node to the head; returns once the cluster lists one more alive node with ``resources``."""
        before = {n["node_id"] for n in self.alive_nodes()}
        node = self._start(name, [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}",
                                  f"--resources={json.dumps(resources)}"])
        deadline = time.monotonic() + 180
        while True:
            assert node.proc.poll() is None, node.log.read_text()[-3000:]
            new = [n for n in self.alive_nodes() if n["node_id"] not in before]
            if any(set(resources) <= set(n["resources_total"]) for n in new):
                node.extra["node_id"] = new[0]["node_id"]
                return node
            assert time.monotonic() < deadline, f"node {name} did not join in 180 s"
            time.sleep(0.5)

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes, from the dashboard's state API (node_id, resources_total, ...)."""
        with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes", timeout=10) as resp:
            nodes = json.loads(resp.read())["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def submit(cluster: RayCluster, config: Path, overrides: list[str], *, command: str = "train",
           cwd: Path, timeout: float = 180) -> str:
    """`uniemo submit ray` of ``config``; returns the job id."""
    import re

    proc = subprocess.run(
        [sys.executable, "-m", "uniemo", "submit", "ray", "--address", cluster.dashboard, "--config", str(config),
         "--command", command, *overrides],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, env=cluster.env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.search(r"submitted Ray job (\S+): run (\S+)", proc.stdout).group(1)


def follow(cluster: RayCluster, job_id: str, *, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`uniemo submit ray --logs JOB_ID`: the job's output until it ends."""
    return subprocess.run(
        [sys.executable, "-m", "uniemo", "submit", "ray", "--address", cluster.dashboard, "--logs", job_id],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, env=cluster.env,
    )
