"""The built-in Python tool: the model may run code before it answers a verifiable problem.

A turn holding a fenced code block is run in icepop's sandbox (icepop.rewards.sandbox: no network, no
files outside its folder, CPU/memory/time limits) and its output (stdout, or the error's last line)
comes back as a "tool" message; a turn without one is the answer, scored by the task's verifier
(icepop.rewards.verify), which ends the episode. So on `data.source=arithmetic` a model can learn to
compute 47 * 38 with `print(47 * 38)` and copy the result, which a tiny model cannot do in its head.

`demonstration` writes the SFT warm-up's conversations when this environment is chosen: for half the
problems that exchange, for the other half the direct answer, so the tiny model starts RL knowing the
format and calling the tool about half the time.
"""

from __future__ import annotations

import random
import re

from icepop.envs.base import Message, Turn
from icepop.rewards.sandbox import SandboxLimits, run_sandboxed
from icepop.rewards.verifiers import extract_code, verify
from icepop.types import Problem, Prompt

SYSTEM = "Run Python with a ```python block to see its output. Then answer with the result only."
OUTPUT_CHARS = 200
"""The tool message keeps the last this many characters of the output."""
LIMITS = SandboxLimits(timeout_seconds=5.0, cpu_seconds=5.0)
_QUESTION = re.compile(r"What is (.+)\?")


def tool_output(code: str, limits: SandboxLimits = LIMITS) -> tuple[str, bool]:
    """(what the tool message says, whether the program failed): its stdout, or its error's last line."""
    result = run_sandboxed(code, limits)
    if result.passed:
        return result.stdout_tail.strip()[-OUTPUT_CHARS:] or "(no output)", False
    # The exception's line ("ZeroDivisionError: division by zero"), not the traceback's frames.
    lines = [
        line for line in result.stderr_tail.splitlines() if line and not line.startswith((" ", "Traceback"))
    ]
    described = [line for line in lines if ": " in line] or lines or [f"error: {result.reason}"]
    return described[-1][-OUTPUT_CHARS:], True


class PythonTool:
    """One episode: the problem's question under the tool's system prompt, answered after any number
    of code turns (up to rollout.max_turns in all)."""

    def __init__(self) -> None:
        self.prompt: Prompt | None = None

    @staticmethod
    def demonstration(problem: Problem) -> list[Message]:
        """The SFT warm-up's conversation for `problem` (the module's `demonstration`)."""
        return demonstration(problem)

    def start(self, prompt: Prompt) -> list[Message]:
        self.prompt = prompt
        question = [m for m in prompt.meta["messages"] if m["role"] != "system"]
        return [{"role": "system", "content": SYSTEM}, *question]

    def step(self, reply: str) -> Turn:
        assert self.prompt is not None, "start() first"
        if "```" in reply:
            output, failed = tool_output(extract_code(reply))
            return Turn([{"role": "tool", "content": output}], info={"tool_calls": 1, "tool_errors": failed})
        return Turn(reward=verify(self.prompt.task, reply, self.prompt.answer), done=True)


def demonstration(problem: Problem) -> list[Message]:
    """A warm-up conversation for a built-in arithmetic or countdown problem under the tool's prompt:
    for half the problems (drawn from the question) the direct answer, for the other half the whole
    tool exchange: run the expression, read the value, answer (arithmetic: the value; countdown: the
    expression). The warm-up then calls the tool about half the time, and RL has the choice to learn
    (episode/tool_calls_mean rises with the reward where the tool is what makes answers right)."""
    user = [m for m in problem.messages if m["role"] != "system"]
    if random.Random(user[-1]["content"]).random() < 0.5:
        return [
            {"role": "system", "content": SYSTEM},
            *user,
            {"role": "assistant", "content": problem.target_reply},
        ]
    if problem.task == "arithmetic":
        match = _QUESTION.search(user[-1]["content"])
        assert match is not None, user[-1]["content"]
        expression = match.group(1)
    elif problem.task == "countdown":
        expression = problem.target_reply
    else:
        raise ValueError(f"python_tool has demonstrations for arithmetic and countdown, not {problem.task!r}")
    value = eval(expression, {"__builtins__": {}})  # our own generated + - * / expression
    return [
        {"role": "system", "content": SYSTEM},
        *user,
        {"role": "assistant", "content": f"```python\nprint({expression})\n```"},
        {"role": "tool", "content": str(value)},
        {"role": "assistant", "content": problem.target_reply},
    ]
