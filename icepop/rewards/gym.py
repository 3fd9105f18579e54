"""Scoring replies to reasoning-gym problems (icepop.data.gym) with the library's own `score_answer`.

Three readings of one reply, from strict to lenient:
- strict: the content of its last <answer></answer> tags, as the prompt asks, scored by score_answer;
- the training reward (`score`): the same, but a reply without tags offers its last number instead (a
  documented shaping: the model is rewarded for the right answer before it has learned the tags);
- lenient (evaluation): for a numeric answer, the last number in the reply equals it; otherwise the
  training reward is 1. Learning the output format alone moves strict accuracy, not lenient accuracy.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
NUMBER = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


@functools.cache
def _checker(name: str) -> Callable[[str | None, dict[str, Any]], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


def _score_answer(answer: str | None, entry: dict[str, Any]) -> float:
    """The library's own score of `answer` for the problem `entry` (its source names the generator)."""
    if answer is None:
        return 0.0
    return float(_checker(entry["source"].removeprefix("reasoning_gym:"))(answer, entry))


def tagged_answer(text: str) -> str | None:
    """The content of the reply's last <answer></answer> tags."""
    found = ANSWER_TAG.findall(text)
    return found[-1] if found else None


def last_number(text: str) -> str | None:
    """The reply's last number, as written ("1,234", "-3.5", "2/3"), or None."""
    found = NUMBER.findall(text)
    return found[-1] if found else None


def as_number(text: str | None) -> Fraction | None:
    """ "1,234" → 1234, "-3.50" → -7/2, "2/3" → 2/3; None when it is not a plain number."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("−", "-")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def strict(text: str, entry: dict[str, Any]) -> float:
    """score_answer of the tagged answer (0 without tags)."""
    return _score_answer(tagged_answer(text), entry)


def score(text: str, entry: dict[str, Any]) -> float:
    """The training reward: score_answer of the tagged answer, else of the reply's last number."""
    answer = tagged_answer(text)
    return _score_answer(answer if answer is not None else last_number(text), entry)


def lenient(text: str, entry: dict[str, Any]) -> bool:
    """A numeric answer: the reply's last number equals it; any other: the training reward is 1."""
    oracle = as_number(str(entry["answer"]))
    if oracle is None:
        return score(text, entry) >= 1.0
    return as_number(last_number(text)) == oracle
