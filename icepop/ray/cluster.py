"""Ray for a run: start a local cluster on 127.0.0.1 or join one, reserve bundles, shut down.

Key design choices: every process of a run (driver, engines, trainer ranks) gets the same small set
of environment variables from `process_env`, so users never have to know them, and placement groups
reserve all bundles up front, so a cluster that is too small fails at start-up with one message
instead of hanging half-way through the first step. The check is node-aware: a bundle (one engine,
one trainer rank) never spans nodes, so the message names what each role needs and what each node has
(icepop.ray.bundles decides; this module asks Ray). A pipeline keeps one cluster for all its stages
(`kept`, `session`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from icepop.config import Config
from icepop.ray.actors import STOP_SIGNAL, raise_if_stopping
from icepop.ray.bundles import (
    bundle,
    check_capacity,
    check_weight_sync,
    describe_devices,
    describe_placement,
    needed_resources,
    roles,
)
from icepop.ray.hosts import WORKER_LOG_DIR

PLACEMENT_TIMEOUT_SECONDS = 120.0


def process_env(on_gpu: bool, local: bool) -> dict[str, str]:
    """Environment every process of the run needs (set where unset; never overrides the user).

    local: a single-node cluster that we start; gloo and NCCL then bind the loopback interface only.
    VLLM_HOST_IP=127.0.0.1 is right on every node: the engine runs in the actor's process, where vLLM
    uses it only for a rendezvous of its own local workers (a file store on CPU).
    """
    env = {
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in the actor's process: 2 s start, no /dev/shm leaks
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # one thread per trainer rank / engine; the cores are shared
        "VLLM_LOGGING_LEVEL": "WARNING",  # per-request INFO lines would drown the progress bar
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        # An actor that reserves no GPU sees none (Ray sets CUDA_VISIBLE_DEVICES="" for it; by default
        # it would see every GPU of its node): a CPU rank never picks CUDA and NCCL, nor a reference
        # policy or reward model a GPU that it did not reserve.
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
    }
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if local:
        # Nothing beyond 127.0.0.1 can reach it: no token (Ray 2.60 would make one in ~/.ray). A cluster
        # that is joined keeps its own mode: the launchers turn tokens on (docs/cluster.md).
        env.update(GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo", RAY_AUTH_MODE="disabled")
    if WORKER_LOG_DIR in os.environ:  # the run's logs/ (icepop.train): every actor writes its output there
        env[WORKER_LOG_DIR] = os.environ[WORKER_LOG_DIR]
    return {key: os.environ.get(key, value) for key, value in env.items()}


def start(config: Config, need: dict[str, float] | None = None) -> None:
    """Join `cluster.address`, or start a local single-node cluster whose listeners stay on 127.0.0.1,
    with the CPUs `need` says (default: what the config's bundles need) and the GPUs Ray finds: never
    told a GPU count, Ray counts the devices itself (honouring CUDA_VISIBLE_DEVICES), so `reserve`
    checks the run against GPUs that exist."""
    import ray

    need = need or needed_resources(config)
    env = process_env(on_gpu=need["GPU"] > 0, local=config.cluster.address is None)
    os.environ.update(env)
    if not sys.stdout.isatty():  # a log file: Ray's "(Actor pid=…)" prefixes without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if config.cluster.address is not None:
        # A submitted job's runtime env already carries its own variables to every worker, and ray.init
        # refuses a runtime_env that sets one of them again (even to the same value).
        submitted = _submitted_job_env_vars()
        runtime_env = {"env_vars": {key: value for key, value in env.items() if key not in submitted}}
        ray.init(address=config.cluster.address, runtime_env=runtime_env, log_to_driver=True)
        _graceful_stop()
        return
    _keep_ray_on_loopback()
    # Ray's raylet starts every worker at niceness 15, so any other process on the machine preempts the
    # whole job: workers run at the driver's own priority instead (RAY_worker_niceness, read by the
    # raylet this ray.init starts; a cluster from `ray start` keeps what its starter chose).
    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    num_cpus = config.cluster.num_cpus or int(need["CPU"]) + 1  # + 1 for the driver's own tasks
    ray.init(
        address="local",  # a new cluster, even when another one runs on this machine (ray start)
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,  # not "Started a local Ray instance"
        # No runtime_env: the workers inherit `env` from the raylet this call starts (with one, three
        # actors took 5.0 s to start here instead of 2.2 s).
        log_to_driver=True,
    )
    _graceful_stop()


def _submitted_job_env_vars() -> set[str]:
    """Names of the variables that `ray job submit --runtime-env-json` set for this driver, if any."""
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor
    if job_config is None:
        return set()
    return set((json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {})


def _keep_ray_on_loopback() -> None:
    """Keep a single-node Ray from rewriting 127.0.0.1 to the machine's routable address (its agents
    and gRPC servers would then listen there and on 0.0.0.0). Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    once, when `ray` is first imported: the variable covers the processes Ray starts, and the constant
    its driver-side copy, since `ray` is already imported here (icepop.stages imports it)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def _graceful_stop() -> None:
    """ray.init installs a SIGTERM handler that aborts the driver on the spot; put back one that raises
    SystemExit(128 + 15), which unwinds through the stages' `finally` blocks (Ray shutdown, temp files).
    Ctrl-C raises KeyboardInterrupt as usual. Both note the signal in STOP_SIGNAL."""
    if threading.current_thread() is threading.main_thread():
        STOP_SIGNAL.clear()
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)


def _stop(signum: int, frame: Any) -> None:
    STOP_SIGNAL.append(signum)
    raise_if_stopping()  # noted in STOP_SIGNAL too: gather raises it again where ray.wait swallowed it


def shutdown() -> None:
    """Stop Ray (and with it every actor of the run); safe to call when Ray is not running."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


_RESERVED: list[Any] = []
"""Placement groups `reserve` created, so that a stage inside a kept cluster can remove its own."""


@contextlib.contextmanager
def session(config: Config) -> Iterator[None]:
    """Ray for one stage: started (or joined) before it and stopped after it — unless a cluster is kept
    for several stages (`kept`, a pipeline): then the stage's placement groups, and with them its
    actors, are removed when it ends, and the cluster stays for the next stage."""
    import ray

    if not ray.is_initialized():
        start(config)
        try:
            yield
        finally:
            shutdown()
        return
    first = len(_RESERVED)
    try:
        yield
    finally:
        for group in _RESERVED[first:]:
            ray.util.remove_placement_group(group)  # kills the actors placed on it
        del _RESERVED[first:]


@contextlib.contextmanager
def kept(config: Config, stages: list[Config]) -> Iterator[None]:
    """One cluster for a pipeline's stages (each stage's `session` then only removes its own placement
    groups): Ray starts once, not once per stage, sized for the largest of `stages`."""
    needs = [needed_resources(stage) for stage in stages]
    start(config, {kind: max(need[kind] for need in needs) for kind in ("CPU", "GPU")})
    try:
        yield
    finally:
        shutdown()


@dataclass
class Placement:
    """The run's placement groups; bundle i of a group hosts engine i or trainer rank i."""

    rollout: Any
    trainer: Any
    reward: Any = None
    """Bundle i hosts reward-model actor i (only when reward.model_path is set)."""
    bundle_nodes: dict[str, list[str]] = field(default_factory=dict)
    """Role name → the Ray node id hosting each of its bundles, in bundle order."""


def reserve(config: Config, rollout: bool = True, trainer: bool = True) -> Placement:
    """Create and wait for the placement groups (rollout=False: trainer only, for SFT and reward-model
    training; trainer=False: engines and reward model only, for evaluation), or explain what the
    cluster lacks; then print which node hosts each engine and rank."""
    import ray
    from ray.util.placement_group import placement_group

    alive = [node for node in ray.nodes() if node["Alive"]]
    nodes = [node["Resources"] for node in alive]
    check_capacity(config, nodes, rollout, trainer)
    groups = {
        role.name: placement_group([bundle(role, nodes)] * role.count, strategy="PACK")
        for role in roles(config, rollout, trainer)
    }
    _RESERVED.extend(groups.values())
    ready, _ = ray.wait(
        [pg.ready() for pg in groups.values()], num_returns=len(groups), timeout=PLACEMENT_TIMEOUT_SECONDS
    )
    if len(ready) != len(groups):
        raise RuntimeError(
            f"placement groups not ready after {PLACEMENT_TIMEOUT_SECONDS:.0f} s: the cluster has "
            f"{ray.available_resources()} available, the run needs {needed_resources(config, rollout)}"
        )
    bundle_nodes = {}
    for name, pg in groups.items():
        table = ray.util.placement_group_table(pg)["bundles_to_node_id"]
        bundle_nodes[name] = [table[i] for i in range(len(table))]
    ips = {node["NodeID"]: node["NodeManagerAddress"] for node in alive}
    print(f"icepop placement: {describe_placement(roles(config, rollout, trainer), bundle_nodes, ips)}")
    print(f"icepop devices: {describe_devices(config, rollout, trainer)}")
    check_weight_sync(config.rollout.weight_sync, bundle_nodes)
    return Placement(
        rollout=groups.get("rollout"),
        trainer=groups.get("trainer"),
        reward=groups.get("reward model"),
        bundle_nodes=bundle_nodes,
    )
