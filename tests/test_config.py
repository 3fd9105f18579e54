"""Configuration: every recipe and every group option composes into checked dataclasses; bad values
and inconsistent batch sizes are refused with a message naming the field."""

from __future__ import annotations

import inspect
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from icepop.config import Config
from icepop.config.trainer import LoraConfig
from icepop.train import CONF_DIR, RECIPES, RECIPES_DIR

ROOT = Path(__file__).resolve().parents[1]


def compose_config(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, Config)
    return config


def test_recipes_are_found_where_the_repository_keeps_them() -> None:
    assert RECIPES_DIR == ROOT / "recipes" and CONF_DIR == ROOT / "conf"
    assert {"sft", "rlvr"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe: str) -> None:
    config = compose_config(f"+recipe={recipe}")
    variants = {"dapo": "rlvr", "agent": "rlvr", "mismatch": "compare"}  # variants of the rlvr stage
    assert config.stage == variants.get(recipe, recipe.split("-")[0])
    # Each recipe starts with a comment giving its purpose and its run command.
    text = (RECIPES_DIR / f"{recipe}.yaml").read_text()
    assert text.startswith("#") and f"python -m icepop.train +recipe={recipe}" in text


@pytest.mark.parametrize("group", sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()))
def test_every_group_option_composes(group: str) -> None:
    for option in sorted((CONF_DIR / group).glob("*.yaml")):
        compose_config("+recipe=rlvr", f"{group}={option.stem}")


def test_defaults_of_the_embedded_rlvr_run() -> None:
    config = compose_config("+recipe=rlvr")
    assert config.model.path == "tiny:dense" and config.data.source == "countdown"
    assert config.trainer.lr == 1e-4 and config.data.size == 256  # tiny-model choices of the group files
    assert (config.algo.correction, config.algo.ratio_low, config.algo.ratio_high) == ("icepop", 0.5, 5.0)
    assert config.algo.kl_coef == 0.0 and config.rollout.temperature == 1.0 and config.rollout.top_p == 1.0
    d = config.derived()
    assert d.samples_per_step == config.algo.prompts_per_step * config.algo.samples_per_prompt
    assert d.samples_per_rank * config.trainer.ranks == d.samples_per_step


def test_stage_recipes_hold_their_differences() -> None:
    rlhf, rlvr = compose_config("+recipe=rlhf"), compose_config("+recipe=rlvr")
    assert rlhf.rollout.max_new_tokens < rlvr.rollout.max_new_tokens  # RLHF rollouts are shorter
    assert rlhf.reward.rule_weight == 0.0 and rlvr.reward.rule_weight == 1.0
    pipeline = compose_config("+recipe=pipeline")
    assert pipeline.pipeline.stages == ["sft", "rm", "rlvr", "rlhf", "eval"]
    assert set(pipeline.pipeline.overrides) == set(pipeline.pipeline.stages)


def test_group_options_change_what_they_should() -> None:
    moe = compose_config("+recipe=rlvr", "model=tiny-moe", "algo=tis", "cluster=gpu")
    assert moe.model.path == "tiny:moe"
    assert (moe.algo.correction, moe.algo.ratio_high) == ("tis", 2.0)
    assert moe.rollout.gpus_per_engine == 1 and moe.trainer.gpus_per_rank == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.zero_stage=4", "trainer.zero_stage=4 is not one of 0, 1, 2, 3"),
        (["trainer.zero_stage=0", "trainer.offload=true"], "it needs trainer.zero_stage >= 1"),
        ("algo.correction=icepop2", "correction='icepop2' is not one of"),
        ("algo.ratio_low=6.0", "ratio_low must satisfy"),
        ("rollout.top_p=0", "rollout.top_p must be in"),
        ("rollout.dtype=fp8", "rollout.dtype='fp8' is not one of"),
        ("rollout.quantization=int8", "rollout.quantization='int8' is not one of None, fp8"),
        ("rollout.quantization=fp8", "rollout.quantization=fp8 needs a 16-bit engine"),  # the tiny's float32
        ("data.eval_size=0", "data.eval_size must be > 0"),
        ("trainer.ranks=3", "the nearest that do: algo.prompts_per_step=18, or algo.samples_per_prompt=9"),
        ("sft.batch_size=9", "sft.batch_size=9 conversations (the SFT stage or the tiny model's SFT"),
        ("rollout.weight_sync=nccl", "rollout.weight_sync='nccl' is not one of broadcast, file"),
        ("rm.batch_size=0", "rm.batch_size must be > 0"),
        ("eval.temperature=-1", "eval.temperature must be >= 0"),
        ("pipeline.stages=[sft,ppo]", "pipeline.stages[...]='ppo' is not one of"),
        ("pipeline.stages=[rlhf,rm]", "rm must come before rlhf"),
        ("pipeline.stages=[sft,sft]", "names a stage twice"),
        ("run.seed=-1", "run.seed must be in [0, 2**32)"),
        ("train.steps=0", "train.steps must be > 0"),
        ("sft.lr=0", "sft.lr must be > 0"),
        ("reward.workers=0", "reward.workers must be > 0"),
        ("cluster.num_cpus=0", "cluster.num_cpus"),
        ("model.dtype=half", "model.dtype='half' is not one of"),
    ],
)
def test_bad_values_are_refused_naming_the_field(override: str | list[str], message: str) -> None:
    with pytest.raises(Exception) as error:
        compose_config("+recipe=rlvr", *([override] if isinstance(override, str) else override))
    assert message in str(error.value) or message in str(error.value.__cause__)


def test_command_line_reports_errors_in_one_line(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "icepop.train", *args], capture_output=True, text=True, cwd=tmp_path
        )

    no_recipe = run()
    assert no_recipe.returncode != 0 and "+recipe=rlvr" in no_recipe.stderr
    inconsistent = run("+recipe=rlvr", "algo.prompts_per_step=3", "algo.samples_per_prompt=3")
    assert inconsistent.returncode != 0
    assert "icepop: invalid configuration: inconsistent batch sizes" in inconsistent.stderr
    assert "Traceback" not in inconsistent.stderr
    assert not list(tmp_path.iterdir())  # nothing written for a refused run


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "icepop").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


def test_the_loss_options_have_one_home_for_their_defaults() -> None:
    """algo.* declares every loss option the loss library has (but the reply length, which follows the
    rollout), with the library's type and default, and hands each one over."""
    from dataclasses import fields

    from icepop.algo import PolicyLossOptions
    from icepop.config.algo import LOSS_FIELDS, AlgoConfig

    library = {f.name: f for f in fields(PolicyLossOptions)}
    config = {f.name: f for f in fields(AlgoConfig)}
    assert set(LOSS_FIELDS) == set(library) - {"max_response_length"} and set(LOSS_FIELDS) <= set(config)
    for name in LOSS_FIELDS:
        assert (config[name].type, config[name].default) == (library[name].type, library[name].default), name
    changed = AlgoConfig(ratio_low=0.3, clip_high=0.3, kl_coef=0.1, kl_estimator="k2", dual_clip=3.0)
    options = changed.loss_options(max_response_length=7)
    assert all(getattr(options, name) == getattr(changed, name) for name in LOSS_FIELDS)
    assert options.max_response_length == 7


def changed_value(name: str, value: Any) -> Any:
    """Another valid value of a config field (the perturbation below)."""
    special = {"zero_stage": 3, "lr_schedule": "cosine", "lora": LoraConfig(rank=8)}
    if name in special or isinstance(value, bool):
        return special.get(name, not value)
    if isinstance(value, int | float):
        return value * 2 or 1
    if isinstance(value, tuple):
        return tuple(v / 2 for v in value)
    assert isinstance(value, dict), (name, value)
    return {**value, "steps_per_print": 1}


def test_the_backends_take_every_argument_from_the_config() -> None:
    """No default lives in a backend: the trainer rank and the rollout engine take keyword-only
    arguments without defaults, exactly those the config gives (plus where ranks meet), and every
    trainer.* field but the backend's name reaches the trainer rank's arguments (a changed value changes
    them)."""
    from dataclasses import fields, replace

    from icepop.ray.engine_placement import engine_settings
    from icepop.rollout.base import engine_class
    from icepop.trainer.base import backend_class
    from icepop.trainer.settings import RENDEZVOUS, trainer_settings

    base = Config(stage="rlvr")
    config = replace(base, rollout=replace(base.rollout, weight_sync="file"))  # any device for the ranks
    for backend, given in (
        (backend_class(config.trainer.backend), {*trainer_settings(config, "m", "rl"), *RENDEZVOUS}),
        (engine_class(config.rollout.backend), set(engine_settings(config, "m"))),
    ):
        parameters = inspect.signature(backend).parameters.values()
        assert all(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in parameters), backend
        assert {p.name for p in parameters} == given, backend
    assert all(trainer_settings(config, "m", s).keys() == trainer_settings(config, "m", "rl").keys()
               for s in ("sft", "rm"))  # fmt: skip
    with pytest.raises(ValueError, match="'rlhf' is not one of: rl, sft, rm"):
        trainer_settings(config, "m", "rlhf")
    ignored = []
    for field in [f for f in fields(config.trainer) if f.name != "backend"]:  # which class, not its arguments
        other = changed_value(field.name, getattr(config.trainer, field.name))
        changed = replace(config, trainer=replace(config.trainer, **{field.name: other}))
        if trainer_settings(changed, "m", "rl") == trainer_settings(config, "m", "rl"):
            ignored.append(field.name)
    assert not ignored, f"trainer.{ignored} never reach the trainer rank: pass them or drop them"


def test_every_setting_is_read_outside_the_config() -> None:
    """No setting is declared and then ignored: each field's name is read (as an attribute) by a module
    outside icepop/config (or through a property of the config that is). trainer.lora's options reach
    peft whole (LoraConfig.adapter_options)."""
    import ast
    from dataclasses import asdict, fields, is_dataclass

    read = {
        node.attr
        for path in (ROOT / "icepop").rglob("*.py")
        if "config" not in path.relative_to(ROOT / "icepop").parts[:1]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
    }
    whole = set(asdict(LoraConfig()))  # handed over by adapter_options
    read |= {"sft_warmup"} if "warms_up" in read else set()  # read through Config.warms_up
    unread = []
    todo: list[tuple[str, Any]] = [("", Config(stage="rlvr"))]
    while todo:
        prefix, settings = todo.pop()
        for field in fields(settings):
            value, name = getattr(settings, field.name), f"{prefix}{field.name}"
            if is_dataclass(value):
                todo.append((f"{name}.", value))
            elif field.name not in read and not (prefix == "trainer.lora." and field.name in whole):
                unread.append(name)
    assert "lr" in read and not unread, f"declared but never read: {unread}"


def test_every_unknown_key_on_the_command_line_gets_a_did_you_mean() -> None:
    """Hydra stops at the first unknown key and advises `+key`; icepop names them all, each with the
    closest setting, and lets through groups, settings, free-form dictionaries' keys and Hydra's own."""
    from icepop.train import unknown_override_keys

    given = ["+recipe=rlvr", "model=tiny-moe", "trainer.lrr=1e-5", "+algo.kl_coeff=0.1",
             "trainr.zero_stage=3", "data.task_options.digits=2", "hydra.run.dir=x",
             "trainer.ds_config_overrides.zero_optimization.stage=3", "~logger.project"]  # fmt: skip
    found = unknown_override_keys(given)
    assert found == [
        "trainer.lrr=1e-05 is not a setting icepop reads; did you mean trainer.lr?",
        "algo.kl_coeff=0.1 is not a setting icepop reads; did you mean algo.kl_coef?",
        "trainr.zero_stage=3 is not a setting icepop reads; did you mean trainer.zero_stage?",
    ]
    assert unknown_override_keys(["+recipe=rlvr", "zzz=1"]) == ["zzz=1 is not a setting icepop reads"]


def test_small_batches_derive_their_micro_batches_and_refuse_only_what_cannot_split() -> None:
    """trainer.micro_batch_size is the most rows of a forward (the last micro-batch may be shorter), so
    `algo.prompts_per_step=4 algo.samples_per_prompt=2` just works; what must split evenly over the ranks
    is checked only for the stages that run."""
    small = compose_config("+recipe=rlvr", "algo.prompts_per_step=4", "algo.samples_per_prompt=2")
    assert small.derived().micro_batches_per_update == 1 and small.derived().samples_per_rank == 4
    uneven = compose_config("+recipe=rlvr", "trainer.micro_batch_size=3")  # 64 rows a rank: 21 × 3 + 1
    assert uneven.derived().micro_batches_per_update == 22
    without_warm_up = compose_config("+recipe=rlvr", "sft.batch_size=9", "model.sft_warmup=false")
    assert without_warm_up.sft.batch_size == 9  # no SFT will run: its batch is not checked
    sft_only = compose_config("+recipe=sft", "algo.prompts_per_step=3", "algo.samples_per_prompt=3")
    assert sft_only.derived().samples_per_step == 9  # no RL will run: its batch is not checked


def test_the_engine_dtype_follows_the_hardware_unless_set() -> None:
    """rollout.dtype=auto (the default of a model of your own): bfloat16 only where the engine has
    bfloat16 arithmetic; a preset's or the user's value stands."""
    from icepop.config.checks import cpu_flags, engine_dtype

    assert engine_dtype(0, {"avx2", "fma"}) == (
        "float32", "this CPU has no bfloat16 instructions (AVX512-BF16/AMX): bfloat16 would be emulated"
    )  # fmt: skip
    assert engine_dtype(0, {"avx512f", "avx512_bf16"}) == ("bfloat16", "this CPU has avx512_bf16")
    assert engine_dtype(0, {"amx_bf16", "avx512_bf16"})[0] == "bfloat16"
    assert engine_dtype(1, set()) == ("bfloat16", "a GPU engine")
    here, _ = engine_dtype(0, cpu_flags())
    assert compose_config("+recipe=rlvr", "model=custom").rollout.dtype == here
    assert compose_config("+recipe=rlvr", "model=custom", "cluster=gpu").rollout.dtype == "bfloat16"
    assert compose_config("+recipe=rlvr", "model=custom", "rollout.dtype=float16").rollout.dtype == "float16"
    assert compose_config("+recipe=rlvr").rollout.dtype == "float32"  # the tiny model's preset
