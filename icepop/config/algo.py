"""The RL objective (advantages, correction, clip, aggregation, KL) and the rewards."""

from __future__ import annotations

from dataclasses import dataclass, fields

from icepop.algo import ADVANTAGES, AGGREGATIONS, PolicyLossOptions
from icepop.config.checks import non_negative, one_of, positive, zero_or_one_gpu
from icepop.rewards.verifiers import VERIFIERS

LOSS = PolicyLossOptions()
"""The loss library's own defaults, the one home of every loss option's default: algo's fields below take
theirs from it (tests/test_config.py checks that the two sets of fields cannot drift apart)."""
LOSS_FIELDS = tuple(f.name for f in fields(PolicyLossOptions) if f.name != "max_response_length")
"""The loss options algo.* sets (max_response_length follows the rollout's reply length)."""


@dataclass
class AlgoConfig:
    prompts_per_step: int = 16
    """Prompts sampled per RL step."""
    samples_per_prompt: int = 8
    """Responses per prompt (the GRPO group size)."""
    updates_per_step: int = 1
    """Optimizer steps per RL step (the batch is split into this many mini-batches)."""
    advantage: str = "grpo"
    """Advantage estimator: "grpo", "dr_grpo", "rloo" or "reinforce_pp"."""
    correction: str = LOSS.correction
    """Train/inference mismatch correction (see icepop.algo.CORRECTIONS)."""
    ratio_low: float = LOSS.ratio_low
    """α, the lower bound of the kept ratio band (or unused by one-sided corrections)."""
    ratio_high: float = LOSS.ratio_high
    """β, the upper bound (the cap C for "tis", "token-mis", "seq-tis", "seq-mis")."""
    kpop_threshold: float = LOSS.kpop_threshold
    """φ for "kpop"."""
    anchor: str = LOSS.anchor
    """What "dppo-tv", "dppo-kl", "opsm" and "trm" measure the current policy against: "rollout" (π_inf)
    or "old" (π_old); docs/algorithm.md §10."""
    dppo_tv_threshold: float = LOSS.dppo_tv_threshold
    """δ for "dppo-tv" (a probability difference)."""
    dppo_kl_threshold: float = LOSS.dppo_kl_threshold
    """δ for "dppo-kl" (a binary KL)."""
    opsm_threshold: float = LOSS.opsm_threshold
    """δ for "opsm" (a sequence's mean log-ratio of anchor to current policy)."""
    trm_threshold: float = LOSS.trm_threshold
    """δ for "trm" (the largest |log-ratio| of current policy to anchor a kept sequence may have)."""
    objective: str = LOSS.objective
    """"ppo", "gspo" or "cispo"."""
    clip_low: float = LOSS.clip_low
    """ε_low of the PPO clip."""
    clip_high: float = LOSS.clip_high
    """ε_high of the PPO clip (DAPO clip-higher)."""
    dual_clip: float | None = LOSS.dual_clip
    """Dual-clip constant c > 1, or None."""
    agg: str = LOSS.agg
    """Loss aggregation (see icepop.algo.AGGREGATIONS); the paper uses "seq-mean-token-mean"."""
    kl_coef: float = LOSS.kl_coef
    """γ, weight of KL(π_θ ‖ π_ref) (the paper uses 0); > 0 computes reference log-probs each step."""
    kl_estimator: str = LOSS.kl_estimator
    """"k1", "k2" or "k3"."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose samples all got the same rule reward (nothing to learn) are
    dropped and more prompts generated until the step's prompts_per_step groups are full."""
    max_sampling_rounds: int = 3
    """Generation rounds a step may take to fill its batch (the first included); then it trains on the
    informative groups it has, and says so."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: over the last this many tokens before the reply limit, a penalty
    growing linearly to −algo.overlong_penalty is added to the reward (0: off); docs/algorithm.md §11."""
    overlong_penalty: float = 1.0
    """The penalty at the reply limit (DAPO: 1)."""
    mask_truncated: bool = False
    """Leave replies cut at the length limit out of the loss (DAPO's overlong filtering)."""

    def __post_init__(self) -> None:
        one_of("algo.advantage", self.advantage, ADVANTAGES)
        one_of("algo.agg", self.agg, AGGREGATIONS)
        positive(
            **{
                "algo.prompts_per_step": self.prompts_per_step,
                "algo.samples_per_prompt": self.samples_per_prompt,
                "algo.updates_per_step": self.updates_per_step,
            }
        )
        non_negative(**{"algo.kl_coef": self.kl_coef, "algo.overlong_buffer": self.overlong_buffer,
                        "algo.overlong_penalty": self.overlong_penalty})  # fmt: skip
        positive(**{"algo.max_sampling_rounds": self.max_sampling_rounds})
        if self.samples_per_prompt < 2:
            raise ValueError(
                f"algo.samples_per_prompt={self.samples_per_prompt}: group-relative advantages compare the "
                "samples of one prompt, so a group of one has advantage 0 and trains nothing; use 2 or more "
                "(e.g. 8)"
            )
        self.loss_options()  # raises ValueError naming the field if the loss options are inconsistent
        if not self.ratio_low <= 1.0 <= self.ratio_high:
            raise ValueError(
                f"the band [algo.ratio_low, algo.ratio_high] = [{self.ratio_low}, {self.ratio_high}] must "
                "hold 1 (trainer and engine agreeing), or every token is masked; the paper's is [0.5, 5]"
            )

    def loss_options(self, max_response_length: int | None = None) -> PolicyLossOptions:
        """The loss's options as the pure loss library takes them."""
        chosen = {name: getattr(self, name) for name in LOSS_FIELDS}
        return PolicyLossOptions(**chosen, max_response_length=max_response_length)


@dataclass
class RewardConfig:
    function: str | None = None
    """Custom reward as a dotted path "pkg.module:function"; None uses the built-in verifier of the task."""
    task: str | None = None
    """Verifier for dataset rows without a task column ("math", "arithmetic", "countdown", "code");
    None: "math"."""
    workers: int = 2
    """Reward worker processes."""
    timeout_seconds: float = 10.0
    """Per-sample time limit; a sample past it scores 0 and is counted."""
    rule_weight: float = 1.0
    """Weight of the rule reward (verifier or `function`); 0 turns it off."""
    model_path: str | None = None
    """Reward model (a sequence-classification checkpoint, e.g. +recipe=rm's output); None: rule only."""
    model_weight: float = 1.0
    """Weight of the reward model's score (whitened over the step's batch when `normalize`)."""
    normalize: bool = True
    """Whiten reward-model scores over each step's batch (mean 0, std 1) before weighting."""
    model_workers: int = 1
    """Reward-model scoring actors (Ray), each with its own placement bundle."""
    cpus_per_model_worker: int = 1
    """CPUs reserved per reward-model actor."""
    gpus_per_model_worker: int = 0
    """GPUs per reward-model actor: 0 (CPU, also on a GPU machine) or 1."""
    model_batch_size: int = 32
    """Conversations per reward-model forward."""
    max_error_steps: int = 3
    """Stop the run, with the first error's message, after this many steps in a row in which the rule
    reward raised on every sample (instead of training on zeros)."""

    def __post_init__(self) -> None:
        positive(
            **{
                "reward.workers": self.workers,
                "reward.timeout_seconds": self.timeout_seconds,
                "reward.model_workers": self.model_workers,
                "reward.model_batch_size": self.model_batch_size,
                "reward.cpus_per_model_worker": self.cpus_per_model_worker,
                "reward.max_error_steps": self.max_error_steps,
            }
        )
        non_negative(**{"reward.rule_weight": self.rule_weight, "reward.model_weight": self.model_weight})
        zero_or_one_gpu(
            "reward.gpus_per_model_worker", self.gpus_per_model_worker,
            "a worker's model sits on one GPU; for more GPUs, more reward.model_workers",
        )  # fmt: skip
        if self.task is not None and self.task not in VERIFIERS:
            raise ValueError(
                f"reward.task={self.task!r} has no built-in verifier; choose one of {', '.join(VERIFIERS)}, "
                "or score with a custom reward.function=package.module:function"
            )
