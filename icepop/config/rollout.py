"""Where rollouts come from: the inference engines and the cluster they run on."""

from __future__ import annotations

from dataclasses import dataclass

from icepop.config.checks import DTYPES, one_of, positive


@dataclass
class RolloutConfig:
    backend: str = "vllm"
    """Inference engine implementation (icepop.rollout.base.engine_class)."""
    engines: int = 1
    """Number of vLLM engines (Ray actors); prompts are split across them, groups kept together."""
    temperature: float = 1.0
    """Sampling temperature; the trainer scores tokens under the same processed distribution."""
    top_p: float = 1.0
    """Nucleus sampling; keep 1.0 for RL unless the trainer applies the same truncation."""
    top_k: int = 0
    """Top-k sampling, 0 = off; keep 0 for RL for the same reason."""
    max_new_tokens: int = 32
    """Longest response; longer ones are truncated and counted."""
    dtype: str = "float32"
    """Engine weight dtype; "bfloat16" against a float32 trainer gives a real, small mismatch."""
    kv_cache_gib: float = 0.25
    """KV-cache size per engine on CPU (vLLM's default asks for most of the RAM)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of a GPU's memory an engine may take (GPU only)."""
    cpus_per_engine: int = 1
    """CPUs reserved per engine in the placement group."""
    gpus_per_engine: int = 0
    """GPUs per engine (tensor parallel size); 0 on CPU machines."""
    weight_sync: str = "broadcast"
    """"broadcast" (rank 0 → engines over a gloo/NCCL group, multi-node) or "file" (/dev/shm, one node)."""
    mismatch_noise: float = 0.0
    """Stress test: noise of this × each tensor's std added to the engine's weights after every sync."""
    max_restarts: int = 3
    """Engines that die are restarted, re-synced and the step retried, at most this many times a run."""
    probe_tolerance: float | None = None
    """Sync probe limit on |Δ log p|: its max for float32 engines (None: 1e-3), its mean over the probe
    tokens for bfloat16 ones (None: 0.1), whose single tokens jump with MoE routing flips."""

    def __post_init__(self) -> None:
        one_of("rollout.dtype", self.dtype, DTYPES)
        one_of("rollout.weight_sync", self.weight_sync, ("broadcast", "file"))
        positive(
            **{
                "rollout.engines": self.engines,
                "rollout.temperature": self.temperature,
                "rollout.max_new_tokens": self.max_new_tokens,
                "rollout.kv_cache_gib": self.kv_cache_gib,
            }
        )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p must be in (0, 1]; got {self.top_p}")


@dataclass
class ClusterConfig:
    address: str | None = None
    """Ray address to join ("auto" or "host:port"); None starts a local cluster on 127.0.0.1."""
    num_cpus: int | None = None
    """Logical CPUs of the local cluster; None: enough for every bundle plus one for the driver's tasks."""
    placement: str = "disaggregated"
    """"disaggregated" (separate bundles) or "colocated" (GPU only: shared GPUs, vLLM asleep in training)."""

    def __post_init__(self) -> None:
        one_of("cluster.placement", self.placement, ("disaggregated", "colocated"))
