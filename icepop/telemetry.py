"""Mismatch telemetry beyond the per-step metrics: the log k histogram and the mean |log k| by response
position of every step, kept in the run directory, and three alerts on the metric stream, printed and
logged as events.

(a) The mismatch crosses the level at which the IcePop paper saw GRPO fail: mean relative probability
difference |k − 1| above 5% (`logger.mismatch_alert`). It fires when the level is crossed upwards and
again only after it has fallen back below.
(b) The failure signature the KPop follow-up reports for fixed bounds: over the last `logger.alert_window`
steps, the mask fraction falls while the mismatch KL rises — the second half of the window's mean
mask fraction at least 10% below the first half's, and its mean KL (k3) at least 10% above it and
above a noise floor, both changes also beyond step-to-step noise (Welch's t ≥ 3 between the halves:
under a steady mismatch, e.g. injected noise redrawn every step, the halves differ by chance). It
fires once per episode and re-arms when the pattern stops.
(c) With stale rollouts (rollout.max_staleness), staleness rather than engine mismatch drives the
masking: the correction masks more than twice — and 1 point more than — what it would mask for the
engine mismatch alone (`staleness/mismatch_only_mask_frac`). Then lowering max_staleness is the fix, not
the band. It fires when the condition starts.
(d) Nothing trains: for `logger.alert_window` steps in a row every group got one reward for all its
samples (`reward/zero_variance_group_frac` = 1) or the gradient norm was 0. It says what to change, fires
once, and re-arms after a step with a learning signal.

Pure Python and torch: the alerts are tested on synthetic metric streams.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from icepop.algo import abs_log_ratio_by_position, log_ratio_histogram

HISTOGRAM_EDGES = torch.linspace(-3.0, 3.0, 61)
"""Bins of log k = ℓ_old − ℓ_inf, 0.1 wide; values beyond ±3 land in the end bins."""
TREND_CHANGE = 0.10
"""Relative change between the halves of the window that counts as falling / rising."""
KL_FLOOR = 1e-4
"""Mismatch KL below which a rise is noise, not a signature (fp32 engines sit near 1e-9)."""
MIN_T = 3.0
"""Welch's t between the window's halves that a fall or rise must reach to count as a trend."""
STALENESS_MARGIN = 0.01
"""Masked fraction that staleness must add beyond the mismatch's own before alert (c) fires."""
NO_SIGNAL_HINT = (
    "every group's samples got the same reward (or the gradient was 0), so the updates change nothing: "
    "check the reward on a few replies (reward/mean near 0 or 1: the task is too hard or too easy for the "
    "model), raise algo.samples_per_prompt, or turn on algo.dynamic_sampling"
)
"""What alert (d) tells the user."""


class MismatchAlerts:
    """Feed it each step's metrics; it returns the alert events that step raised."""

    def __init__(self, threshold: float = 0.05, window: int = 20) -> None:
        if threshold <= 0 or window < 4:
            raise ValueError(f"threshold={threshold} must be > 0 and window={window} at least 4 steps")
        self.threshold, self.window = threshold, window
        self._above = False
        self._trending = False
        self._stale = False
        self._dead_steps = 0
        self._history: list[tuple[float, float]] = []

    def update(self, step: int, metrics: dict[str, float]) -> list[dict[str, Any]]:
        events = []
        level = metrics["mismatch/rel_prob_diff_mean"]
        if level > self.threshold and not self._above:
            events.append({"step": step, "alert": "mismatch_above_threshold", "value": level,
                           "threshold": self.threshold})  # fmt: skip
        self._above = level > self.threshold
        self._history = [*self._history, (metrics["icepop/mask_frac"], metrics["mismatch/kl_k3"])]
        self._history = self._history[-self.window :]
        trending = len(self._history) == self.window and self._mask_falls_while_kl_rises()
        if trending and not self._trending:
            mask, kl = zip(*self._history, strict=True)
            events.append({"step": step, "alert": "mask_falls_while_kl_rises", "window": self.window,
                           "mask_frac": [mask[0], mask[-1]], "kl_k3": [kl[0], kl[-1]]})  # fmt: skip
        self._trending = trending
        masked, alone = metrics["icepop/mask_frac"], metrics.get("staleness/mismatch_only_mask_frac")
        stale = alone is not None and masked - alone > max(STALENESS_MARGIN, alone)
        if stale and not self._stale:
            events.append({"step": step, "alert": "masking_driven_by_staleness", "mask_frac": masked,
                           "mismatch_only_mask_frac": alone,
                           "versions_behind": metrics.get("staleness/versions_behind_max"),
                           "hint": "lower rollout.max_staleness; a wider band would hide it"})  # fmt: skip
        self._stale = stale
        same = metrics.get("reward/zero_variance_group_frac", 0.0) >= 1.0
        dead = same or metrics.get("actor/grad_norm") == 0
        self._dead_steps = self._dead_steps + 1 if dead else 0
        if self._dead_steps == self.window:
            events.append({"step": step, "alert": "no_learning_signal", "steps": self.window,
                           "reward_mean": metrics.get("reward/mean"), "hint": NO_SIGNAL_HINT})  # fmt: skip
        return events

    def _mask_falls_while_kl_rises(self) -> bool:
        half = self.window // 2
        first, second = self._history[:half], self._history[-half:]
        mask = [m for m, _ in first], [m for m, _ in second]
        kl = [k for _, k in first], [k for _, k in second]
        mask_before, mask_after = (sum(part) / half for part in mask)
        kl_before, kl_after = (sum(part) / half for part in kl)
        return (
            mask_after < (1 - TREND_CHANGE) * mask_before
            and kl_after > (1 + TREND_CHANGE) * kl_before
            and kl_after > KL_FLOOR
            and _welch_t(*mask) <= -MIN_T
            and _welch_t(*kl) >= MIN_T
        )


def _welch_t(before: list[float], after: list[float]) -> float:
    """Welch's t of mean(after) − mean(before); ±inf when both halves are constant and differ."""
    n = len(before)
    means = [sum(part) / n for part in (before, after)]
    variances = [
        sum((x - mean) ** 2 for x in part) / max(n - 1, 1)
        for part, mean in zip((before, after), means, strict=True)
    ]
    error = math.sqrt(sum(variances) / n)
    difference = means[1] - means[0]
    return difference / error if error > 0 else math.copysign(math.inf, difference) if difference else 0.0


class Telemetry:
    """Writes histograms.jsonl (edges in its first line) and events.jsonl in the run directory."""

    def __init__(self, run_dir: Path, threshold: float, window: int) -> None:
        self.histograms, self.events = run_dir / "histograms.jsonl", run_dir / "events.jsonl"
        self.alerts = MismatchAlerts(threshold, window)
        if not self.histograms.exists():
            self.histograms.write_text(json.dumps({"edges": HISTOGRAM_EDGES.tolist()}) + "\n")

    def record(self, step: int, delta: Tensor, response_mask: Tensor, metrics: dict[str, float]) -> list[str]:
        """Append the step's log k histogram and mean |log k| by response position; returns the step's
        alerts as printable lines (also appended to events.jsonl)."""
        counts = log_ratio_histogram(delta, response_mask, HISTOGRAM_EDGES).tolist()
        by_position, tokens = abs_log_ratio_by_position(delta, response_mask)
        record = {
            "step": step,
            "counts": counts,
            "abs_by_position": [round(v, 7) for v in by_position.tolist()],
            "tokens_by_position": tokens.tolist(),
        }
        with self.histograms.open("a") as f:
            f.write(json.dumps(record) + "\n")
        events = self.alerts.update(step, metrics)
        with self.events.open("a") as f:
            f.writelines(json.dumps(event) + "\n" for event in events)
        return [f"ALERT step {e['step']}: {e['alert']} {json.dumps(e)}" for e in events]

    def event(self, step: int, name: str, **fields: Any) -> None:
        """Append an operational event (an engine restart, a skipped update) to events.jsonl."""
        with self.events.open("a") as f:
            f.write(json.dumps({"step": step, "event": name, **fields}) + "\n")

    def replay(self, rows: list[dict[str, Any]]) -> None:
        """Bring the alerts' history up to the end of these logged metric rows (a resumed run), without
        raising their alerts again (events.jsonl already holds them)."""
        for row in rows:
            self.alerts.update(row["step"], {k: v if v is not None else float("nan") for k, v in row.items()})


def read_histograms(run_dir: str | Path) -> tuple[list[float], list[dict[str, Any]]]:
    """(edges, [{"step", "counts"}, ...]) of a run's histograms.jsonl."""
    lines = (Path(run_dir) / "histograms.jsonl").read_text().splitlines()
    return json.loads(lines[0])["edges"], [json.loads(line) for line in lines[1:] if line.strip()]
