"""DAPO's dynamic sampling (algo.dynamic_sampling, docs/algorithm.md §11): a group whose samples all got
the same rule reward has advantage 0 everywhere and trains nothing, so such groups are dropped and more
prompts generated, at the engines' current weights, until the step's batch holds prompts_per_step
informative groups or algo.max_sampling_rounds rounds have run.

The extra prompts come from a stream of their own (the training prompts in another seeded order), whose
position the checkpoint keeps: the main stream's batches, issued ahead with stale rollouts, are never
shifted by how many extras a step needed, so a resumed run draws exactly what the uninterrupted one did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from icepop.algo import informative_groups
from icepop.rewards.pool import Scores
from icepop.types import Completion, Prompt

EXTRA_SEED_OFFSET = 7_919
"""The extra prompts' order is seeded run.seed + this (the main stream's is run.seed)."""


@dataclass
class Filled:
    """A step's batch after dynamic sampling: its groups, their rewards, and what it took."""

    prompts: list[Prompt]
    groups: list[list[Completion]]
    rewards: torch.Tensor
    stats: dict[str, float]
    changed: bool
    """Whether any group was dropped or added (the batch differs from the one issued)."""


def fill(run: Any, step: int, prompts: list[Prompt], groups: list[list[Completion]], scored: Scores,
         sampling: Any) -> Filled:  # fmt: skip
    """Keep the informative groups of the step's batch and generate extra rounds until prompts_per_step of
    them are in hand (or the rounds run out: then the largest number of them the ranks can split evenly,
    or, with none at all, the batch as it was). `run` is the RLRun: its engines, rewards, config and the
    extra prompt stream `run.extras`."""
    algo = run.config.algo
    size, wanted = algo.samples_per_prompt, algo.prompts_per_step
    rewards = torch.tensor(scored.rewards, dtype=torch.float32)
    kept = _keep(prompts, groups, rewards, size)
    generated, rounds = len(prompts), 1
    while len(kept) < wanted and rounds < algo.max_sampling_rounds:
        # As many prompts as the yield so far says the shortfall needs (a whole batch when none was kept).
        count = min(wanted, math.ceil((wanted - len(kept)) * generated / len(kept)) if kept else wanted)
        extra = run.extras.next_batch(count)
        seeded = replace(sampling, seed=(sampling.seed or 0) + 1_000 * rounds)
        more = run.engines.generate(extra, size, seeded)
        flat = [p for p, group in zip(extra, more, strict=True) for _ in group]
        extra_scored = run.rewards.score_rollouts(flat, [c for group in more for c in group])
        kept += _keep(extra, more, torch.tensor(extra_scored.rewards, dtype=torch.float32), size)
        generated, rounds = generated + len(extra), rounds + 1
    split = algo.updates_per_step * run.config.trainer.ranks
    usable = max((n for n in range(min(wanted, len(kept)), 0, -1) if n * size % split == 0), default=0)
    stats = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/groups_generated": float(generated),
             "dynamic_sampling/groups_informative": float(len(kept)),
             "dynamic_sampling/groups_trained": float(usable or len(prompts))}  # fmt: skip
    if usable < wanted:
        run.tracker.print(
            f"icepop: step {step}: dynamic sampling found {len(kept)} informative group(s) of {generated} in "
            f"{rounds} round(s) (algo.max_sampling_rounds); training on "
            + (f"{usable} of algo.prompts_per_step={wanted}" if usable else "the batch as it was")
        )
    if not usable:
        return Filled(prompts, groups, rewards, stats, changed=False)
    chosen = kept[:usable]
    changed = generated > len(prompts) or usable < len(prompts)
    return Filled([p for p, _, _ in chosen], [g for _, g, _ in chosen], torch.cat([r for _, _, r in chosen]),
                  stats, changed)  # fmt: skip


def _keep(
    prompts: list[Prompt], groups: list[list[Completion]], rewards: torch.Tensor, size: int
) -> list[tuple[Prompt, list[Completion], torch.Tensor]]:
    """(prompt, group, its rewards) of the informative groups, in order."""
    mask = informative_groups(rewards, size).tolist()
    return [
        (p, g, r) for p, g, r, keep in zip(prompts, groups, rewards.view(-1, size), mask, strict=True) if keep
    ]
