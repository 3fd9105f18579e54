"""The explicit factory of the `Environment` seam: a built-in by name, else a dotted path."""

from __future__ import annotations

from collections.abc import Callable

from icepop.envs.base import Demonstration, Environment
from icepop.rewards.verifiers import resolve_callable

BUILTIN_ENVIRONMENTS = ("python_tool", "code_repair")


def environment_factory(name: str) -> Callable[[], Environment]:
    """What makes one episode's environment: a built-in by name, else the callable at a dotted path."""
    if name == "python_tool":
        from icepop.envs.python_tool import PythonTool

        return PythonTool
    elif name == "code_repair":
        from icepop.envs.code_repair import CodeRepair

        return CodeRepair
    if ":" not in name and "." not in name:
        raise ValueError(
            f"rollout.environment={name!r} is neither a built-in environment "
            f"({', '.join(BUILTIN_ENVIRONMENTS)}) nor a dotted path 'package.module:Name'"
        )
    return resolve_callable(name, "environment")


def demonstration_for(name: str) -> Demonstration | None:
    """The environment's `demonstration`, which the SFT warm-up trains on, or None where it has none."""
    return getattr(environment_factory(name), "demonstration", None)


def episode_demonstration(environment: str | None, agent: str | None) -> tuple[str, Demonstration] | None:
    """(the episodes' maker, its `demonstration`) for rollout.environment or rollout.agent (an agent
    function may carry one too, as icepop.examples.calculator_agent does), or None where there is none."""
    if environment is not None:
        demonstration = demonstration_for(environment)
    elif agent is not None:
        demonstration = getattr(resolve_callable(agent, "agent"), "demonstration", None)
    else:
        return None
    return None if demonstration is None else (environment or agent or "", demonstration)
