"""Built-in tasks: deterministic per (task, seed, index), well-formed, and countdown always solvable."""

from __future__ import annotations

import re

import pytest

from icepop.data.tasks import generate_problems, problem, solve_countdown
from icepop.rewards.verifiers import verify, verify_countdown


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_same_seed_same_problems_and_any_index_alone(task: str) -> None:
    first = list(generate_problems(task, seed=7, count=20))
    assert first == list(generate_problems(task, seed=7, count=20))
    assert first != list(generate_problems(task, seed=8, count=20))
    # Problem i needs no generation of the ones before it: random access for workers and resumption.
    assert problem(task, 7, 13) == first[13]
    endless = generate_problems(task, seed=7)
    assert [next(endless) for _ in range(20)] == first


def test_arithmetic_questions_match_their_answers() -> None:
    for p in generate_problems("arithmetic", seed=0, count=300, digits=3, operators="+-*"):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", p.messages[1]["content"]).groups()
        a, b = int(a), int(b)
        assert 100 <= min(a, b) and max(a, b) <= 999  # exactly `digits` digits
        assert p.answer == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert p.answer >= 0  # subtraction puts the larger operand first
        assert p.target_reply == str(p.answer)
        assert [m["role"] for m in p.messages] == ["system", "user"]
        assert verify("arithmetic", p.target_reply, p.answer) == 1.0


def test_arithmetic_operators_and_digits_are_respected() -> None:
    problems = list(generate_problems("arithmetic", seed=1, count=200, digits=1, operators="-"))
    assert all(" - " in p.messages[1]["content"] for p in problems)
    assert all(0 <= p.answer <= 9 for p in problems)
    two_digit = [p.messages[1]["content"] for p in generate_problems("arithmetic", seed=1, count=200)]
    assert all(re.fullmatch(r"What is \d\d \+ \d\d\?", question) for question in two_digit)
    with pytest.raises(ValueError, match="operators"):
        problem("arithmetic", 0, 0, operators="/")
    with pytest.raises(ValueError, match="digits"):
        problem("arithmetic", 0, 0, digits=0)


def test_countdown_is_always_solvable_by_its_stored_solution() -> None:
    seen_sizes = set()
    for seed in range(10):
        for p in generate_problems("countdown", seed=seed, count=40):
            numbers, target = p.answer["numbers"], p.answer["target"]
            seen_sizes.add(len(numbers))
            assert 3 <= len(numbers) <= 4 and all(1 <= n <= 10 for n in numbers)
            assert 10 <= target <= 99 and target not in numbers
            assert f"make {target}." in p.messages[1]["content"]
            assert verify_countdown(p.target_reply, p.answer) == 1.0, (p.target_reply, p.answer)
    assert seen_sizes == {3, 4}


def test_countdown_solver_by_hand() -> None:
    # From [2, 3]: 2+3=5, 2*3=6, 3-2=1 (2/3 and 3/2 are not integers), and the numbers themselves.
    assert solve_countdown([2, 3]) == {2: "2", 3: "3", 5: "2+3", 6: "2*3", 1: "3-2"}
    # The simplest solution wins: 48 from [10, 2, 6] needs all three; parentheses only where needed.
    assert solve_countdown([10, 2, 6])[48] == "6*(10-2)"
    assert solve_countdown([10, 2, 6])[16] == "10+6"  # 12 would be 2*6: shorter than 10+2
    # a-(b+c) keeps its parentheses; 9-(2+3) = 4 would read 9-2+3 = 10 without them.
    solutions = solve_countdown([9, 2, 3])
    assert all(
        verify_countdown(text, {"target": v, "numbers": [9, 2, 3]}) == 1.0 for v, text in solutions.items()
    )


def test_countdown_options_are_checked() -> None:
    with pytest.raises(ValueError, match="min_numbers"):
        problem("countdown", 0, 0, min_numbers=5, max_numbers=4)
    with pytest.raises(ValueError, match="no reachable target"):
        problem("countdown", 0, 0, max_number=2, min_numbers=2, max_numbers=2, min_target=90)
    with pytest.raises(ValueError, match="not a built-in task"):
        problem("sudoku", 0, 0)
