"""Tasks from reasoning-gym (Apache-2.0): ~100 procedural generators, each with its own answer checker.

`data.source=reasoning_gym:<name>` (e.g. `reasoning_gym:basic_arithmetic`, `reasoning_gym:gsm_symbolic`)
draws `data.size` training problems from the generator with the run's seed and the held-out ones from
another seed; `data.task_options` go to the generator's config (e.g. `{max_terms: 2, max_digits: 2}`).
Every problem carries the library's own entry (question, answer, metadata) as its answer, and its
reward is the library's `score_answer` (icepop.rewards.gym).

reasoning-gym is an optional extra (`pip install 'icepop[gym]'`): imported only when such a source is
used, in the driver and in the reward workers.
"""

from __future__ import annotations

from typing import Any

from icepop.types import Problem

PREFIX = "reasoning_gym:"
INSTALL = "pip install 'icepop[gym]'"
SYSTEM = (
    "Solve the problem. End your reply with the final answer alone inside <answer></answer> tags, "
    "e.g. <answer>42</answer>."
)
"""The reply format asked of every reasoning-gym problem (the question states what the answer is)."""


def is_gym(source: str) -> bool:
    return source.startswith(PREFIX)


def gym_name(source: str) -> str:
    return source.removeprefix(PREFIX)


def registry() -> dict[str, Any]:
    """reasoning-gym's generators by name; ImportError with the install line when it is missing."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as error:
        raise ImportError(f"data.source=reasoning_gym:... needs reasoning-gym: {INSTALL}") from error
    return DATASETS


def check_source(source: str, options: dict[str, Any]) -> None:
    """ValueError naming what is wrong: an unknown generator (with the closest names) or options its
    config does not take."""
    import dataclasses
    import difflib

    name, generators = gym_name(source), registry()
    if name not in generators:
        close = difflib.get_close_matches(name, sorted(generators), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; {len(generators)} exist"
        raise ValueError(f"reasoning-gym has no generator {name!r}{hint}")
    fields = {f.name for f in dataclasses.fields(generators[name][1])} - {"seed", "size"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"data.task_options {unknown} are not options of {name!r}; it takes {sorted(fields)}"
        )


def gym_problems(source: str, seed: int, count: int, options: dict[str, Any]) -> list[Problem]:
    """`count` problems of the generator, reproducible from (seed, options)."""
    import reasoning_gym

    check_source(source, options)
    dataset = reasoning_gym.create_dataset(gym_name(source), seed=seed, size=count, **options)
    problems = []
    for entry in dataset:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": entry["question"]}]
        answer = {"source": source, **entry}
        problems.append(Problem(source, messages, answer, f"<answer>{entry['answer']}</answer>"))
    return problems
