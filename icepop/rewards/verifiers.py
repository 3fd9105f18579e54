"""Verifiable rewards in [0, 1] for the built-in tasks, and the resolver for custom reward functions.

Key design choice: verification never executes model text in this process. Code is run only inside
`icepop.rewards.sandbox` (a separate, contained interpreter). Countdown replies are parsed with `ast`
and evaluated by walking a whitelist of nodes over exact `Fraction`s; numeric answers go through
math-verify with its signal-based timeouts switched off (they only work on a main thread), because
the time limit belongs to `RewardPool`, which runs every verifier in a worker process it can kill.

What counts as correct (the reply formats are in `icepop.data.tasks`):
- "arithmetic": a plain integer reply ("42", " 42 \n", "042") is compared as an integer, no sympy;
  anything else must parse with math-verify to a number literal equal to the answer: "42.0",
  "$42$", "\\boxed{42}" and "The answer is 42" score 1; echoing the question ("47 + 385") scores 0.
- "math": math-verify's equivalence, expressions allowed (for datasets such as GSM8K/MATH; a gold
  answer in GSM8K's "reasoning #### 72" form is cut to what follows "####").
- "countdown": an expression in + - * / and parentheses over the given numbers, each used at most
  once (not all required), equal to the target exactly. An optional "= <target>" suffix and
  "<answer>…</answer>" tags are accepted; "×", "÷" and "−" read as *, / and -.
- "code": Python that passes the answer's tests in the sandbox. The code is the last ```python (or
  bare ```) block of the reply, else the whole reply; the answer is the test program as a string, or
  a dict: "test" (required), "prompt" (code put before the reply's, as HumanEval does: a reply may
  hold the whole function or only its body), "entry_point" (adds `check(entry_point)`) and
  "timeout_seconds" (default CODE_TIMEOUT_SECONDS; keep it below reward.timeout_seconds).
"""

from __future__ import annotations

import ast
import importlib
import logging
import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from icepop.types import Prompt

VERIFIERS = ("arithmetic", "code", "countdown", "math")
BUILTIN_REWARD = "icepop.rewards.verifiers:builtin_reward"

_INTEGER = re.compile(r"[+-]?\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_EXPRESSION_CHARS = re.compile(r"[0-9+\-*/() ]+")
_MAX_EXPRESSION_CHARS = 200  # longer replies are not a countdown answer; keeps the parse cheap
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
CODE_TIMEOUT_SECONDS = 5.0
"""The sandbox's wall-clock limit per code sample: half the pool's default reward.timeout_seconds (10),
so the sandbox kills a stuck program cleanly before the pool would kill and replace its worker."""


def _drop_timeout_notice(record: logging.LogRecord) -> bool:
    """math-verify warns once per process that its timeouts are off; here that is deliberate."""
    return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    if _drop_timeout_notice not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_drop_timeout_notice)

_OPERATIONS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,  # ZeroDivisionError is caught by the caller: a wrong answer
}


def verify(task: str, response_text: str, answer: Any) -> float:
    """Score a response to a built-in task: 1.0 when correct, else 0.0."""
    if task == "arithmetic":
        return _verify_number(response_text, answer, literal_only=True)
    elif task == "math":
        return _verify_number(response_text, answer, literal_only=False)
    elif task == "countdown":
        return verify_countdown(response_text, answer)
    elif task == "code":
        return verify_code(response_text, answer)
    elif task.startswith("reasoning_gym:"):  # the library's own checker (icepop.rewards.gym)
        from icepop.rewards import gym

        return gym.score(response_text, answer)
    raise ValueError(
        f"task={task!r} has no built-in verifier (built-in: {', '.join(VERIFIERS)}); "
        "score it with a custom reward function 'package.module:function'"
    )


def builtin_reward(prompt: Prompt, response_text: str) -> float:
    """The default reward function: the built-in verifier that `prompt.task` names."""
    return verify(prompt.task, response_text, prompt.answer)


def lenient_reward(prompt: Prompt, response_text: str) -> float:
    """A shaped reward for `reward.function=icepop.rewards.verifiers:lenient_reward`: 1.0 when the reply's
    last number is the answer, whatever the format (the reading held-out `accuracy_lenient` uses), so
    that a model is paid for the right number before it has learned the requested format; tasks without
    a numeric answer fall back to the built-in verifier."""
    correct = lenient_correct(prompt.task, response_text, prompt.answer)
    return builtin_reward(prompt, response_text) if correct is None else float(correct)


def _canonical_integer(text: str) -> str:
    """Sign and digits without leading zeros ("-042" → "-42", "+0" → "0"); compared as strings, a
    10⁵-digit reply costs no int() (which Python limits to 4300 digits)."""
    digits = text.lstrip("+-").lstrip("0") or "0"
    return "-" + digits if text.startswith("-") and digits != "0" else digits


def _verify_number(response_text: str, answer: Any, literal_only: bool) -> float:
    """math-verify equivalence; a plain integer reply against an integer answer skips sympy."""
    text = response_text.strip()
    gold = str(answer).rsplit("####", 1)[-1].strip()  # GSM8K's answers end in "#### <number>"
    if _INTEGER.fullmatch(text) and _INTEGER.fullmatch(gold):
        return float(_canonical_integer(text) == _canonical_integer(gold))
    from math_verify import parse
    from math_verify import verify as math_verify

    # A bare "\sqrt{2}" only parses inside math delimiters; "42" parses either way.
    gold_parsed = parse(f"${gold}$", parsing_timeout=None) if "$" not in gold else []
    gold_parsed = gold_parsed or parse(gold, parsing_timeout=None)
    if not gold_parsed:
        raise ValueError(f"answer {answer!r} is not something math-verify can parse")
    predicted = parse(response_text, parsing_timeout=None)
    if not predicted:
        return 0.0
    if literal_only and not getattr(predicted[0], "is_Number", False):
        return 0.0  # "47 + 385" would otherwise be "equivalent" to 432: the question echoed back
    return float(math_verify(gold_parsed, predicted, timeout_seconds=None))


def _countdown_answer(answer: Any) -> tuple[Fraction, Counter[int]]:
    if not (isinstance(answer, dict) and "target" in answer and "numbers" in answer):
        raise ValueError(f'countdown answer must be {{"target": int, "numbers": [int, ...]}}, got {answer!r}')
    return Fraction(int(answer["target"])), Counter(int(n) for n in answer["numbers"])


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of a whitelisted expression tree; collects the literals into `used`."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATIONS:
        return _OPERATIONS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    raise ValueError(f"{type(node).__name__} is not allowed in a countdown answer")


def verify_countdown(response_text: str, answer: Any) -> float:
    """1.0 when the reply is an expression over the allowed numbers that equals the target exactly."""
    target, allowed = _countdown_answer(answer)
    tagged = _ANSWER_TAG.findall(response_text)
    text = (tagged[-1] if tagged else response_text).strip()
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-")
    expression, *claimed = text.split("=")
    if len(claimed) > 1 or (claimed and claimed[0].strip() != str(target)):
        return 0.0
    expression = expression.strip()
    if len(expression) > _MAX_EXPRESSION_CHARS or not _EXPRESSION_CHARS.fullmatch(expression):
        return 0.0  # only digits, operators, parentheses and spaces: nothing else is even parsed
    try:
        used: list[int] = []
        value = _evaluate(ast.parse(expression, mode="eval").body, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    if Counter(used) - allowed:  # some number not given, or used more often than given
        return 0.0
    return float(value == target)


def extract_code(response_text: str) -> str:
    """The last fenced code block (```python, ```py or bare ```; an unclosed one runs to the end) of
    a reply, else the whole reply."""
    blocks = _CODE_BLOCK.findall(response_text)
    return blocks[-1] if blocks else response_text


def code_program(response_text: str, answer: Any) -> tuple[str, float]:
    """The program a code answer runs, [prompt +] code + test [+ check(entry_point)], and its time limit."""
    spec = {"test": answer} if isinstance(answer, str) else answer
    if not isinstance(spec, dict) or not isinstance(spec.get("test"), str) or not spec["test"].strip():
        raise ValueError(
            f'code answer must be the test program (a str) or {{"test": str, "prompt": str, '
            f'"entry_point": str, "timeout_seconds": float}} with a non-empty "test", got {answer!r:.200}'
        )
    for field in ("prompt", "entry_point"):
        if spec.get(field) is not None and not isinstance(spec[field], str):
            raise ValueError(f"code answer field {field!r} must be a str, got {spec[field]!r:.100}")
    entry_point = spec.get("entry_point")
    if entry_point is not None and not entry_point.isidentifier():
        raise ValueError(f"code answer field 'entry_point' must be a function name, got {entry_point!r}")
    timeout = spec.get("timeout_seconds")
    timeout = CODE_TIMEOUT_SECONDS if timeout is None else float(timeout)
    if not timeout > 0:
        raise ValueError(f"code answer field 'timeout_seconds' must be positive, got {timeout}")
    parts = [spec.get("prompt") or "", extract_code(response_text), spec["test"]]
    if entry_point:
        parts.append(f"check({entry_point})")
    return "\n".join(part.rstrip("\n") for part in parts if part) + "\n", timeout


def verify_code(response_text: str, answer: Any) -> float:
    """1.0 when the reply's code passes the answer's tests in the sandbox, else 0.0. Raises
    SandboxUnavailable where the sandbox cannot be set up: then nothing runs and nothing scores."""
    from icepop.rewards.sandbox import SandboxLimits, run_python

    program, timeout = code_program(response_text, answer)
    return float(run_python(program, SandboxLimits(timeout_seconds=timeout, cpu_seconds=timeout)).passed)


def resolve_reward_fn(path: str) -> Callable[[Prompt, str], float]:
    """Import `fn(prompt, response_text) -> float` from "package.module:function" (or the dotted
    "package.module.function"); a clear ImportError/TypeError when that is not possible."""
    return resolve_callable(path, "reward function")


def resolve_callable(path: str, kind: str) -> Any:
    """The callable at "package.module:name" (or the dotted "package.module.name"); `kind` names it in
    the ImportError/TypeError raised when that is not possible (a reward function, an environment)."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ImportError(f"{kind} {path!r} must look like 'package.module:name'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"{kind} {path!r}: cannot import module {module_name!r} ({error}); "
            "is its package installed or on PYTHONPATH?"
        ) from error
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise ImportError(f"{kind} {path!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, name)
    if not callable(target):
        raise TypeError(f"{kind} {path!r} is a {type(target).__name__}, not a callable")
    return target


def lenient_correct(task: str, response_text: str, answer: Any) -> bool | None:
    """Whether the reply's last number is the (numeric) answer, whatever the reply's format — so that
    learning the output format alone does not count; None where the task's answer is not a number
    (then the verifier's own judgement stands)."""
    from icepop.rewards import gym

    if task.startswith("reasoning_gym:"):
        return gym.lenient(response_text, answer)
    if task not in ("arithmetic", "math"):
        return None
    gold = gym.as_number(str(answer).rsplit("####", 1)[-1])  # GSM8K's answers end in "#### <number>"
    return None if gold is None else gym.as_number(gym.last_number(response_text)) == gold


def strict_correct(task: str, response_text: str, answer: Any) -> bool | None:
    """Whether the reply is right in exactly the requested format (arithmetic: the number alone;
    reasoning-gym: the answer in <answer></answer> tags); None where the verifier is that strict."""
    from icepop.rewards import gym

    if task.startswith("reasoning_gym:"):
        return gym.strict(response_text, answer) >= 1.0
    if task == "arithmetic":
        text = response_text.strip()
        return bool(_INTEGER.fullmatch(text)) and _canonical_integer(text) == _canonical_integer(str(answer))
    return None
