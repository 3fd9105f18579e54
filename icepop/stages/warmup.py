"""The policy an RL, reward-model or evaluation stage starts from: `model.path`, or — for the built-in
tiny models with `model.sft_warmup` — their SFT warm-up, run once (`+recipe=sft`) and cached.

A model this small starts RL with no reward signal at all; its cached warm-up gives it some. The
cache key holds everything that determines the checkpoint (icepop.stages.setup.cached), so a second
run starts RL at once.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from icepop.config import Config
from icepop.config.trainer import LoraConfig
from icepop.envs import episode_demonstration
from icepop.stages.setup import cache_dir, cached, resolve_model
from icepop.stages.sft import run_sft


def sft_warmup_key(config: Config) -> dict[str, Any]:
    """What determines a tiny model's SFT warm-up checkpoint."""
    key = {
        "model": config.model.path,
        "seed": config.run.seed,
        "data": config.data.source,
        "sft": asdict(config.sft),
        "ranks": config.trainer.ranks,
        "version": 1,
    }
    demonstrated = episode_demonstration(config.rollout.environment, config.rollout.agent)
    if demonstrated is not None:  # learns its exchange
        key |= {"environment": demonstrated[0], "task_options": config.data.task_options}
    return key


def policy_path(config: Config, run_dir: Path) -> str:
    """The folder (or hub id) the stage starts from: `resolve_model`'s, or for a built-in tiny model in
    RLVR, RLHF, reward-model training or evaluation with `model.sft_warmup`, its cached SFT warm-up
    (run now when missing)."""
    base = resolve_model(config)
    path = config.model.path
    if not config.warms_up:
        return base
    print(f"icepop: looking for the SFT warm-up of {path} on {config.data.source} in {cache_dir() / 'sft'}")

    def build(tmp: Path) -> None:
        print(
            f"icepop: {path} has no SFT checkpoint for {config.data.source} yet; running +recipe=sft first "
            f"({config.sft.steps} steps), cached for later runs"
        )
        sft_config = replace(
            config,
            stage="sft",
            run=replace(config.run, dir=str(run_dir / "sft-warmup")),
            trainer=replace(config.trainer, lora=LoraConfig()),  # it stands in for pretraining: every weight
        )
        sft_dir = Path(sft_config.run.dir)
        sft_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(sft_config), sft_dir / "config.yaml")
        summary = run_sft(sft_config, sft_dir, model_path=base)
        shutil.copytree(str(summary.checkpoint), tmp, dirs_exist_ok=True)

    return str(cached(sft_warmup_key(config), "sft", build))
