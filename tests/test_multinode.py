"""Placement across Ray nodes: the node-aware capacity message, and a real two-node run.

The end-to-end test starts two Ray nodes on this machine — a head with 2 CPUs that advertises
`icepop_trainer`, and a second node with 1 CPU that advertises `icepop_rollout` — submits the RLVR
recipe with `launch/submit.sh` (`ray job submit`, this checkout as the job's working directory), and
checks that the trainer ranks ran on the head and the engine on the other node (from Ray's state API
and from the placement line the run printed), that every server of both nodes listened on loopback
only, and that the run logged the same metrics as a single-node run of the same seed.

Both nodes use the node address 127.0.0.1: Ray's gRPC servers listen on 127.0.0.1 only when the node
address is exactly that, and on 0.0.0.0 / :: otherwise (so loopback aliases such as 127.0.0.2 would
listen on every interface). `ray start --head` runs the head; the second node is started the way `ray
start --address` starts one (`ray._private.node.Node`), by this file run as a script, because the CLI
refuses a second node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps 127.0.0.1 from being
rewritten to the machine's routable address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from e2e_helpers import REFERENCE, Run
from test_config import compose_config

from icepop.ray.bundles import Role, bundle, check_weight_sync, describe_placement, placement_shortfall
from icepop.ray.cluster import _submitted_job_env_vars
from icepop.ray.hosts import free_port

RAY = str(Path(sys.executable).with_name("ray"))
SUBMIT = Path(__file__).resolve().parents[1] / "launch" / "submit.sh"
# Every per-step number the two runs must share (perf/ and timing/ measure the machine, not the run).
COMPARED = [
    "reward/mean",
    "reward/std",
    "response_length/mean",
    "icepop/mask_frac",
    "mismatch/kl_k3",
    "mismatch/abs_logp_diff_mean",
    "actor/grad_norm",
    "actor/entropy",
    "actor/pg_loss",
    "sync/probe_abs_logp_diff",
]


# --- the capacity message and the placement report, from resource tables --------------------------


def test_a_shortfall_names_each_role_and_each_node() -> None:
    config = compose_config(
        "+recipe=rlvr", "cluster=gpu", "rollout.engines=8", "trainer.ranks=8", "algo.prompts_per_step=32"
    )
    nodes = [{"CPU": 64.0, "GPU": 8.0}, {"CPU": 64.0, "GPU": 4.0}]
    assert placement_shortfall(config, nodes) == (
        "the cluster is too small: rollout needs 8 CPUs/8 GPUs, trainer 8 CPUs/8 GPUs, cluster has "
        "128 CPUs/12 GPUs on 2 nodes (64 CPUs/8 GPUs + 64 CPUs/4 GPUs). 16 GPUs needed in all, 12 in "
        "the cluster."
    )
    assert placement_shortfall(config, [{"CPU": 64.0, "GPU": 8.0}] * 2) is None


def test_a_bundle_never_spans_nodes() -> None:
    # 2 engines of 40 CPUs + 8 ranks of 1 CPU = 88 CPUs, and 6 nodes × 32 CPUs = 192: enough in all, but
    # no node holds one engine.
    config = compose_config(
        "+recipe=rlvr",
        "cluster=gpu",
        "rollout.engines=2",
        "rollout.cpus_per_engine=40",
        "trainer.ranks=8",
        "algo.prompts_per_step=32",
    )
    message = placement_shortfall(config, [{"CPU": 32.0, "GPU": 4.0}] * 6)
    assert message == (
        "the cluster is too small: rollout needs 80 CPUs/2 GPUs, trainer 8 CPUs/8 GPUs, cluster has "
        "192 CPUs/24 GPUs on 6 nodes (6 × 32 CPUs/4 GPUs). One rollout engine needs 40 CPUs/1 GPU on a "
        "single node (a bundle never spans nodes), more than any of the nodes has."
    )
    # Two 64-CPU nodes and two 32-CPU nodes: both engines fit; nothing rules the run out.
    nodes = [{"CPU": 64.0, "GPU": 4.0}] * 2 + [{"CPU": 32.0, "GPU": 4.0}] * 2
    assert placement_shortfall(config, nodes) is None
    # One 64-CPU node only: one engine of the two fits (and 88 CPUs are exactly what there is).
    message = placement_shortfall(config, [{"CPU": 64.0, "GPU": 4.0}] + [{"CPU": 8.0, "GPU": 2.0}] * 3)
    assert message is not None
    assert message.endswith("Only 1 of the 2 rollout engines of 40 CPUs/1 GPU fit on the nodes.")


def test_role_resources_steer_bundles_and_are_checked_per_node() -> None:
    config = compose_config("+recipe=rlvr", "rollout.engines=1", "trainer.ranks=2")
    trainer = Role("trainer", "rank", 2, 1, 0)
    head = {"CPU": 2.0, "icepop_trainer": 1.0}
    other = {"CPU": 4.0, "icepop_rollout": 1.0}
    assert bundle(trainer, [head, other]) == {"CPU": 1.0, "icepop_trainer": 0.001}
    assert bundle(trainer, [{"CPU": 8.0}]) == {"CPU": 1.0}  # nobody advertises it: anywhere
    assert placement_shortfall(config, [head, other]) is None
    # 5 CPUs in all, but the trainer may use only the 1-CPU node that advertises icepop_trainer.
    message = placement_shortfall(config, [{"CPU": 1.0, "icepop_trainer": 1.0}, other])
    assert message == (
        "the cluster is too small: rollout needs 1 CPU/0 GPUs, trainer 2 CPUs/0 GPUs, cluster has "
        "5 CPUs/0 GPUs on 2 nodes (1 CPU/0 GPUs [icepop_trainer] + 4 CPUs/0 GPUs [icepop_rollout]). "
        "Only 1 of the 2 trainer ranks of 1 CPU/0 GPUs fit on the 1 node with icepop_trainer."
    )
    # Evaluation reserves no trainer: the same nodes then suffice.
    assert placement_shortfall(config, [{"CPU": 1.0, "icepop_trainer": 1.0}, other], trainer=False) is None


def test_a_submitted_jobs_own_variables_are_not_set_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's job supervisor hands the driver its job config; ray.init refuses a runtime_env that sets one
    # of the job's variables again, so icepop leaves those out of its own.
    job_config = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "4", "GLOO_SOCKET_IFNAME": "eth0"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    assert _submitted_job_env_vars() == {"OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": None}))
    assert _submitted_job_env_vars() == set()
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert _submitted_job_env_vars() == set()


def test_file_weight_sync_is_refused_when_an_engine_is_on_another_node() -> None:
    check_weight_sync("file", {"rollout": ["a", "a"], "trainer": ["a", "b"]})  # rank 0's node: fine
    check_weight_sync("broadcast", {"rollout": ["a", "b"], "trainer": ["a", "a"]})
    check_weight_sync("file", {"rollout": ["b"]})  # evaluation: no trainer, nothing to sync
    with pytest.raises(
        ValueError, match=r"engine\(s\) 1 are on another node; use rollout.weight_sync=broadcast"
    ):
        check_weight_sync("file", {"rollout": ["a", "b"], "trainer": ["a", "a"]})


def test_the_placement_report_names_each_bundles_node() -> None:
    roles = [Role("rollout", "engine", 2, 1, 1), Role("trainer", "rank", 2, 1, 1)]
    bundle_nodes = {"rollout": ["aaaaaaaa11", "bbbbbbbb22"], "trainer": ["cccccccc33", "cccccccc33"]}
    ips = {"aaaaaaaa11": "10.0.0.1", "bbbbbbbb22": "10.0.0.2", "cccccccc33": "10.0.0.3"}
    assert describe_placement(roles, bundle_nodes, ips) == (
        "rollout engine 0 on node aaaaaaaa (10.0.0.1); rollout engine 1 on node bbbbbbbb (10.0.0.2); "
        "trainer ranks 0, 1 on node cccccccc (10.0.0.3)"
    )


# --- two Ray nodes on this machine ------------------------------------------------------------------


CLUSTER_TOKEN = secrets.token_hex(32)
"""This session's two-node clusters use token authentication, as the launchers set them up."""


def ray_env() -> dict[str, str]:
    """Environment for Ray's CLI and daemons here: 127.0.0.1 stays 127.0.0.1, token auth on (the job
    inherits the mode and the token, as under launch/)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": CLUSTER_TOKEN}
    return {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **auth}


def tree(root: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return [root, *root.children(recursive=True)]
    return []


def listening_addresses(processes: list[psutil.Process]) -> set[str]:
    found = set()
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            found |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == "LISTEN"}
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class TwoNodes:
    """A head (2 CPUs, icepop_trainer) and a second node (1 CPU, icepop_rollout), both on 127.0.0.1,
    with their own temp dir; `stop` ends exactly the processes they started."""

    def __init__(self, head_cpus: int = 2, worker_cpus: int = 1) -> None:
        # One temp dir per node, as on separate machines (a shared one would let the second node's runtime
        # env agent replace the job's working directory under the driver); short: Ray's socket paths.
        self.temp_dirs = [tempfile.mkdtemp(prefix="icepop-ray-", dir="/tmp") for _ in range(2)]
        self.gcs = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.worker_cpus = worker_cpus
        self.head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={self.gcs.split(':')[1]}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
             f"--dashboard-agent-listen-port={free_port()}",
             f"--num-cpus={head_cpus}", "--num-gpus=0", '--resources={"icepop_trainer": 1}',
             f"--temp-dir={self.temp_dirs[0]}", "--disable-usage-stats"],
            env=ray_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.worker: subprocess.Popen | None = None
        self.leftovers: list[psutil.Process] = []

    def add_worker_node(self) -> None:
        self.wait_for_nodes(1)
        self.worker = subprocess.Popen(
            [sys.executable, __file__, self.gcs, self.temp_dirs[1], str(self.worker_cpus), str(free_port())],
            env=ray_env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.wait_for_nodes(2)

    def processes(self) -> list[psutil.Process]:
        roots = [
            psutil.Process(p.pid) for p in (self.head, self.worker) if p is not None and p.poll() is None
        ]
        return [proc for root in roots for proc in tree(root)]

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], env=ray_env(), capture_output=True, text=True, timeout=timeout, check=False
        )

    def state(self, kind: str) -> list[dict]:
        """`ray list nodes|actors` (dead actors included) from the head's state API; [] while the head
        cannot answer yet."""
        listed = self.ray("list", kind, f"--address={self.gcs}", "--format=json", "--detail", "--limit=1000")
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(listed.stdout)
        return []

    def alive_nodes(self) -> list[dict]:
        return [node for node in self.state("nodes") if node["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while len(self.alive_nodes()) < count:
            assert self.head.poll() is None, "the head node exited"
            assert time.monotonic() < deadline, f"fewer than {count} Ray nodes after {timeout:.0f} s"
            time.sleep(1)

    def stop(self) -> None:
        """SIGINT to `ray start --block` and EOF to the node script: each stops its node's processes.
        Whatever is still alive 30 s later (of the processes seen just before) is killed; `leftovers`
        holds any that survived even that."""
        started = self.processes() + [
            proc
            for proc in psutil.process_iter(["cmdline"])
            if any(d in part for d in self.temp_dirs for part in proc.info["cmdline"] or [])
        ]
        if self.worker is not None and self.worker.poll() is None:
            self.worker.stdin.close()
        if self.head.poll() is None:
            self.head.send_signal(signal.SIGINT)
        _, alive = psutil.wait_procs(started, timeout=30)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        _, self.leftovers = psutil.wait_procs(alive, timeout=10)
        for directory in self.temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def two_nodes() -> Iterator[TwoNodes]:
    nodes = TwoNodes()
    try:
        yield nodes
    finally:
        nodes.stop()


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow  # a two-node Ray cluster and two whole runs
@pytest.mark.ray
def test_a_submitted_job_places_roles_on_their_nodes_and_matches_a_single_node_run(
    tmp_path: Path, reference_run: Run, shared_cache: Path
) -> None:
    # The single-node run to compare with: the shared reference run (e2e_helpers.REFERENCE, the normal
    # local path), whose configuration the job is submitted with.
    with two_nodes() as cluster:
        cluster.add_worker_node()
        job_env = {
            "GLOO_SOCKET_IFNAME": "lo",  # gloo on loopback too (a joined cluster's choice, not icepop's)
            "ICEPOP_CACHE": str(shared_cache),  # the tiny model and its warm-up: the local run's start
            "PYTHONPATH": str(Path(__file__).parent),  # e2e_rewards, for reward.function
            "OMP_NUM_THREADS": "1",  # also one of icepop's own: ray.init must not set it a second time
        }
        submit = subprocess.Popen(
            ["bash", str(SUBMIT), "rlvr", *REFERENCE[1:], f"run.dir={tmp_path / 'multi'}"],
            env={**ray_env(), "RAY_ADDRESS": cluster.dashboard, "ICEPOP_JOB_ENV": json.dumps(job_env),
                 "PYTHON": sys.executable, "PATH": f"{Path(RAY).parent}{os.pathsep}{os.environ['PATH']}"},
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        listeners: set[str] = set()
        deadline = time.monotonic() + 400
        while submit.poll() is None and time.monotonic() < deadline:
            listeners |= listening_addresses(cluster.processes())  # while every server of the job is up
            time.sleep(1)
        if submit.poll() is None:
            submit.kill()
        output = submit.communicate()[0]
        assert submit.returncode == 0, output[-8000:]
        nodes = cluster.alive_nodes()
        actors = cluster.state("actors")
    assert not cluster.leftovers, f"Ray processes left running: {cluster.leftovers}"

    # Placement, from Ray's state API: trainer ranks on the icepop_trainer node, the engine on the other.
    node_of_role = {
        role: {n["node_id"] for n in nodes if n["resources_total"].get(f"icepop_{role}", 0) > 0}
        for role in ("trainer", "rollout")
    }
    assert len(nodes) == 2 and all(len(ids) == 1 for ids in node_of_role.values()), nodes
    hosts: dict[str, set[str]] = {"trainer": set(), "rollout": set()}
    for actor in actors:  # icepop names them "<role>-<index>-<placement group>"
        role = (actor.get("name") or "").split("-")[0]
        if role in hosts:
            hosts[role].add(actor["node_id"])
    listed = [(actor["class_name"], actor.get("name"), actor["node_id"]) for actor in actors]
    assert hosts == node_of_role and hosts["trainer"] != hosts["rollout"], (hosts, node_of_role, listed)
    # ... and from the run's own report of where its bundles went.
    printed = re.search(
        r"icepop placement: rollout engine 0 on node (\w+) .*; trainer ranks 0, 1 on node (\w+) ", output
    )
    assert printed, output[-4000:]
    assert (
        printed.group(1) == next(iter(hosts["rollout"]))[:8]
        and printed.group(2) == next(iter(hosts["trainer"]))[:8]
    )

    # Every server of both nodes — Ray's daemons and agents, the job, rendezvous stores, gloo — on loopback.
    assert listeners and all(is_loopback(address) for address in listeners), listeners

    # Same seed, same computation: the runs agree step by step. Observed bit-identical; the tolerance (1e-6
    # relative) only forgives float32 summation order, far below what one different sample would change.
    local, multi = (
        metrics(reference_run.dir / "metrics.jsonl"),
        metrics(tmp_path / "multi" / "metrics.jsonl"),
    )
    assert [m["step"] for m in local] == [m["step"] for m in multi] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(local, multi, strict=True):
        assert a.keys() == b.keys()
        for key in COMPARED:
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-12), (a["step"], key, a[key], b[key])
    assert multi[0]["mismatch/abs_logp_diff_mean"] > 1e-4  # bf16 engine: a real mismatch was compared
    eval_local, eval_multi = (
        metrics(reference_run.dir / "eval.jsonl"),
        metrics(tmp_path / "multi" / "eval.jsonl"),
    )
    assert eval_local == eval_multi


def _run_second_node(gcs_address: str, temp_dir: str, num_cpus: int, agent_port: int) -> None:
    """What `ray start --address=GCS --node-ip-address=127.0.0.1` does, without the CLI's refusal; the
    node stops when standard input closes."""
    import ray._private.node
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=gcs_address,
        node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        num_gpus=0,
        resources={"icepop_rollout": 1},
        temp_dir=temp_dir,
        node_manager_port=0,
        dashboard_agent_listen_port=agent_port,
        include_log_monitor=False,
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    sys.stdin.read()
    node.kill_all_processes(check_alive=False, allow_graceful=True)


if __name__ == "__main__":
    _run_second_node(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
