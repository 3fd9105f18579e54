"""Pure-torch RL algorithm library: the IcePop-GRPO loss and its neighbours (docs/algorithm.md).

Functions of tensors and floats only: no config objects, no torch.distributed, and no import of
Ray, vLLM, DeepSpeed or transformers, so a researcher can use the loss inside any trainer.
"""

from icepop.algo.advantages import (
    ADVANTAGES,
    dr_grpo_advantages,
    group_mean_std,
    grpo_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    to_tokens,
    token_advantages,
)
from icepop.algo.aggregation import AGGREGATIONS, aggregate
from icepop.algo.corrections import CORRECTIONS, Correction, correction_weights, log_ratio
from icepop.algo.kl import KL_ESTIMATORS, kl_estimate
from icepop.algo.logprobs import logprobs_and_entropy, logprobs_and_entropy_naive
from icepop.algo.loss import KPOP_THRESHOLD, PolicyLoss, PolicyLossOptions, pg_loss, policy_loss
from icepop.algo.metrics import (
    abs_log_ratio_by_position,
    correction_metrics,
    entropy_metrics,
    log_ratio_histogram,
    masked_mean,
    mismatch_by_turn,
    mismatch_metrics,
    staleness_metrics,
    turn_index,
    weight_metrics,
)
from icepop.algo.preference import bradley_terry_loss, pairwise_accuracy, whiten
from icepop.algo.shaping import informative_groups, overlong_penalty
from icepop.algo.surrogates import OBJECTIVES
from icepop.algo.trust_region import ANCHORS

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "ANCHORS",
    "CORRECTIONS",
    "KL_ESTIMATORS",
    "KPOP_THRESHOLD",
    "OBJECTIVES",
    "Correction",
    "PolicyLoss",
    "PolicyLossOptions",
    "abs_log_ratio_by_position",
    "aggregate",
    "bradley_terry_loss",
    "correction_metrics",
    "correction_weights",
    "dr_grpo_advantages",
    "entropy_metrics",
    "group_mean_std",
    "grpo_advantages",
    "informative_groups",
    "kl_estimate",
    "log_ratio",
    "log_ratio_histogram",
    "logprobs_and_entropy",
    "logprobs_and_entropy_naive",
    "masked_mean",
    "mismatch_by_turn",
    "mismatch_metrics",
    "overlong_penalty",
    "pairwise_accuracy",
    "pg_loss",
    "policy_loss",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "staleness_metrics",
    "to_tokens",
    "token_advantages",
    "turn_index",
    "weight_metrics",
    "whiten",
]
