"""Rewards: built-in verifiers for the synthetic tasks, math answers and code (run in a contained
sandbox), custom reward functions resolved from "package.module:function", and a process pool that
scores batches under a timeout.

Importing this package is cheap: math-verify (sympy) is imported on first use, in the workers.
"""

from icepop.rewards.pool import RewardPool, Scores
from icepop.rewards.sandbox import SandboxLimits, SandboxResult, SandboxUnavailable, run_many, run_python
from icepop.rewards.verifiers import (
    BUILTIN_REWARD,
    CODE_TIMEOUT_SECONDS,
    VERIFIERS,
    builtin_reward,
    resolve_reward_fn,
    verify,
    verify_code,
    verify_countdown,
)

__all__ = [
    "BUILTIN_REWARD",
    "CODE_TIMEOUT_SECONDS",
    "VERIFIERS",
    "RewardPool",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "Scores",
    "builtin_reward",
    "resolve_reward_fn",
    "run_many",
    "run_python",
    "verify",
    "verify_code",
    "verify_countdown",
]
