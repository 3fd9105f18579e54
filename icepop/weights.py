"""Weight sync checks: after every sync, engine and trainer must agree on fixed probe sequences.

Stale or corrupted weights in the inference engine are the most damaging silent bug in RL for LLMs:
every ratio k is then wrong, and IcePop masks the symptom. So a probe far beyond the engine dtype's
noise is an error that stops the run, not a warning.

Pure functions of token ids and log-probs: `icepop.ray.engines.Engines.probe` has both sides score the
sequences and hands the scores here.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import torch

from icepop.config import RolloutConfig
from icepop.types import Prompt

PROBES = {"float32": 2, "bfloat16": 8}
"""Probe sequences scored after every sync, by the less precise of the two dtypes: in float32 stale
weights move every probe token far past the tolerance, so two sequences (each a held-out prompt plus up
to 24 tokens) tell; the bfloat16 check is a mean over tokens, so it takes more of them."""
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}
"""Default limit by the less precise of the engine's and trainer's dtypes, on the largest |Δ log p| of a
probe token when both are float32 (exact up to 5e-7 here) and on the mean |Δ log p| over all probe
tokens when either is bfloat16: there a single token's difference is no evidence — a routing flip of
an MoE moved one probe token by 2.2 at exactly synced weights — while the mean stays at 0.01-0.05
synced and reaches 2.4 with stale weights."""


class WeightSyncError(RuntimeError):
    """The engine's weights do not match the trainer's after a sync."""


@dataclass(frozen=True)
class ProbeDifference:
    """|ℓ_engine − ℓ_trainer| over every probe token and every engine."""

    max: float
    mean: float


def probe_sequences(prompts: list[Prompt], rollout: RolloutConfig, trainer_dtype: str) -> list[list[int]]:
    """Fixed token sequences to score, as many as `PROBES` gives the dtypes: held-out prompt i followed by
    the last tokens of prompt i + 1 (at most 24, and no more than a reply's length)."""
    count = PROBES[probe_precision(rollout.dtype, trainer_dtype)]
    length, n = min(24, rollout.max_new_tokens), len(prompts)
    return [prompts[i % n].prompt_ids + prompts[(i + 1) % n].prompt_ids[-length:] for i in range(count)]


def probe_shares(sequences: int, engines: int) -> list[list[int]]:
    """Which probe sequences each engine scores: contiguous shares of about sequences / engines, at least
    one each (wrapping around), so that every engine is checked and none scores what another did."""
    size = max(1, math.ceil(sequences / engines))
    return [[(e * size + j) % sequences for j in range(size)] for e in range(engines)]


def probe_rows(sequences: list[list[int]], ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the sequences for the trainer, right-padded, repeated so that each
    of `ranks` ranks gets rows (its share of a collective forward)."""
    width = max(map(len, sequences))
    rows = sequences * math.ceil(ranks / len(sequences))
    ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in rows])
    mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in rows])
    return ids, mask


def probe_difference(
    shares: list[list[int]], per_engine: list[list[list[float]]], trainer_scores: torch.Tensor
) -> ProbeDifference:
    """|ℓ_engine − ℓ_trainer| of every probe token: engine e scored sequences shares[e] (their tokens
    after the first), the trainer every row of `probe_rows` ([rows, width - 1] log-probs)."""
    trainer_scores = trainer_scores.double()
    diffs = [
        (torch.tensor(scores, dtype=torch.float64) - trainer_scores[i, : len(scores)]).abs()
        for share, engine_scores in zip(shares, per_engine, strict=True)
        for i, scores in zip(share, engine_scores, strict=True)
    ]
    every = torch.cat(diffs)
    return ProbeDifference(float(every.max()), float(every.mean()))


def probe_precision(engine_dtype: str, trainer_dtype: str) -> str:
    """The dtype whose noise the probe must allow: the less precise of the engine's and the trainer's."""
    return "bfloat16" if "bfloat16" in (engine_dtype, trainer_dtype) else "float32"


def check_probe(difference: ProbeDifference, rollout: RolloutConfig, trainer_dtype: str, step: int) -> None:
    """Raise WeightSyncError when the probe difference is beyond the tolerance (see TOLERANCE) of the
    less precise side: a float32 engine against a bfloat16 trainer is as noisy as a bfloat16 engine."""
    precision = probe_precision(rollout.dtype, trainer_dtype)
    tolerance = rollout.probe_tolerance if rollout.probe_tolerance is not None else TOLERANCE[precision]
    statistic, value = ("max", difference.max) if precision == "float32" else ("mean", difference.mean)
    if not value <= tolerance:  # also catches NaN
        raise WeightSyncError(
            f"after the weight sync of step {step}, engine and trainer disagree on the probe sequences: "
            f"{statistic} |Δ log p| = {value:.3g} > {tolerance:g} (rollout.probe_tolerance; the numerical "
            f"noise of a {rollout.dtype} engine against a {trainer_dtype} trainer is below it). The engine "
            "holds stale or corrupted weights."
        )


def shm_dir() -> str:
    """Where weight files travel between local processes: $ICEPOP_SHM_DIR (e.g. where a container's
    64 MB /dev/shm cannot hold a model), else /dev/shm when present (RAM), else the temp dir."""
    if os.environ.get("ICEPOP_SHM_DIR"):
        return os.environ["ICEPOP_SHM_DIR"]
    return (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    )
