"""The frozen reference policy for the KL term: the stage's starting weights, log-probs only.

Kept apart from the DeepSpeed ranks on purpose: it has no optimizer and no collective, so one
process scores the whole batch, and a run with kl_coef = 0 (the paper's setting) never loads it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from icepop.algo import logprobs_and_entropy
from icepop.trainer.models import load_model


def release_cached_memory(device: torch.device) -> bool:
    """Hand the caching allocator's free blocks back to the GPU after a call; True where it did (CUDA).
    The reference policy shares trainer rank 0's GPU: without this, the activations of its largest batch
    (logits of [rows, length, vocabulary]) stay reserved in its process, out of reach of the rank and of
    a colocated engine waking into that GPU. On CPU there is no cache to release."""
    if device.type != "cuda":
        return False
    torch.cuda.empty_cache()
    return True


class ReferencePolicy:
    """log π_ref of every label position, micro-batch by micro-batch, without gradients."""

    def __init__(self, model_path: str, *, dtype: str = "float32", micro_batch_size: int = 8) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_path, "policy", dtype).to(self.device).eval()
        self.micro_batch_size = micro_batch_size

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0) -> Tensor:
        """[B, L-1] float32 on the CPU; position j is the log-prob of input_ids[:, j+1]."""
        result = self._logprobs(input_ids, attention_mask, temperature)
        release_cached_memory(self.device)  # once _logprobs's device tensors are gone
        return result

    @torch.no_grad()
    def _logprobs(self, input_ids: Tensor, attention_mask: Tensor, temperature: float) -> Tensor:
        parts = []
        for start in range(0, input_ids.shape[0], self.micro_batch_size):
            ids = input_ids[start : start + self.micro_batch_size].to(self.device)
            mask = attention_mask[start : start + self.micro_batch_size].to(self.device)
            logits = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=False).logits
            parts.append(logprobs_and_entropy(logits, ids[:, 1:], temperature=temperature)[0].float().cpu())
        return torch.cat(parts) if parts else torch.empty(0, input_ids.shape[1] - 1)

    def close(self) -> None:
        del self.model
