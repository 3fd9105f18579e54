"""Environments for multi-turn rollouts: the `Environment` seam (base), its factory, the built-in ones."""

from icepop.envs.base import Demonstration, Environment, Message, Turn, started
from icepop.envs.factory import (
    BUILTIN_ENVIRONMENTS,
    demonstration_for,
    environment_factory,
    episode_demonstration,
)

__all__ = [
    "BUILTIN_ENVIRONMENTS",
    "Demonstration",
    "Environment",
    "Message",
    "Turn",
    "demonstration_for",
    "environment_factory",
    "episode_demonstration",
    "started",
]
