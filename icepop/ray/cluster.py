"""Ray for a run: start a local cluster on 127.0.0.1 or join one, reserve bundles, shut down.

Key design choice: every process of a run (driver, engines, trainer ranks) gets the same small set
of environment variables from `process_env`, so users never have to know them, and placement groups
reserve all bundles up front, so a cluster that is too small fails at start-up with one message
instead of hanging half-way through the first step.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

from icepop.config import Config

PLACEMENT_TIMEOUT_SECONDS = 120.0


def process_env(on_gpu: bool, local: bool) -> dict[str, str]:
    """Environment every process of the run needs (set where unset; never overrides the user).

    local: a single-node cluster that we start; gloo and NCCL then bind the loopback interface only.
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
    engines, trainer, reward = config.rollout, config.trainer, config.reward
    need = {"CPU": trainer.ranks * trainer.cpus_per_rank, "GPU": trainer.ranks * trainer.gpus_per_rank}
    if rollout:
        need["CPU"] += engines.engines * engines.cpus_per_engine
        need["GPU"] += engines.engines * engines.gpus_per_engine
    if rollout and reward.model_path is not None:
        need["CPU"] += reward.model_workers * reward.cpus_per_model_worker
        need["GPU"] += reward.model_workers * reward.gpus_per_model_worker
    return need


def start(config: Config) -> None:
    """Join `cluster.address`, or start a local single-node cluster whose listeners stay on 127.0.0.1."""
    import ray

    need = needed_resources(config)
    env = process_env(on_gpu=need["GPU"] > 0, local=config.cluster.address is None)
    os.environ.update(env)
    runtime_env = {"env_vars": env}
    if config.cluster.address is not None:
        ray.init(address=config.cluster.address, runtime_env=runtime_env, log_to_driver=True)
        _graceful_sigterm()
        return
    _keep_ray_on_loopback()
    num_cpus = config.cluster.num_cpus or int(need["CPU"]) + 1  # + 1 for the driver's own tasks
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        num_gpus=int(need["GPU"]) or None,
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=True,
    )
    _graceful_sigterm()


def _keep_ray_on_loopback() -> None:
    """Keep a single-node Ray from rewriting 127.0.0.1 to the machine's routable address (its agents
    and gRPC servers would then listen there and on 0.0.0.0). Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    once, when `ray` is first imported: the variable covers the processes Ray starts, and the constant
    its driver-side copy, since `ray` is already imported here (icepop.stages imports it)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def _graceful_sigterm() -> None:
    """ray.init installs a SIGTERM handler that aborts the driver on the spot; put back one that raises
    SystemExit, which unwinds through the stages' `finally` blocks (Ray shutdown, temp files)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def shutdown() -> None:
    """Stop Ray (and with it every actor of the run); safe to call when Ray is not running."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@dataclass
class Placement:
    """The run's placement groups; bundle i of a group hosts engine i or trainer rank i."""

    rollout: Any
    trainer: Any
    reward: Any = None
    """Bundle i hosts reward-model actor i (only when reward.model_path is set)."""


def reserve(config: Config, rollout: bool = True, trainer: bool = True) -> Placement:
    """Create and wait for the placement groups (rollout=False: trainer only, for SFT and reward-model
    training; trainer=False: engines and reward model only, for evaluation), or explain what the
    cluster lacks."""
    import ray
    from ray.util.placement_group import placement_group

    engines, ranks, reward = config.rollout, config.trainer, config.reward
    if config.cluster.placement == "colocated" and (engines.gpus_per_engine == 0 or ranks.gpus_per_rank == 0):
        raise ValueError(
            "cluster.placement=colocated shares GPUs between vLLM (asleep during training) and the "
            "trainer; it needs rollout.gpus_per_engine and trainer.gpus_per_rank > 0. "
            "Use disaggregated on CPU machines."
        )
    _check_capacity(config, ray.cluster_resources(), rollout)

    def bundles(wanted: bool, count: int, cpus: int, gpus: int) -> Any:
        return placement_group([{"CPU": cpus, **_gpus(gpus)}] * count, strategy="PACK") if wanted else None

    placement = Placement(
        rollout=bundles(rollout, engines.engines, engines.cpus_per_engine, engines.gpus_per_engine),
        trainer=bundles(trainer, ranks.ranks, ranks.cpus_per_rank, ranks.gpus_per_rank),
        reward=bundles(
            rollout and reward.model_path is not None,
            reward.model_workers,
            reward.cpus_per_model_worker,
            reward.gpus_per_model_worker,
        ),
    )
    groups = [pg for pg in (placement.rollout, placement.trainer, placement.reward) if pg is not None]
    ready, _ = ray.wait(
        [pg.ready() for pg in groups], num_returns=len(groups), timeout=PLACEMENT_TIMEOUT_SECONDS
    )
    if len(ready) != len(groups):
        raise RuntimeError(
            f"placement groups not ready after {PLACEMENT_TIMEOUT_SECONDS:.0f} s: the cluster has "
            f"{ray.available_resources()} available, the run needs {needed_resources(config, rollout)}"
        )
    return placement


def _gpus(count: int) -> dict[str, float]:
    return {"GPU": float(count)} if count else {}


def _check_capacity(config: Config, total: dict[str, float], rollout: bool = True) -> None:
    need = needed_resources(config, rollout)
    short = [kind for kind in ("CPU", "GPU") if need[kind] > total.get(kind, 0.0)]
    if short:
        engines, trainer, reward = config.rollout, config.trainer, config.reward
        parts = [
            f"rollout needs {engines.engines * engines.cpus_per_engine} CPUs/"
            f"{engines.engines * engines.gpus_per_engine} GPUs"
            if rollout
            else "no rollout",
            f"trainer {trainer.ranks * trainer.cpus_per_rank} CPUs/"
            f"{trainer.ranks * trainer.gpus_per_rank} GPUs",
        ]
        if rollout and reward.model_path is not None:
            parts.append(
                f"reward model {reward.model_workers * reward.cpus_per_model_worker} CPUs/"
                f"{reward.model_workers * reward.gpus_per_model_worker} GPUs"
            )
        parts.append(f"cluster has {total.get('CPU', 0):.0f} CPUs/{total.get('GPU', 0):.0f} GPUs")
        raise RuntimeError(f"the cluster is too small ({', '.join(short)}): " + ", ".join(parts))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the trainer group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
