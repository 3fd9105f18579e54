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

PRECISIONS = ("fp8", "bfloat16", "float16", "float32")
"""The probe's precisions, least precise first (`probe_precision` takes the first one either side has)."""
PROBES = {"float32": 1, "float16": 8, "bfloat16": 8, "fp8": 8}
"""Probe sequences scored after every sync, by the least precise side: in float32 stale weights move
every probe token far past the tolerance, so one sequence (a held-out prompt plus up to 24 tokens; each
engine scores it) tells, and each costs a forward on both sides (SmolLM2-135M: ≈0.15 s of a W1 step's
0.65 s sync for the second one); the other checks are a mean over tokens, so they take more of them."""
TOLERANCE = {"float32": 1e-3, "float16": 0.03, "bfloat16": 0.1, "fp8": 0.2}
"""Default limit by the least precise side, on the largest |Δ log p| of a probe token when both are
float32 (exact up to 5e-7 here) and on the mean |Δ log p| over all probe tokens otherwise: there a
single token's difference is no evidence — a routing flip of an MoE moved one probe token by 2.2 at
exactly synced weights in bfloat16 — while the mean stays at 0.01-0.05 synced and reaches 2.4 with
stale weights. Synced means measured on the SFT-warmed tiny dense model against its float32 trainer
(`+recipe=rlvr`, CPU): float16 1e-3, bfloat16 9e-3, fp8 (FP8 weight rounding, simulated, in a bfloat16
engine) 2.2e-2 — and on the random tiny models with perturbed weights (tests/test_rollout_precision.py)
float16 7e-4, fp8 4.6e-2, stale 0.52. Each limit leaves about 10× headroom for larger models and MoE
routing, with stale weights above it. FP8 on a GPU quantizes activations too (W8A8): its mismatch is not
measured here; raise rollout.probe_tolerance if a synced run trips it."""


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
    count = PROBES[probe_precision(rollout.dtype, trainer_dtype, rollout.quantization)]
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


def probe_precision(engine_dtype: str, trainer_dtype: str, quantization: str | None = None) -> str:
    """The precision whose noise the probe must allow: the least precise of the engine's dtype, the
    trainer's and the engine's quantization ("fp8": its weights are FP8 whatever the dtypes)."""
    sides = (engine_dtype, trainer_dtype, quantization)
    return next(precision for precision in PRECISIONS if precision in sides)


def check_probe(difference: ProbeDifference, rollout: RolloutConfig, trainer_dtype: str, step: int) -> None:
    """Raise WeightSyncError when the probe difference is beyond the tolerance (see TOLERANCE) of the
    less precise side: a float32 engine against a bfloat16 trainer is as noisy as a bfloat16 engine."""
    precision = probe_precision(rollout.dtype, trainer_dtype, rollout.quantization)
    tolerance = rollout.probe_tolerance if rollout.probe_tolerance is not None else TOLERANCE[precision]
    statistic, value = ("max", difference.max) if precision == "float32" else ("mean", difference.mean)
    if not value <= tolerance:  # also catches NaN
        engine = f"an FP8 ({rollout.dtype})" if rollout.quantization else f"a {rollout.dtype}"
        raise WeightSyncError(
            f"after the weight sync of step {step}, engine and trainer disagree on the probe sequences: "
            f"{statistic} |Δ log p| = {value:.3g} > {tolerance:g} (rollout.probe_tolerance; the numerical "
            f"noise of {engine} engine against a {trainer_dtype} trainer is below it). The engine "
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
