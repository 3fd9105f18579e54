"""Where a run's workers go: roles (engines, trainer ranks, reward-model workers) as identical bundles,
what they need in all, why a cluster's nodes cannot hold them (one message naming each role and node),
and which node each bundle landed on. Pure functions of the config and of the nodes' resources as Ray
reports them, so the placement logic is tested without a cluster.

Steering roles to nodes needs no config: a node started with the custom resource `icepop_rollout`,
`icepop_trainer` or `icepop_reward_model` (`ray start --resources='{"icepop_trainer": 1}'`) is the only
kind of node that role's bundles go to; each bundle asks for a sliver of it (`ROLE_RESOURCE_SHARE`), so
one such node hosts any number of them. Where no node advertises a role's resource, its bundles go
anywhere that fits.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from icepop.config import Config
from icepop.ray.engine_placement import engine_placement

ROLE_RESOURCE_SHARE = 0.001
"""How much of its role resource (e.g. `icepop_trainer`) each bundle reserves: a marker, not a limit."""

REFERENCE_GPU_SHARE = 0.1
"""The share of trainer rank 0's GPU that the reference policy (KL term) reserves: it runs beside rank 0
on its bundle, and each rank reserves the rest of its GPU, so Ray hands both actors the same device."""


def gpu_requests(config: Config) -> tuple[float, float]:
    """(each trainer rank's, the reference policy's) GPU request inside a trainer bundle: together they
    make up the bundle's GPU (`REFERENCE_GPU_SHARE`); both 0 on CPU."""
    gpus = config.trainer.gpus_per_rank
    return (gpus - REFERENCE_GPU_SHARE, REFERENCE_GPU_SHARE) if gpus else (0.0, 0.0)


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
    no trainer ranks). Engines get bundles where their placement says so (colocated ones live in the
    ranks'; without ranks, for evaluation, they need their own)."""
    engines, ranks, reward = config.rollout, config.trainer, config.reward
    found = []
    if rollout and engine_placement(config, with_trainer=trainer).own_bundles:
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


def unused_gpus(
    config: Config, nodes: list[dict[str, float]], rollout: bool = True, trainer: bool = True
) -> str | None:
    """Why a run that reserves no GPU must not start on a cluster that has some, in one message; None
    otherwise. Its workers would run on CPU beside idle GPUs (and a CUDA build of vLLM has no CPU
    backend): the user meant cluster=gpu, or must say CPU by hiding the GPUs."""
    gpus = sum(node.get("GPU", 0.0) for node in nodes)
    if gpus == 0 or any(role.gpus for role in roles(config, rollout, trainer)):
        return None
    return (
        f"the cluster has {_plural(gpus, 'GPU')} but this run reserves none (rollout.gpus_per_engine=0, "
        "trainer.gpus_per_rank=0): add cluster=gpu to give every engine and trainer rank a GPU. To run on "
        "CPU on purpose, hide the GPUs from Ray: CUDA_VISIBLE_DEVICES= python -m icepop.train ..."
    )


def check_capacity(
    config: Config,
    cluster: dict[str, float] | list[dict[str, float]],
    rollout: bool = True,
    trainer: bool = True,
) -> None:
    """RuntimeError with `placement_shortfall`'s or `unused_gpus`'s message; `cluster` is a list of the
    nodes' resources as Ray reports them (what they have, not what the run asked for), or one dict of
    totals (a single node)."""
    nodes = [cluster] if isinstance(cluster, dict) else cluster
    message = placement_shortfall(config, nodes, rollout, trainer) or unused_gpus(
        config, nodes, rollout, trainer
    )
    if message is not None:
        raise RuntimeError(message)


def needed_resources(config: Config, rollout: bool = True) -> dict[str, float]:
    """Total CPUs and GPUs the run's bundles reserve (rollout=False: the trainer's alone)."""
    need = {"CPU": 0.0, "GPU": 0.0}
    for role in roles(config, rollout=rollout):
        need["CPU"] += role.count * role.cpus
        need["GPU"] += role.count * role.gpus
    return need


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


def describe_devices(config: Config, rollout: bool = True, trainer: bool = True) -> str:
    """'rollout engines: 1 GPU each; trainer ranks: 1 GPU each; reference policy: a share of trainer
    rank 0's GPU'. Every actor that reserves no GPU sees none (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO,
    icepop.ray.cluster.process_env), so it runs on CPU by design."""
    wanted = roles(config, rollout, trainer)
    parts = [f"{role.name} {role.unit}s: {'1 GPU each' if role.gpus else 'CPU'}" for role in wanted]
    if rollout and not engine_placement(config, with_trainer=trainer).own_bundles:
        parts.insert(0, "rollout engines: inside the trainer ranks, on their devices")
    if rollout and trainer and config.algo.kl_coef != 0.0:  # an RL stage with a KL term
        share = f"{REFERENCE_GPU_SHARE:g} of trainer rank 0's GPU" if config.trainer.gpus_per_rank else "CPU"
        parts.append(f"reference policy: {share}")
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
