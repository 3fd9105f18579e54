"""Rewards: built-in verifiers for the synthetic tasks and math answers, custom reward functions
resolved from "package.module:function", and a process pool that scores batches under a timeout.

Importing this package is cheap: math-verify (sympy) is imported on first use, in the workers.
"""

from icepop.rewards.pool import RewardPool, Scores
from icepop.rewards.verifiers import (
    BUILTIN_REWARD,
    VERIFIERS,
    builtin_reward,
    resolve_reward_fn,
    verify,
    verify_countdown,
)

__all__ = [
    "BUILTIN_REWARD",
    "VERIFIERS",
    "RewardPool",
    "Scores",
    "builtin_reward",
    "resolve_reward_fn",
    "verify",
    "verify_countdown",
]
