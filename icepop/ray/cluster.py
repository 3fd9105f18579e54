"""Ray for a run: start a local cluster on 127.0.0.1 or join one, reserve bundles, shut down.

Key design choices: every process of a run (driver, engines, trainer ranks) gets the same small set
of environment variables from `process_env`, so users never have to know them, and placement groups
reserve all bundles up front, so a cluster that is too small fails at start-up with one message
instead of hanging half-way through the first step. The check is node-aware: a bundle (one engine,
one trainer rank) never spans nodes, so the message names what each role needs and what each node has.

Steering roles to nodes needs no config: a node started with the custom resource `icepop_rollout`,
`icepop_trainer` or `icepop_reward_model` (`ray start --resources='{"icepop_trainer": 1}'`) is the only
kind of node that role's bundles go to; each bundle asks for a sliver of it (`ROLE_RESOURCE_SHARE`), so
one such node hosts any number of them. Where no node advertises a role's resource, its bundles go
anywhere that fits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from icepop.config import Config

PLACEMENT_TIMEOUT_SECONDS = 120.0
ROLE_RESOURCE_SHARE = 0.001
"""How much of its role resource (e.g. `icepop_trainer`) each bundle reserves: a marker, not a limit."""


def process_env(on_gpu: bool, local: bool) -> dict[str, str]:
    """Environment every process of the run needs (set where unset; never overrides the user).

    local: a single-node cluster that we start; gloo and NCCL then bind the loopback interface only.
    VLLM_HOST_IP=127.0.0.1 is right on every node: the engine runs in the actor's process, where vLLM
    uses it only for a rendezvous of its own local workers (a file store on CPU).
    """
    env = {
        "RAY_AUTH_MODE": "disabled",  # Ray 2.60's token auth must match across every process and CLI call
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in the actor's process: 2 s start, no /dev/shm leaks
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # one thread per trainer rank / engine; the cores are shared
        "VLLM_LOGGING_LEVEL": "WARNING",  # per-request INFO lines would drown the progress bar
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if local:
        env.update(GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
    return {key: os.environ.get(key, value) for key, value in env.items()}


def needed_resources(config: Config, rollout: bool = True) -> dict[str, float]:
    """Total CPUs and GPUs the run's bundles reserve (rollout=False: the trainer's alone)."""
    need = {"CPU": 0.0, "GPU": 0.0}
    for role in roles(config, rollout=rollout):
        need["CPU"] += role.count * role.cpus
        need["GPU"] += role.count * role.gpus
    return need


def start(config: Config) -> None:
    """Join `cluster.address`, or start a local single-node cluster whose listeners stay on 127.0.0.1."""
    import ray

    need = needed_resources(config)
    env = process_env(on_gpu=need["GPU"] > 0, local=config.cluster.address is None)
    os.environ.update(env)
    if config.cluster.address is not None:
        # A submitted job's runtime env already carries its own variables to every worker, and ray.init
        # refuses a runtime_env that sets one of them again (even to the same value).
        submitted = _submitted_job_env_vars()
        runtime_env = {"env_vars": {key: value for key, value in env.items() if key not in submitted}}
        ray.init(address=config.cluster.address, runtime_env=runtime_env, log_to_driver=True)
        _graceful_sigterm()
        return
    _keep_ray_on_loopback()
    num_cpus = config.cluster.num_cpus or int(need["CPU"]) + 1  # + 1 for the driver's own tasks
    ray.init(
        address="local",  # a new cluster, even when another one runs on this machine (ray start)
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        num_gpus=int(need["GPU"]) or None,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    _graceful_sigterm()


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


INTERRUPTED = threading.Event()
"""Set by Ctrl-C: `ray.wait` swallows the KeyboardInterrupt raised while it blocks, so the code that
waits (icepop.ray.workers.gather) raises it again when it sees this."""


def _graceful_sigterm() -> None:
    """ray.init installs a SIGTERM handler that aborts the driver on the spot; put back one that raises
    SystemExit, which unwinds through the stages' `finally` blocks (Ray shutdown, temp files). Ctrl-C
    raises KeyboardInterrupt as usual and also sets INTERRUPTED."""
    if threading.current_thread() is threading.main_thread():
        INTERRUPTED.clear()
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        signal.signal(signal.SIGINT, _interrupt)


def _interrupt(signum: int, frame: Any) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt


def shutdown() -> None:
    """Stop Ray (and with it every actor of the run); safe to call when Ray is not running."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class Role:
    """Identical bundles for one kind of worker: `count` of them, each `cpus` CPUs and `gpus` GPUs."""

    name: str
    """"rollout", "trainer" or "reward model"; also names the role resource (`icepop_reward_model`)."""
    unit: str
    """What one bundle hosts: "engine", "rank" or "worker"."""
    count: int
    cpus: int
    gpus: int

    @property
    def resource(self) -> str:
        """The custom resource that steers this role to the nodes advertising it."""
        return "icepop_" + self.name.replace(" ", "_")


def roles(config: Config, rollout: bool = True, trainer: bool = True) -> list[Role]:
    """The run's roles in reservation order (rollout=False: no engines or reward model; trainer=False:
    no trainer ranks)."""
    engines, ranks, reward = config.rollout, config.trainer, config.reward
    found = []
    if rollout:
        found.append(
            Role("rollout", "engine", engines.engines, engines.cpus_per_engine, engines.gpus_per_engine)
        )
    if trainer:
        found.append(Role("trainer", "rank", ranks.ranks, ranks.cpus_per_rank, ranks.gpus_per_rank))
    if rollout and reward.model_path is not None:
        found.append(
            Role(
                "reward model",
                "worker",
                reward.model_workers,
                reward.cpus_per_model_worker,
                reward.gpus_per_model_worker,
            )
        )
    return found


def bundle(role: Role, nodes: list[dict[str, float]]) -> dict[str, float]:
    """One bundle of `role` on a cluster whose nodes have these resources (Ray's per-node totals)."""
    wanted = {"CPU": float(role.cpus)}
    if role.gpus:
        wanted["GPU"] = float(role.gpus)
    if any(node.get(role.resource, 0.0) > 0 for node in nodes):
        wanted[role.resource] = ROLE_RESOURCE_SHARE
    return wanted


def _fits(node: dict[str, float], wanted: dict[str, float]) -> int:
    """How many bundles of this shape the node holds, all alone (a bundle never spans nodes)."""
    counts = [int(node.get(kind, 0.0) / amount + 1e-9) for kind, amount in wanted.items() if amount > 0]
    return min(counts, default=sys.maxsize)


def _plural(amount: float, unit: str) -> str:
    return f"{amount:g} {unit}" + ("" if amount == 1 else "s")


def _amount(cpus: float, gpus: float) -> str:
    return f"{_plural(cpus, 'CPU')}/{_plural(gpus, 'GPU')}"


def _nodes_summary(nodes: list[dict[str, float]]) -> str:
    """'2 nodes (8 CPUs/8 GPUs + 8 CPUs/4 GPUs)'; identical nodes are counted ('4 × 8 CPUs/8 GPUs')."""
    shapes: dict[str, int] = {}
    for node in nodes:
        markers = sorted(kind for kind, amount in node.items() if kind.startswith("icepop_") and amount > 0)
        shape = _amount(node.get("CPU", 0.0), node.get("GPU", 0.0)) + "".join(f" [{m}]" for m in markers)
        shapes[shape] = shapes.get(shape, 0) + 1
    listed = " + ".join(shape if n == 1 else f"{n} × {shape}" for shape, n in shapes.items())
    return f"{_plural(len(nodes), 'node')} ({listed})"


def placement_shortfall(
    config: Config, nodes: list[dict[str, float]], rollout: bool = True, trainer: bool = True
) -> str | None:
    """Why these nodes cannot host the run's bundles, in one message; None if nothing rules it out.

    nodes: each node's total resources, as Ray reports them (`ray.nodes()[i]["Resources"]`). Checked:
    every kind of resource in all, that one bundle fits on some node it may use (a bundle never spans
    nodes, so an 8-GPU engine needs an 8-GPU node), and that each role's bundles fit on those nodes.
    These are necessary conditions only: a run they let through may still wait for busy resources.
    """
    wanted = roles(config, rollout, trainer)
    reasons = []
    for kind in ("CPU", "GPU"):
        need = sum(role.count * (role.cpus if kind == "CPU" else role.gpus) for role in wanted)
        have = sum(node.get(kind, 0.0) for node in nodes)
        if need > have:
            reasons.append(f"{_plural(need, kind)} needed in all, {have:g} in the cluster")
    for role in wanted:
        shape = bundle(role, nodes)
        steered = role.resource in shape
        usable = [node for node in nodes if not steered or node.get(role.resource, 0.0) > 0]
        where = f"the {_plural(len(usable), 'node')} with {role.resource}" if steered else "the nodes"
        fit = sum(_fits(node, shape) for node in usable)
        if fit == 0:
            reasons.append(
                f"one {role.name} {role.unit} needs {_amount(role.cpus, role.gpus)} on a single node "
                f"(a bundle never spans nodes), more than any of {where} has"
            )
        elif fit < role.count:
            reasons.append(
                f"only {fit} of the {role.count} {role.name} {role.unit}s of {_amount(role.cpus, role.gpus)} "
                f"fit on {where}"
            )
    if not reasons:
        return None
    needs = [
        f"{role.name} {'needs ' if i == 0 else ''}{_amount(role.count * role.cpus, role.count * role.gpus)}"
        for i, role in enumerate(wanted)
    ]
    total = _amount(sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes))
    detail = "; ".join(reasons)
    return (
        f"the cluster is too small: {', '.join(needs)}, cluster has {total} on {_nodes_summary(nodes)}. "
        f"{detail[0].upper()}{detail[1:]}."
    )


def _check_capacity(
    config: Config,
    cluster: dict[str, float] | list[dict[str, float]],
    rollout: bool = True,
    trainer: bool = True,
) -> None:
    """RuntimeError with `placement_shortfall`'s message; `cluster` is a list of nodes' resources, or
    one dict of totals (a single node)."""
    nodes = [cluster] if isinstance(cluster, dict) else cluster
    message = placement_shortfall(config, nodes, rollout, trainer)
    if message is not None:
        raise RuntimeError(message)


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

    engines, ranks = config.rollout, config.trainer
    if config.cluster.placement == "colocated" and (engines.gpus_per_engine == 0 or ranks.gpus_per_rank == 0):
        raise ValueError(
            "cluster.placement=colocated shares GPUs between vLLM (asleep during training) and the "
            "trainer; it needs rollout.gpus_per_engine and trainer.gpus_per_rank > 0. "
            "Use disaggregated on CPU machines."
        )
    alive = [node for node in ray.nodes() if node["Alive"]]
    nodes = [node["Resources"] for node in alive]
    _check_capacity(config, nodes, rollout, trainer)
    groups = {
        role.name: placement_group([bundle(role, nodes)] * role.count, strategy="PACK")
        for role in roles(config, rollout, trainer)
    }
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
    check_weight_sync(config.rollout.weight_sync, bundle_nodes)
    return Placement(
        rollout=groups.get("rollout"),
        trainer=groups.get("trainer"),
        reward=groups.get("reward model"),
        bundle_nodes=bundle_nodes,
    )


def describe_placement(wanted: list[Role], bundle_nodes: dict[str, list[str]], ips: dict[str, str]) -> str:
    """'rollout engine 0 on node 3f2a1c9e (10.0.0.2); trainer ranks 0, 1 on node 0765… (10.0.0.1)'."""
    parts = []
    for role in wanted:
        by_node: dict[str, list[int]] = {}
        for index, node in enumerate(bundle_nodes[role.name]):
            by_node.setdefault(node, []).append(index)
        for node, indices in by_node.items():
            unit = role.unit if len(indices) == 1 else role.unit + "s"
            listed = ", ".join(map(str, indices))
            parts.append(f"{role.name} {unit} {listed} on node {node[:8]} ({ips.get(node, '?')})")
    return "; ".join(parts)


def check_weight_sync(method: str, bundle_nodes: dict[str, list[str]]) -> None:
    """`rollout.weight_sync=file` hands weights over in /dev/shm of trainer rank 0's node: refuse it,
    with the way out, when an engine landed on another node."""
    engines, ranks = bundle_nodes.get("rollout", []), bundle_nodes.get("trainer", [])
    elsewhere = [i for i, node in enumerate(engines) if ranks and node != ranks[0]]
    if method == "file" and elsewhere:
        raise ValueError(
            f"rollout.weight_sync=file needs every engine on trainer rank 0's node (the weights go through "
            f"its /dev/shm), but engine(s) {', '.join(map(str, elsewhere))} are on another node; use "
            "rollout.weight_sync=broadcast, which works across nodes"
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` (the address the trainer group's rendezvous will listen on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
