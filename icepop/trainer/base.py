"""The trainer seam: one data-parallel rank of a trainer group, as two small Protocols for the two
things it trains: `PolicyTrainer` (a causal LM: SFT and the RL updates, log-probs, weights for the
engines) and `RewardModelTrainer` (model_kind "reward": Bradley–Terry training and scores). Both save,
resume and close alike (`TrainerRank`).

`deepspeed.py` is the only implementation (one class, both kinds) and the only module that imports
DeepSpeed. Every rank of a trainer group runs the same calls on its own shard of the batch; the
global counts that make the loss exact across ranks and micro-batches come with the call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from torch import Tensor

from icepop.algo import PolicyLossOptions
from icepop.types import PreferenceBatch, RLBatch, SFTBatch


class TrainerRank(Protocol):
    """What every rank of a trainer group does, whatever it trains."""

    def save(self, directory: str) -> None:
        """Save a Hugging Face checkpoint (config, tokenizer, weights) that vLLM and transformers load,
        under LoRA with the adapter alone in peft's format in its `adapter/`; collective like
        `export_weights`."""
        ...

    def save_state(self, directory: str) -> None:
        """Save what exact resumption needs (weights, optimizer, scheduler); collective, every rank writes."""
        ...

    def load_state(self, directory: str) -> None:
        """Restore what `save_state` wrote; collective."""
        ...

    def close(self) -> None:
        """Free the model (and a colocated engine) and leave the process group."""
        ...


class PolicyTrainer(TrainerRank, Protocol):
    """One rank training a policy (a causal LM)."""

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, temperature: float) -> Tensor:
        """ℓ of every label position, [B, L-1], with the current weights and no gradient."""
        ...

    def train_rl(
        self, batch: RLBatch, options: PolicyLossOptions, global_token_count: int, global_seq_count: int
    ) -> dict[str, float]:
        """One optimizer step of the policy loss on this rank's shard; returns metrics."""
        ...

    def last_old_logprobs(self) -> Tensor:
        """ℓ_old of the rows of the last `train_rl` call, [rows, L-1]: its batch's old_logprobs, or, when
        they were None (on-policy), the training forward's own detached ℓ at the step's starting weights
        — equal to `logprobs` before the step at the replies' positions (what the step's metrics read;
        0 may stand before them), without that second forward."""
        ...

    def train_sft(self, batch: SFTBatch, global_token_count: int) -> dict[str, float]:
        """One optimizer step of the token-mean cross-entropy on assistant tokens; returns metrics."""
        ...

    def export_weights(self, path: str) -> None:
        """Write the full weights (gathered under ZeRO-3; under LoRA merged: base + ΔW) as one safetensors
        file with the names an inference engine loads; collective: every rank calls it, rank 0 writes."""
        ...

    def join_weight_group(self, addr: str, port: int, world_size: int) -> None:
        """Rank 0 joins the weight group (icepop.comm) as its sender; collective with the engines."""
        ...

    def broadcast_weights(self) -> int:
        """Send the full weights (names as for `export_weights`) over the weight group; collective over
        the ranks and with the engines' `receive_weights`. Returns the bytes sent by this rank."""
        ...

    def weight_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """The full weights (names as for `export_weights`) as (name, tensor) pairs on every rank, for
        an engine in the rank's own process; collective: every rank consumes it to the end."""
        ...


class RewardModelTrainer(TrainerRank, Protocol):
    """One rank training a reward model (model_kind "reward": one score per sequence)."""

    def train_rm(self, batch: PreferenceBatch, global_pair_count: int) -> dict[str, float]:
        """One optimizer step of the Bradley–Terry loss on this rank's pairs (model_kind "reward")."""
        ...

    def scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Reward-model scores [B], read at each row's last token, no gradient (model_kind "reward")."""
        ...


def backend_class(backend: str) -> type:
    """The implementation named by `trainer.backend` (a `PolicyTrainer` and `RewardModelTrainer`),
    imported only when chosen."""
    if backend == "deepspeed":
        from icepop.trainer.deepspeed import DeepSpeedTrainer

        return DeepSpeedTrainer
    raise ValueError(f"trainer.backend={backend!r} is not one of: deepspeed")
