"""Entry point: `python -m icepop.train +recipe=rlvr [group=option ...] [key=value ...]`.

Hydra composes conf/config.yaml (the schema and defaults live in icepop/config.py) with the chosen
recipe from recipes/ and the command-line overrides; the result is checked, printed with its
derived quantities, saved as run.dir/config.yaml, and handed to the stage the recipe names.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from icepop.config import Config, register


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
    return config


def compose(overrides: list[str]) -> Config:
    """One stage's config, composed like a command line with these overrides (for the pipeline): the
    pipeline command's own overrides come first, so a stage's recipe and its overrides win."""
    from hydra.core.hydra_config import HydraConfig

    own = ("+recipe=", "run.dir=", "pipeline.")  # the pipeline's own, not its stages'
    given = [o for o in HydraConfig.get().overrides.task if not o.startswith(own)]
    return to_config(hydra.compose(config_name="config", overrides=[overrides[0], *given, *overrides[1:]]))


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from icepop.preflight import check_environment

    problem = check_environment()
    if problem is not None:
        sys.exit(problem)
    from icepop.stages.checkpoint import resume_dir
    from icepop.stages.pipeline import run_stage
    from icepop.stages.rl_run import RunStopped

    config = to_config(cfg)
    run_dir = Path(config.run.dir)
    if config.stage in ("rlvr", "rlhf"):  # continue a run from its last complete checkpoint
        try:
            run_dir = resume_dir(run_dir, config.stage, config.run.resume)
        except FileNotFoundError as error:
            sys.exit(f"icepop: {error}")
    cfg.run.dir = str(run_dir)  # resolved once: `${now:...}` would give another time when saved
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_config(cfg, run_dir / "config.yaml")
    try:
        run_stage(config, run_dir, compose)
    except RunStopped as error:
        sys.exit(f"icepop: the run stopped: {error}")


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
    main()
