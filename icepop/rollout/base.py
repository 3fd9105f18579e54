"""The `RolloutEngine` seam: what the RL loop needs from an inference engine, nothing more.

One small Protocol; `vllm.py` is the only implementation and the only module that imports vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from torch import Tensor

from icepop.rollout.noise import Noise
from icepop.types import Completion, SamplingSettings


class RolloutEngine(Protocol):
    """An inference engine holding one copy of the policy's weights."""

    def generate(
        self, prompt_ids: list[list[int]], samples_per_prompt: int, sampling: SamplingSettings
    ) -> list[list[Completion]]:
        """Sample `samples_per_prompt` responses for each prompt; result[i] belongs to prompt i.

        Each completion carries ℓ_inf for every sampled token under the processed sampling
        distribution (temperature applied, the same support the trainer uses).
        """
        ...

    def score(self, sequences: list[list[int]], prompt_len: int) -> list[list[float]]:
        """For each sequence, the log-probs of sequence[prompt_len:] given their prefixes (temperature
        1), all in one batch: the sync probe."""
        ...

    def load_weights(self, path: str, noise: tuple[float, int] | None = None) -> None:
        """Replace the weights with the full state dict (Hugging Face names) in a safetensors file;
        `noise` = (level, seed) adds seeded noise of level × each tensor's std (mismatch injection)."""
        ...

    def join_weight_group(self, addr: str, port: int, rank: int, world_size: int) -> str:
        """Join the weight group (icepop.comm) as member `rank` ≥ 1; trainer rank 0 is its sender.
        Returns the group's backend ("gloo", "nccl")."""
        ...

    def receive_weights(self, noise: tuple[float, int] | None = None) -> None:
        """Replace the weights with those broadcast over the weight group (full state dict, Hugging
        Face names; `noise` as for `load_weights`); collective with the trainer's `broadcast_weights`."""
        ...

    def load_tensors(self, tensors: Iterable[tuple[str, Tensor]], noise: Noise | None = None) -> None:
        """Replace the weights with the full state dict streamed as (Hugging Face name, tensor) pairs,
        from a trainer rank in the same process (cluster.placement=colocated); `noise` as above."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory (weights and KV cache) until `wake`; a no-op on CPU."""
        ...

    def wake(self) -> None:
        """Undo `sleep`."""
        ...

    def close(self) -> None:
        """Shut the engine down and free its memory; it is not used afterwards."""
        ...


def engine_class(backend: str) -> type:
    """The RolloutEngine implementation named by `rollout.backend` (imported only when chosen)."""
    if backend == "vllm":
        from icepop.rollout.vllm import VllmEngine

        return VllmEngine
    raise ValueError(f"rollout.backend={backend!r} is not one of: vllm")
