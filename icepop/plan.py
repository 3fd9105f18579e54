"""What a run will do, said before it does it: the settings that matter most for its stage, each with
where its value comes from (the command line, the recipe, a group option such as model=tiny-dense, or
icepop's default), and for `run.dry_run=true` also the derived batch sizes, the placement and the data.

Key design choice: a value's source is read from the same files Hydra composed (conf/config.yaml's
defaults list, the chosen group options, the recipe) in Hydra's order of precedence, so the line says
exactly which file to edit; nothing here changes a value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from icepop.config import Config
from icepop.config.checks import cpu_flags, engine_dtype
from icepop.errors import input_errors
from icepop.rollout.precision import precision_label

KEY_SETTINGS = {
    "rl": ("model.path", "model.dtype", "rollout.dtype", "trainer.lr", "trainer.lr_schedule",
           "trainer.zero_stage", "data.source", "data.max_prompt_tokens", "rollout.max_new_tokens",
           "rollout.max_model_len", "rollout.temperature", "algo.correction", "algo.kl_coef"),
    "sft": ("model.path", "model.dtype", "sft.lr", "sft.steps", "sft.batch_size", "trainer.zero_stage",
            "data.source", "data.max_prompt_tokens", "rollout.max_new_tokens"),
    "rm": ("model.path", "model.dtype", "rm.lr", "rm.steps", "rm.batch_size", "rm.source",
           "trainer.zero_stage"),
    "eval": ("model.path", "rollout.dtype", "data.source", "eval.samples_per_prompt", "eval.temperature",
             "data.max_prompt_tokens", "rollout.max_new_tokens", "rollout.max_model_len"),
    "pipeline": ("model.path", "pipeline.stages"),
    "compare": ("model.path", "compare.recipe", "compare.overrides", "compare.arms"),
}  # fmt: skip
"""Per kind of stage, the settings the start-up summary shows with their sources (and, beside them,
every other setting the command line changed)."""
OWN_KEYS = ("hydra.", "run.dir", "run.dry_run")
"""Command-line keys the summary leaves out: Hydra's and where the run writes (printed on their own)."""


def override_key(override: str) -> str:
    """ "+trainer.lr=1e-5" → "trainer.lr"; "model=tiny-moe" → "model"."""
    return override.split("=", 1)[0].lstrip("+~")


def defaults_list(conf_dir: Path) -> dict[str, str]:
    """The groups of conf/config.yaml's defaults list, in order, with their default option."""
    entries = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"))["defaults"]
    chosen = {}
    for entry in entries:
        if isinstance(entry, dict):
            ((group, option),) = entry.items()
            if not group.startswith(("override ", "hydra")):
                chosen[group] = str(option)
    return chosen


def _sets(path: Path, key: str, package: str | None) -> bool:
    """Does this YAML file set `key`? package: the group the file's keys sit under (None: _global_)."""
    if not path.is_file():
        return False
    if package is None or path.read_text().startswith("# @package _global_"):
        return OmegaConf.select(OmegaConf.load(path), key, default=None) is not None
    if not key.startswith(package + "."):
        return False
    return OmegaConf.select(OmegaConf.load(path), key.removeprefix(package + "."), default=None) is not None


def setting_sources(
    overrides: list[str], keys: tuple[str, ...], conf_dir: Path, recipes_dir: Path
) -> dict[str, str]:
    """Where each key's value comes from, in Hydra's precedence: "command line", "recipe rlvr", a group
    option ("model=tiny-dense", the later groups of the defaults list winning), else "default"."""
    groups = defaults_list(conf_dir)
    given = {override_key(o): o.split("=", 1)[1] for o in overrides if "=" in o}
    choices = {group: given.get(group, option) for group, option in groups.items()}
    recipe = given.get("recipe")
    sources = {}
    for key in keys:
        if key in given:
            sources[key] = "command line"
        elif recipe is not None and _sets(recipes_dir / f"{recipe}.yaml", key, None):
            sources[key] = f"recipe {recipe}"
        else:
            found = [f"{group}={option}" for group, option in reversed(choices.items())
                     if _sets(conf_dir / group / f"{option}.yaml", key, group)]  # fmt: skip
            sources[key] = found[0] if found else "default"
    return sources


def stage_kind(stage: str) -> str:
    return "rl" if stage in ("rlvr", "rlhf") else stage


def settings_summary(config: Config, overrides: list[str], conf_dir: Path, recipes_dir: Path) -> str:
    """The start-up lines: each key setting of the stage, its value and its source."""
    keys = KEY_SETTINGS[stage_kind(config.stage)]
    sources = setting_sources(overrides, keys, conf_dir, recipes_dir)
    values = {key: OmegaConf.select(OmegaConf.structured(config), key) for key in keys}
    if "rollout.max_model_len" in values and values["rollout.max_model_len"] is None:
        values["rollout.max_model_len"] = config.rollout.context_length(config.data.max_prompt_tokens)
        budget = "the episode's tokens" if config.rollout.episodic else "rollout.max_new_tokens"
        sources["rollout.max_model_len"] = f"data.max_prompt_tokens + {budget}"
    if config.rollout.episodic and stage_kind(config.stage) in ("rl", "eval"):
        maker = "rollout.environment" if config.rollout.agent is None else "rollout.agent"
        extra = (maker, "rollout.max_turns", "rollout.max_episode_tokens")
        keys = (*keys, *extra)
        sources |= setting_sources(overrides, extra, conf_dir, recipes_dir)
        values |= {key: OmegaConf.select(OmegaConf.structured(config), key) for key in extra}
        values["rollout.max_episode_tokens"] = config.rollout.response_tokens()
    # Every setting the command line changed, whatever the stage shows by default.
    structured = OmegaConf.structured(config)
    given = [override_key(o) for o in overrides if "=" in o]
    extra = tuple(
        k for k in dict.fromkeys(given) if k not in keys and "." in k and not k.startswith(OWN_KEYS)
    )
    keys = (*keys, *extra)
    sources |= {key: "command line" for key in extra}
    values |= {key: OmegaConf.select(structured, key, default=None) for key in extra}
    if sources.get("rollout.dtype") == "default":  # rollout.dtype=auto: what this machine decided
        _, why = engine_dtype(config.rollout.gpus_per_engine, cpu_flags())
        sources["rollout.dtype"] = f"auto: {why}"
    if config.rollout.quantization is not None and "rollout.quantization" in values:
        rollout = config.rollout  # on CPU: "fp8 (FP8 weight rounding, simulated: …)"
        label = precision_label(rollout.dtype, rollout.quantization, rollout.gpus_per_engine == 0)
        values["rollout.quantization"] = label
    width = max(map(len, keys))
    lines = [f"icepop {config.stage} settings (value, and where it comes from):"]
    lines += [f"  {key:<{width}}  {_shown(values[key])}  ({sources[key]})" for key in keys]
    return "\n".join(lines)


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def dry_run(config: Config) -> None:
    """`run.dry_run=true`: after the settings (printed by icepop.train) and the input checks, load the
    stage's data exactly as the run would and print the batch sizes and the placement; start nothing."""
    from icepop.ray.bundles import roles
    from icepop.stages import setup

    if config.stage == "pipeline":
        print(
            f"icepop dry run: the pipeline's stages {config.pipeline.stages} are each checked when they start"
        )
        return
    if config.stage == "compare":
        print(f"icepop dry run: arms {', '.join(config.compare.arms)}, each checked as it would be run alone")
        return
    tokenizer = setup.load_tokenizer(setup.resolve_model(config), config.data)
    with input_errors(
        f"data.source={config.data.source!r}" if config.stage != "rm" else f"rm.source={config.rm.source!r}"
    ):
        if config.stage in ("rlvr", "rlhf", "eval"):
            _, held_out = setup.prompt_streams(config, tokenizer)  # prints what it loaded
            print(_first_prompt(config, tokenizer, held_out[0]))
        elif config.stage == "sft":
            from icepop.stages.sft import sft_examples

            sft_examples(config, tokenizer)
        else:
            from icepop.stages.rm import preference_pairs

            preference_pairs(config, tokenizer)
    if config.stage in ("rlvr", "rlhf", "eval"):
        setup.check_held_out_row(config, tokenizer, held_out[0])  # the environment's or the reward's
    with_engines = config.stage != "sft" and config.stage != "rm"
    wanted = roles(config, rollout=with_engines, trainer=config.stage != "eval")
    placement = "; ".join(f"{r.count} {r.name} {r.unit}(s) × {r.cpus} CPU/{r.gpus} GPU" for r in wanted)
    cpus, gpus = sum(r.count * r.cpus for r in wanted), sum(r.count * r.gpus for r in wanted)
    print(f"icepop dry run: {config.derived().describe_batches(config.algo, config.trainer)}")
    print(f"icepop dry run: bundles {placement} ({cpus} CPUs, {gpus} GPUs in all)")
    print("icepop dry run: every check passed; nothing was started")


def _first_prompt(config: Config, tokenizer: Any, prompt: Any) -> str:
    """A held-out prompt as the engine will see it, its answer, and what will score the replies."""
    if config.rollout.environment is not None:
        scorer = f"the episodes of rollout.environment={config.rollout.environment!r}"
    elif config.rollout.agent is not None:
        scorer = f"rollout.agent={config.rollout.agent!r} (or, where it returns None, the task's verifier)"
    elif config.reward.function is not None and config.reward.rule_weight:
        scorer = f"reward.function={config.reward.function!r}"
    elif config.reward.rule_weight:
        scorer = f"the built-in verifier for task {prompt.task!r} (icepop.rewards.verifiers.verify)"
    else:
        scorer = "the reward model alone"
    if config.reward.model_path is not None:
        scorer += f" and the reward model {config.reward.model_path} (weight {config.reward.model_weight:g})"
    text = tokenizer.decode(prompt.prompt_ids)
    answer = f"  answer: {prompt.answer!r}; scored by {scorer}"
    return f"icepop dry run: a held-out prompt as the engine sees it:\n{text}\n{answer}"
