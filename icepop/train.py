"""Entry point: `python -m icepop.train +recipe=rlvr [group=option ...] [key=value ...]`.

Hydra composes conf/config.yaml (the schema and defaults live in icepop/config/) with the chosen
recipe from recipes/ and the command-line overrides; the result is checked, printed with its
derived quantities, saved as run.dir/config.yaml, and handed to the stage the recipe names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from icepop.config import Config, register
from icepop.errors import InputError
from icepop.plan import override_key, settings_summary


def config_dirs() -> tuple[Path, Path]:
    """conf/ and recipes/: inside the installed package (wheel), else at the repository's top level."""
    package = Path(__file__).resolve().parent
    if (package / "_conf" / "config.yaml").is_file():
        return package / "_conf", package / "_recipes"
    return package.parent / "conf", package.parent / "recipes"


def register_recipes(directory: Path) -> list[str]:
    """Make each recipes/*.yaml an option of the `recipe` group, applied at the global package."""
    names = []
    for path in sorted(directory.glob("*.yaml")):
        ConfigStore.instance().store(
            group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_"
        )
        names.append(path.stem)
    return names


CONF_DIR, RECIPES_DIR = config_dirs()
register()
RECIPES = register_recipes(RECIPES_DIR)


def to_config(cfg: DictConfig) -> Config:
    """The composed config as checked dataclasses; exits with one clear message when it is wrong."""
    if OmegaConf.is_missing(cfg, "stage"):
        sys.exit(
            f"icepop: choose what to run with a recipe, e.g. `python -m icepop.train +recipe=rlvr` "
            f"(recipes: {', '.join(RECIPES)})"
        )
    try:
        config = OmegaConf.to_object(cfg)
    except Exception as error:  # value checks raise ValueError; OmegaConf wraps some of them
        cause = error.__cause__ or error
        sys.exit(f"icepop: invalid configuration: {cause}")
    assert isinstance(config, Config)
    unknown = unknown_settings(config)
    if unknown:
        sys.exit(invalid(unknown))
    return config


def invalid(problems: list[str]) -> str:
    """One message for every problem found: on one line if there is one."""
    if len(problems) == 1:
        return f"icepop: invalid configuration: {problems[0]}"
    return "icepop: invalid configuration:\n" + "\n".join(f"  {problem}" for problem in problems)


def schema_paths(settings: Any, prefix: str = "") -> tuple[set[str], set[str]]:
    """The dotted path of every setting, and those of the settings that are free-form dictionaries (any
    key below them is the user's, e.g. trainer.ds_config_overrides.zero_optimization)."""
    paths, free = set(), set()
    for field in dataclasses.fields(settings):
        value, path = getattr(settings, field.name), f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            below, below_free = schema_paths(value, f"{path}.")
            paths |= below
            free |= below_free
        else:
            paths.add(path)
            if isinstance(value, dict):
                free.add(path)
    return paths, free


def unknown_override_keys(arguments: list[str]) -> list[str]:
    """Every override on the command line that names neither a setting nor a config group, each with the
    closest setting. Hydra would stop at the first one, advising `+key=...`, which only adds the typo."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides(arguments)
    except Exception:  # a syntax error: Hydra's own message says where
        return []
    paths, free = schema_paths(Config(stage="rlvr"))
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} | {"recipe"}
    found = []
    for override in overrides:
        key = override.key_or_group
        known = key in paths or key in groups or key.startswith("hydra.") or override.is_delete()
        if known or any(key.startswith(f"{path}.") for path in free):
            continue
        guess = difflib.get_close_matches(key, sorted(paths), n=1)
        hint = f"; did you mean {guess[0]}?" if guess else ""
        found.append(f"{key}={override.get_value_element_as_str()} is not a setting icepop reads{hint}")
    return found


def unknown_settings(config: Any, prefix: str = "") -> list[str]:
    """Keys added (`+trainer.lrr=...`, or a typo in a YAML file) that no field of the schema reads, each
    with the closest field; OmegaConf keeps them as stray attributes of the dataclasses."""
    found = []
    names = {f.name for f in dataclasses.fields(config)}
    for key, value in vars(config).items():
        if key not in names:
            guess = difflib.get_close_matches(key, sorted(names), n=1)
            hint = (
                f"; did you mean {prefix}{guess[0]}?"
                if guess
                else f"; {prefix.rstrip('.')} has {sorted(names)}"
            )
            found.append(f"{prefix}{key}={value!r} is not a setting icepop reads{hint}")
        elif dataclasses.is_dataclass(value):
            found += unknown_settings(value, f"{prefix}{key}.")
    return found


def with_model_preset(overrides: list[str]) -> list[str]:
    """`model.path=...` without a `model=...` preset selects model=custom, so a user's own model never
    inherits the tiny default preset's learning rate, dtypes and lengths (conf/model/custom.yaml)."""
    keys = {override_key(o) for o in overrides}
    return [*overrides, "model=custom"] if "model.path" in keys and "model" not in keys else overrides


def prepare(cfg: DictConfig, overrides: list[str]) -> tuple[Config, DictConfig]:
    """The checked config of a command line (composed again with model=custom when `with_model_preset`
    asks for it), its settings and their sources printed, and its inputs checked before anything
    starts; one line and SystemExit for whatever is wrong."""
    from icepop.preflight import check_inputs, check_install

    problem = check_install()
    if problem is not None:
        sys.exit(problem)
    effective = with_model_preset(overrides)
    if effective != overrides:
        cfg = hydra.compose(config_name="config", overrides=effective)
    config = to_config(cfg)
    print(settings_summary(config, effective, CONF_DIR, RECIPES_DIR))
    try:
        check_inputs(config)
    except InputError as error:
        sys.exit(f"icepop: {error}")
    return config, cfg


def compose(overrides: list[str], check: bool = True) -> Config:
    """One stage's config, composed like a command line with these overrides (for the pipeline): the
    pipeline command's own overrides come first, so a stage's recipe and its overrides win. Its inputs
    are checked here, when the stage is about to start (it may start from an earlier stage's output)."""
    from hydra.core.hydra_config import HydraConfig

    from icepop.preflight import check_inputs

    own = ("+recipe=", "run.dir=", "pipeline.", "compare.")  # the pipeline's own, not its stages'
    given = with_model_preset([o for o in HydraConfig.get().overrides.task if not o.startswith(own)])
    config = to_config(hydra.compose(config_name="config", overrides=[overrides[0], *given, *overrides[1:]]))
    if check:
        check_inputs(config)
    return config


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    execute(*prepare(cfg, list(HydraConfig.get().overrides.task)))


def execute(config: Config, cfg: DictConfig) -> None:
    """Run the stage `prepare` checked (or, with run.dry_run=true, only load its data and print the
    plan); a bad input found while the stage loads its data stops it with one line."""
    from icepop.errors import RunStopped
    from icepop.ray.hosts import WORKER_LOG_DIR
    from icepop.stages.checkpoint import resume_dir
    from icepop.stages.pipeline import run_stage
    from icepop.stages.summary import closing_lines

    if config.run.dry_run:
        from icepop.plan import dry_run
        from icepop.stages.pipeline import arm_configs

        with _input_errors_exit():
            dry_run(config)
            for name, arm in arm_configs(config, Path(config.run.dir), compose).items():
                print(f"icepop dry run: arm {name}")
                dry_run(arm)
        return
    run_dir = Path(config.run.dir)
    if config.stage in ("rlvr", "rlhf"):  # continue a run from its last complete checkpoint
        try:
            run_dir = resume_dir(run_dir, config.stage, config.run.resume)
        except FileNotFoundError as error:
            sys.exit(f"icepop: {error}")
    cfg.run.dir = str(run_dir)  # resolved once: `${now:...}` would give another time when saved
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_config(cfg, run_dir / "config.yaml")
    # The workers' own output (vLLM, DeepSpeed, torch, Ray) goes to files there, not the console; a
    # stage started by this one (an SFT warm-up, a pipeline's stages) writes beside it.
    logs = os.environ.setdefault(WORKER_LOG_DIR, str((run_dir / "logs").resolve()))
    print(f"icepop: run directory {run_dir.resolve()} (metrics.jsonl, checkpoints/); workers' output: {logs}")
    with _input_errors_exit():
        try:
            done = run_stage(config, run_dir, compose)
        except RunStopped as error:
            sys.exit(f"icepop: the run stopped: {error}")
    print("\n".join(closing_lines(done if isinstance(done, list) else [done], run_dir, config.data.source)))


@contextlib.contextmanager
def _input_errors_exit() -> Iterator[None]:
    """A bad input found while a stage loads its data (before anything starts): one line, no traceback."""
    try:
        yield
    except InputError as error:
        sys.exit(f"icepop: {error}")


def _save_config(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config; when continuing a run, say which settings differ from its last one."""
    new = OmegaConf.to_container(cfg, resolve=True)
    if path.is_file():
        before = _flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
        changed = [f"{k}: {before.get(k)!r} → {v!r}" for k, v in _flatten(new).items() if before.get(k) != v]
        if changed:
            print(f"icepop: {path.parent} already has a run; settings changed since: {'; '.join(changed)}")
    OmegaConf.save(OmegaConf.create(new), path)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {
        k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}.{key}".lstrip(".")).items()
    }


if __name__ == "__main__":
    if unknown := unknown_override_keys(sys.argv[1:]):
        sys.exit(invalid(unknown))
    main()
