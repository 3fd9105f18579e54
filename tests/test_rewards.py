"""Verifiers by hand, custom reward resolution, and the reward pool under errors, hangs and crashes."""

from __future__ import annotations

import multiprocessing
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from icepop.rewards import RewardPool, Scores, resolve_reward_fn, verify, verify_countdown
from icepop.stages.rl_run import failure_streak, reward_failure
from icepop.types import Prompt

COUNTDOWN = {"target": 14, "numbers": [7, 2, 4]}


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("42", 1.0),
        (" 42 \n", 1.0),
        ("042", 1.0),  # read as the integer 42
        ("42.0", 1.0),  # math-verify: the same number
        ("$42$", 1.0),
        ("\\boxed{42}", 1.0),
        ("The answer is 42.", 1.0),
        ("41", 0.0),
        ("42.5", 0.0),
        ("", 0.0),
        ("forty-two", 0.0),
        ("40 + 2", 0.0),  # an expression is not an answer: echoing the question must not pay
    ],
)
def test_arithmetic_verifier(response: str, reward: float) -> None:
    assert verify("arithmetic", response, 42) == reward
    assert verify("arithmetic", response, "42") == reward  # dataset answers arrive as strings


def test_arithmetic_negative_and_math_equivalences() -> None:
    assert verify("arithmetic", "-7", -7) == 1.0 and verify("arithmetic", "7", -7) == 0.0
    assert verify("arithmetic", "-0", 0) == 1.0 and verify("arithmetic", "+5", "05") == 1.0
    assert verify("arithmetic", "4" * 100_000, 42) == 0.0  # longer than int() accepts: still just wrong
    # "math" accepts expressions: math-verify's equivalence (datasets such as GSM8K/MATH).
    assert verify("math", "0.5", "\\frac{1}{2}") == 1.0
    assert verify("math", "The answer is $\\frac{2}{4}$", "1/2") == 1.0
    assert verify("math", "40 + 2", "42") == 1.0
    assert verify("math", "$\\sqrt{2}$", "\\sqrt{2}") == 1.0  # a bare gold answer may be LaTeX
    assert verify("math", "$2$", "\\sqrt{2}") == 0.0
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"
    assert verify("math", "She sold 72 clips.", gsm8k) == 1.0 and verify("math", "24", gsm8k) == 0.0
    assert verify("math", "\\boxed{3}", "$\\boxed{3}$") == 1.0


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("7*2", 1.0),
        ("(7-4)*2+4*2", 0.0),  # 4 used twice, only one 4 given
        ("7+7", 0.0),  # 7 used twice
        ("2*7", 1.0),  # not every number must be used
        (" (4 + 7 - 2) + 2 * 2 ", 0.0),  # value 13 and 2 used three times
        ("4*2+7-1", 0.0),  # 1 is not given
        ("7/2*4", 1.0),  # exact fractions: 7/2 = 3.5, × 4 = 14
        ("7*4/2", 1.0),  # exact division
        ("(7+2)/4", 0.0),  # 9/4 is not 14
        ("7*2 = 14", 1.0),  # a correct "= target" suffix is allowed
        ("7*2 = 15", 0.0),  # a wrong one is not
        ("<answer>7*2</answer>", 1.0),
        ("7×2", 1.0),  # unicode operators read as ASCII
        ("7**2", 0.0),  # power: not an allowed operator
        ("28//2", 0.0),  # floor division: no, and 28 is not given
        ("7%2", 0.0),  # modulo: character not allowed
        ("-2+7*2+2", 0.0),  # unary minus is not an operation of the game
        ("7*", 0.0),  # malformed
        ("((7)*2", 0.0),  # unbalanced
        ("", 0.0),
        ("14", 0.0),  # the target itself is not a given number
        ("7*2/(4-4)", 0.0),  # division by zero (and 4 twice)
    ],
)
def test_countdown_verifier(response: str, reward: float) -> None:
    assert verify("countdown", response, COUNTDOWN) == reward


def test_countdown_division_by_zero_and_code_never_runs(tmp_path: Path) -> None:
    assert verify_countdown("5/(3-3)", {"target": 1, "numbers": [3, 3, 5]}) == 0.0
    marker = tmp_path / "pwned"
    attacks = [
        f"__import__('os').system('touch {marker}')",
        f"open('{marker}', 'w')",
        "(lambda: 14)()",
        "[x for x in ().__class__.__base__.__subclasses__()]",
        "9" * 10_000,
    ]
    for attack in attacks:
        assert verify_countdown(attack, COUNTDOWN) == 0.0
    assert not marker.exists()


def test_wrong_answer_format_and_unknown_task_are_errors() -> None:
    with pytest.raises(ValueError, match="countdown answer must be"):
        verify("countdown", "1+2", 3)
    with pytest.raises(ValueError, match="no built-in verifier"):
        verify("sudoku", "1", 1)


def test_resolve_reward_fn() -> None:
    import os.path

    assert resolve_reward_fn("os.path:join") is os.path.join
    assert resolve_reward_fn("os.path.join") is os.path.join  # the dotted spelling
    assert (
        resolve_reward_fn("icepop.rewards.verifiers:builtin_reward")(Prompt([], 3, "arithmetic"), "3") == 1.0
    )
    with pytest.raises(ImportError, match=r"cannot import module 'no_such_package_xyz\.rewards'"):
        resolve_reward_fn("no_such_package_xyz.rewards:score")
    with pytest.raises(ImportError, match="has no attribute 'nope'"):
        resolve_reward_fn("os.path:nope")
    with pytest.raises(ImportError, match="must look like"):
        resolve_reward_fn("justaname")
    with pytest.raises(TypeError, match="not a callable"):
        resolve_reward_fn("os:sep")


USER_REWARDS = """
    import os
    import time


    def exact(prompt, response_text):
        if response_text == "boom":
            raise RuntimeError("boom")
        if response_text == "hang":
            time.sleep(10**6)
        if response_text == "exit":
            os._exit(3)
        if response_text == "nan":
            return float("nan")
        return float(response_text == str(prompt.answer))
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A user's reward module outside the package, importable through sys.path as a user's would be."""
    folder = tmp_path_factory.mktemp("user_rewards")
    (folder / "icepop_test_user_rewards.py").write_text(textwrap.dedent(USER_REWARDS))
    sys.path.insert(0, str(folder))
    yield "icepop_test_user_rewards:exact"
    sys.path.remove(str(folder))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_pool_with_builtin_verifiers_scores_in_order() -> None:
    prompts = [
        Prompt([1], 42, "arithmetic"),
        Prompt([1], COUNTDOWN, "countdown"),
        Prompt([1], 5, "nope"),
    ] * 20
    responses = ["42", "7*2", "5"] * 19 + ["41", "7+2", "5"]
    with RewardPool(num_workers=2, timeout_s=5.0) as pool:
        scores = pool.score(prompts, responses)
    assert scores.rewards == [1.0, 1.0, 0.0] * 19 + [0.0, 0.0, 0.0]
    # Unknown task "nope": a ValueError in the worker, scored 0 and counted, not raised.
    assert scores.stats == {"reward/errors": 20.0, "reward/timeouts": 0.0}


def test_pool_survives_errors_hangs_and_crashes(user_module: str) -> None:
    prompts = [Prompt([1], answer, "custom") for answer in range(8)]
    with RewardPool(user_module, num_workers=2, timeout_s=1.0) as pool:
        first_pids = pool.worker_pids
        start = time.monotonic()
        responses = ["0", "boom", "hang", "3", "exit", "nan", "hang", "7"]
        scores = pool.score(prompts, responses)
        elapsed = time.monotonic() - start
        assert scores.rewards == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        # boom raised, exit killed its process, nan is not a reward; both hangs hit the 1 s limit.
        assert scores.stats == {"reward/errors": 3.0, "reward/timeouts": 2.0}
        assert elapsed < 2 * 1.0 + 4.0  # two rounds of timeouts at most, plus worker restarts
        # The stuck and the dead workers were replaced: the pool keeps scoring correctly.
        assert set(pool.worker_pids) != set(first_pids) and len(pool.worker_pids) == 2
        again = pool.score(prompts, [str(i) for i in range(8)])
        assert again.rewards == [1.0] * 8
        assert again.stats == {"reward/errors": 0.0, "reward/timeouts": 0.0}
        pids = pool.worker_pids
        with pytest.raises(ValueError, match="pair up by index"):
            pool.score(prompts, ["0"])
    # close() (through the context manager) left no worker behind.
    assert all(_gone(pid) for pid in pids + first_pids)
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(prompts, [str(i) for i in range(8)])
    pool.close()  # idempotent


def test_pool_rejects_a_reward_function_it_cannot_import() -> None:
    with pytest.raises(ImportError, match="no_such_package_xyz"):
        RewardPool("no_such_package_xyz:score")
    with pytest.raises(ValueError, match="start_method"):
        RewardPool(start_method="fork")


def test_a_reward_that_fails_on_every_sample_stops_the_run_with_its_first_error() -> None:
    prompts = [Prompt([1], "4", "math", {"messages": []})] * 3
    with RewardPool("e2e_rewards:broken", num_workers=1, timeout_s=10.0) as pool:
        scored = pool.score(prompts, ["4", "5", "6"])
    assert scored.rewards == [0.0] * 3 and scored.stats["reward/errors"] == 3
    assert "KeyError: 'no_such_column'" in scored.first_error
    streak = 0
    for _ in range(2):
        streak = failure_streak(streak, scored, 3)
    assert streak == 2  # two steps in a row with no usable reward ...
    assert (
        failure_streak(streak, Scores([1.0, 0.0, 0.0], {"reward/errors": 2.0}), 3) == 0
    )  # ... one good one resets
    message = reward_failure(scored, 3, step=7)
    assert (
        "failed on every sample of 3 steps in a row (up to step 7" in message and "no_such_column" in message
    )
