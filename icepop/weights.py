"""Weight sync checks: after every sync, engine and trainer must agree on one fixed probe sequence.

Stale or corrupted weights in the inference engine are the most damaging silent bug in RL for LLMs:
every ratio k is then wrong, and IcePop masks the symptom. So a probe far beyond the engine dtype's
noise is an error that stops the run, not a warning.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import ray
import torch

from icepop.config import RolloutConfig
from icepop.types import Prompt

NOISE = {"float32": 1e-3, "bfloat16": 0.1}
"""Default largest |Δ log p| on the probe per engine dtype (measured: 5e-7 in fp32, 2e-3 in bf16)."""


class WeightSyncError(RuntimeError):
    """The engine's weights do not match the trainer's after a sync."""


def probe_sequence(prompts: list[Prompt], length: int = 24) -> list[int]:
    """A fixed token sequence to score: the first held-out prompt followed by a slice of another's tokens."""
    first = prompts[0].prompt_ids
    tail = prompts[1 % len(prompts)].prompt_ids[-length:]
    return first + tail


def probe_difference(rollout: Any, trainer: Any, token_ids: list[int]) -> float:
    """max |ℓ_engine − ℓ_trainer| over the probe's tokens (after its first), over every engine."""
    engine_scores = ray.get(rollout.async_score(token_ids, 1))
    ids = torch.tensor([token_ids] * trainer.ranks)  # one row per rank: every rank takes part
    blocks = ray.get(trainer.async_logprobs(ids, torch.ones_like(ids), 1.0))
    trainer_scores = blocks[0][0]
    return max(
        float((torch.tensor(scores, dtype=torch.float64) - trainer_scores.double()).abs().max())
        for scores in engine_scores
    )


def check_probe(difference: float, rollout: RolloutConfig, step: int) -> None:
    """Raise WeightSyncError when the probe difference is beyond the tolerance."""
    tolerance = rollout.probe_tolerance if rollout.probe_tolerance is not None else NOISE[rollout.dtype]
    if not difference <= tolerance:  # also catches NaN
        raise WeightSyncError(
            f"after the weight sync of step {step}, engine and trainer disagree on the probe sequence: "
            f"max |Δ log p| = {difference:.3g} > {tolerance:g} (rollout.probe_tolerance; noise of "
            f"{rollout.dtype} engines is far below). The engine holds stale or corrupted weights."
        )


def shm_dir() -> str:
    """Where weight files travel between local processes: /dev/shm when present (RAM), else the temp dir."""
    return (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    )
