"""Environments for multi-turn rollouts: the `Environment` seam (base), its factory, the built-in ones."""

from icepop.envs.base import Environment, Message, Turn, started
from icepop.envs.factory import BUILTIN_ENVIRONMENTS, environment_factory

__all__ = ["BUILTIN_ENVIRONMENTS", "Environment", "Message", "Turn", "environment_factory", "started"]
