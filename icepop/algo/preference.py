"""Reward-model losses on preference pairs: Bradley–Terry, and the pairwise accuracy it is judged by.

Bradley & Terry (1952); as used for RLHF reward models in Ouyang et al. 2022 (arXiv 2203.02155, §3.5):
P(chosen ≻ rejected) = σ(r_c − r_r), trained by minimising −log σ(r_c − r_r). `logsigmoid` keeps it
finite for any score gap, and the sum is divided by the *global* number of pairs so that micro-batches
and data-parallel ranks add up to the mean over the whole batch (as the policy loss does with tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, global_pair_count: int | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ −log σ(r_c − r_r) / global_pair_count (default: this batch's pairs); scores are [P] floats.

    Metrics (detached, over this call's pairs): accuracy (r_c > r_r; ties count as wrong), mean margin.
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(
            f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores {tuple(rejected_scores.shape)} "
            "must be 1-d tensors of the same length (one score per pair)"
        )
    pairs = chosen_scores.numel() if global_pair_count is None else global_pair_count
    if pairs <= 0:
        raise ValueError(f"global_pair_count={global_pair_count} must be positive")
    margin = chosen_scores.float() - rejected_scores.float()
    loss = -F.logsigmoid(margin).sum() / pairs
    metrics = {
        "accuracy": pairwise_accuracy(chosen_scores, rejected_scores),
        "margin": margin.detach().mean(),
    }
    return loss, metrics


def pairwise_accuracy(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Fraction of pairs whose chosen score is strictly higher (a tie is not a correct ranking)."""
    return (chosen_scores.detach() > rejected_scores.detach()).float().mean()


def whiten(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """(s − mean) / std over all scores (std with Bessel's correction; 0 for fewer than 2 scores):
    reward-model scores on the policy's scale-free footing before they are mixed with rule rewards."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / (scores.std() + eps)
