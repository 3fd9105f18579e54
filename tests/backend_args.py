"""Arguments for tests and benchmarks that build a trainer rank or a rollout engine directly. The
backends take keyword-only arguments without defaults; a run's come from its config
(icepop.trainer.settings, icepop.ray.engine_placement.engine_settings), so these start from the embedded
default's (`+recipe=rlvr`) and change only what a test names — a name the backend does not take fails."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from icepop.config import Config


@functools.cache
def default_config() -> Config:
    """The composed config of `python -m icepop.train +recipe=rlvr` (the tiny default's presets)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from icepop.train import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = OmegaConf.to_object(compose(config_name="config", overrides=["+recipe=rlvr"]))
    assert isinstance(config, Config)
    return config


def _changed(settings: dict[str, Any], changes: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = set(changes) - set(settings)
    if unknown:
        raise TypeError(f"{what} takes no argument {sorted(unknown)}; it takes {sorted(settings)}")
    return {**settings, **changes}


def trainer_args(
    model_path: str | Path, *, rank: int, world_size: int, master_port: int, stage: str = "rl", **changes: Any
) -> dict[str, Any]:
    """Keyword arguments of a trainer rank (icepop.trainer.base.backend_class) on 127.0.0.1."""
    from icepop.trainer.settings import trainer_settings

    settings = trainer_settings(default_config(), str(model_path), stage)
    settings |= {"rank": rank, "world_size": world_size, "master_port": master_port}
    settings["master_addr"] = "127.0.0.1"
    return _changed(settings, changes, "a trainer rank")


def engine_args(model_path: str | Path, **changes: Any) -> dict[str, Any]:
    """Keyword arguments of a rollout engine (icepop.rollout.base.engine_class)."""
    from icepop.ray.engine_placement import engine_settings

    return _changed(engine_settings(default_config(), str(model_path)), changes, "a rollout engine")
