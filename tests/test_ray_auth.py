"""Ray token authentication on a two-node cluster, as the launchers set it up.

Two Ray nodes on this machine, both on 127.0.0.1 (tests/test_multinode.py says why exactly that
address), run with RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN, the way launch/slurm.sbatch
and KubeRay start them. A job submitted with launch/submit.sh and the token runs: its driver joins the
cluster with icepop's own `icepop.ray.cluster.start` (cluster.address=auto, as `python -m icepop.train`
does) and runs a task on each node. Clients without the token, or with a wrong one, are refused by
every server they reach: the job API (launch/submit.sh itself, and plain HTTP), the GCS, both raylets
and the Ray Client server.

HOME is an empty folder for every process here, so no ~/.ray/auth_token of the user is read or written.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import test_multinode
from ray.core.generated import (
    gcs_service_pb2,
    gcs_service_pb2_grpc,
    node_manager_pb2,
    node_manager_pb2_grpc,
    ray_client_pb2,
    ray_client_pb2_grpc,
)
from test_multinode import RAY, SUBMIT, TwoNodes, is_loopback, listening_addresses

from icepop.ray.hosts import free_port

DRIVER = '''\
"""The job's driver: icepop's join of a running cluster (`icepop.ray.cluster.start` with the config of
the command line launch/submit.sh built), then one task pinned to each alive node."""
import json
import os
import sys

import ray
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from icepop.ray import cluster
from icepop.train import CONF_DIR

assert sys.argv[1:3] == ["-m", "icepop.train"], sys.argv
with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
    config = OmegaConf.to_object(compose(config_name="config", overrides=sys.argv[3:]))
cluster.start(config)


@ray.remote(num_cpus=1)
def where() -> list:
    return [ray.get_runtime_context().get_node_id(), os.environ.get("RAY_AUTH_MODE")]


nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
pinned = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)) for n in nodes]
ran = ray.get([task.remote() for task in pinned], timeout=120)
print("auth-test " + json.dumps({"address": config.cluster.address, "nodes": nodes, "ran": ran}))
cluster.shutdown()
'''


def base_env(home: Path) -> dict[str, str]:
    """This process's environment without any Ray address or authentication setting, HOME an empty
    folder, and 127.0.0.1 kept as the node address (tests/test_multinode.py)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") and not key.startswith("RAY_AUTH_")
    }
    return {**env, "HOME": str(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class TokenNodes(TwoNodes):
    """TwoNodes (tests/test_multinode.py: its stop and state helpers) started with `env`, which carries
    RAY_AUTH_MODE=token and the token: a head of 1 CPU with a dashboard and a Ray Client server on
    ports of their own, and a second node of 1 CPU."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.temp_dirs = [tempfile.mkdtemp(prefix="icepop-ray-", dir="/tmp") for _ in range(2)]
        self.gcs = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.client_server = f"127.0.0.1:{free_port()}"
        self.worker_cpus = 1
        self.head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={self.gcs.split(':')[1]}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
             f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={self.client_server.split(':')[1]}",
             "--num-cpus=1", "--num-gpus=0", f"--temp-dir={self.temp_dirs[0]}", "--disable-usage-stats"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.worker: subprocess.Popen | None = None
        self.leftovers: list[psutil.Process] = []

    def add_worker_node(self) -> None:
        self.wait_for_nodes(1)
        self.worker = subprocess.Popen(
            [sys.executable, test_multinode.__file__, self.gcs, self.temp_dirs[1], str(self.worker_cpus),
             str(free_port())],
            env=self.env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.wait_for_nodes(2)

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


@contextlib.contextmanager
def token_nodes(env: dict[str, str]) -> Iterator[TokenNodes]:
    nodes = TokenNodes(env)
    try:
        yield nodes
    finally:
        nodes.stop()


def grpc_call(address: str, server: str, token: str | None) -> tuple[grpc.StatusCode, object]:
    """One read-only gRPC call to a Ray server (`gcs`: the nodes it knows; `raylet`: its system config;
    `client`: a Ray Client ping), sent with `Bearer token` or no token, as Ray's own clients send it:
    the status and the reply."""
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address) as channel:
        try:
            if server == "gcs":
                stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
                request = gcs_service_pb2.GetAllNodeInfoRequest()
                return grpc.StatusCode.OK, stub.GetAllNodeInfo(request, metadata=metadata, timeout=20)
            if server == "raylet":
                stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
                request = node_manager_pb2.GetSystemConfigRequest()
                return grpc.StatusCode.OK, stub.GetSystemConfig(request, metadata=metadata, timeout=20)
            stub = ray_client_pb2_grpc.RayletDriverStub(channel)
            request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
            return grpc.StatusCode.OK, stub.ClusterInfo(request, metadata=metadata, timeout=20)
        except grpc.RpcError as error:
            return error.code(), error.details()


def http_status(url: str, token: str | None) -> tuple[int, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.slow  # a two-node Ray cluster
@pytest.mark.ray
def test_a_token_cluster_runs_a_job_with_the_token_and_refuses_clients_without_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    wrong = secrets.token_hex(32)
    without = base_env(home)
    with_token = {**without, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # The job's interpreter: the driver above, with the arguments launch/submit.sh gives `python`.
    (tmp_path / "driver.py").write_text(DRIVER)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {tmp_path / "driver.py"} "$@"\n')
    python.chmod(0o755)
    submit_env = {"PYTHON": str(python), "PATH": f"{Path(RAY).parent}{os.pathsep}{os.environ['PATH']}"}

    def submit(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SUBMIT), "rlvr"], env={**env, **submit_env, "RAY_ADDRESS": cluster.dashboard},
            cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip

    with token_nodes(with_token) as cluster:
        cluster.add_worker_node()
        listeners = listening_addresses(cluster.processes())
        status, known = grpc_call(cluster.gcs, "gcs", token)
        assert status == grpc.StatusCode.OK, known
        raylets = [f"{node.node_manager_address}:{node.node_manager_port}" for node in known.node_info_list]
        assert len(raylets) == 2, known

        # Refused: every server, with no token or a wrong one (the same calls with the token pass).
        servers = [(cluster.gcs, "gcs"), *((raylet, "raylet") for raylet in raylets)]
        for address, server in [*servers, (cluster.client_server, "client")]:
            for bad in (None, wrong):
                status, details = grpc_call(address, server, bad)
                assert status == grpc.StatusCode.UNAUTHENTICATED, (server, bad, status, details)
        for address, server in servers:
            assert grpc_call(address, server, token)[0] == grpc.StatusCode.OK, server
        jobs = f"{cluster.dashboard}/api/jobs/"
        assert http_status(jobs, None) == (401, "Unauthorized: Missing authentication token")
        assert http_status(jobs, wrong) == (403, "Forbidden: Invalid authentication token")
        # ... and launch/submit.sh: without a token it stops before sending anything; told that the
        # cluster has no authentication, or given a wrong token, the job API refuses it.
        refused = submit(without)
        assert refused.returncode == 2 and "no Ray token" in refused.stderr, refused.stderr[-2000:]
        refused = submit({**without, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode != 0, refused.stdout[-2000:]
        assert "Unauthorized: Missing authentication token" in refused.stderr, refused.stderr[-2000:]
        refused = submit({**without, "RAY_AUTH_TOKEN": wrong})
        assert refused.returncode != 0, refused.stdout[-2000:]
        assert "Forbidden: Invalid authentication token" in refused.stderr, refused.stderr[-2000:]

        # Accepted: the job submitted with the token runs a task on each node.
        result = submit(with_token)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        status, listed = http_status(jobs, token)
        nodes = {node["node_id"] for node in cluster.alive_nodes()}
    assert not cluster.leftovers, f"Ray processes left running: {cluster.leftovers}"

    report = json.loads(result.stdout.split("auth-test ", 1)[1].splitlines()[0])
    assert report["address"] == "auto" and set(report["nodes"]) == nodes
    assert sorted(report["ran"]) == sorted([node, "token"] for node in nodes)
    # The refused submissions created no job: the job API lists the one that ran (and its driver).
    assert status == 200
    submitted = [job for job in json.loads(listed) if job["type"] == "SUBMISSION"]
    assert [job["status"] for job in submitted] == ["SUCCEEDED"], submitted
    # Both nodes listened on loopback only.
    assert listeners and all(is_loopback(address) for address in listeners), listeners
