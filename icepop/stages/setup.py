"""What the stages build before their loops: the model folder, tokenizer, data streams, rewards.

Key design choice: the built-in tiny models (and their SFT warm-up, icepop.stages.warmup) are cached under
$ICEPOP_CACHE (default ~/.cache/icepop), keyed by everything that determines them, and written
atomically (built in a temporary folder, then renamed), so a crash never leaves a cache entry that
looks complete and a second run starts RL at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from icepop.config import Config
from icepop.types import SamplingSettings

TINY_PREFIX = "tiny:"


def cache_dir() -> Path:
    """Root of icepop's cache: $ICEPOP_CACHE, else ~/.cache/icepop."""
    return Path(os.environ.get("ICEPOP_CACHE", Path.home() / ".cache" / "icepop"))


def cached(key: dict[str, Any], kind: str, build: Any) -> Path:
    """The cache entry for `key`, calling build(tmp_dir) to create it when missing."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_dir() / kind / digest
    if (final / "icepop-cache.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=final.parent))
    try:
        build(tmp)
        (tmp / "icepop-cache.json").write_text(json.dumps(key, indent=2, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_base_model(architecture: str, seed: int) -> Path:
    """The randomly initialised built-in model (built on first use)."""
    from icepop.models.tiny import build_tiny_model

    key = {"architecture": architecture, "seed": seed, "version": 1}
    return cached(key, "models", lambda tmp: build_tiny_model(tmp, architecture, seed=seed))


def resolve_model(config: Config) -> str:
    """The folder (or hub id) of `model.path`; the built-in tiny models are built on first use."""
    path = config.model.path
    if not path.startswith(TINY_PREFIX):
        return path
    return str(tiny_base_model(path.removeprefix(TINY_PREFIX), config.run.seed))


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def sampling_settings(config: Config, seed: int) -> SamplingSettings:
    rollout = config.rollout
    return SamplingSettings(
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k,
        max_new_tokens=rollout.max_new_tokens,
        seed=seed,
    )


def reward_pool(config: Config) -> Any:
    """The reward worker pool (a context manager) for the configured reward function."""
    from icepop.rewards.pool import RewardPool

    reward = config.reward
    return RewardPool(reward.function, num_workers=reward.workers, timeout_s=reward.timeout_seconds)


EVAL_SEED_OFFSET = 1_000_003
"""Held-out built-in problems come from another seed's stream than the training problems."""


def prompt_streams(config: Config, tokenizer: Any) -> tuple[Any, list[Any]]:
    """Training prompts as endless shuffled batches of `prompts_per_step`, and the held-out prompts."""
    from icepop.data.prompts import ShuffledBatches, load_prompts
    from icepop.data.tasks import TASKS

    data, seed = config.data, config.run.seed
    if data.source in TASKS:
        train = load_prompts(data.source, tokenizer, data.max_prompt_tokens, count=data.size, seed=seed)
        held_out = load_prompts(
            data.source, tokenizer, data.max_prompt_tokens, count=data.eval_size, seed=seed + EVAL_SEED_OFFSET
        ).prompts
    else:
        train = load_prompts(
            data.source,
            tokenizer,
            data.max_prompt_tokens,
            prompt_field=data.prompt_field,
            answer_field=data.answer_field,
            task_field=data.task_field,
            task=config.reward.task or "math",
            split=data.split,
        )
        held_out, train.prompts = train.prompts[-data.eval_size :], train.prompts[: -data.eval_size]
    print(
        f"icepop data: {len(train.prompts)} training prompts from {data.source} "
        f"({train.num_overlong} longer than data.max_prompt_tokens={data.max_prompt_tokens} dropped), "
        f"{len(held_out)} held out"
    )
    return ShuffledBatches(train.prompts, config.algo.prompts_per_step, seed), held_out
