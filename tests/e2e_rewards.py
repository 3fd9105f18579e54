"""A custom reward for the end-to-end test, loaded by dotted path (`reward.function=e2e_rewards:shorter`).

It varies within every group, so each RL step has a non-zero advantage and a real update, whatever
the barely trained policy answers."""

from __future__ import annotations

import math
import time
import zlib

from icepop.types import Prompt


def shorter(prompt: Prompt, response_text: str) -> float:
    """1 / (1 + characters): shorter answers score higher."""
    return 1.0 / (1.0 + len(response_text))


def longer(prompt: Prompt, response_text: str) -> float:
    """min(characters, 24) / 24: longer answers score higher, up to 24 characters. Used before RLHF in
    the pipeline test, whose reward model prefers short replies, so the two stages pull apart and
    each must move its own measure."""
    return min(len(response_text), 24) / 24


def hangs_sometimes(prompt: Prompt, response_text: str) -> float:
    """`longer`, except that the responses to about one prompt in eight (by a hash of its token ids, so
    the same prompts in every run and on every CPU: what the model samples does not decide it) make the
    reward function hang forever; the pool must time them out and score them 0."""
    if zlib.crc32(str(prompt.prompt_ids).encode()) % 8 == 0:
        time.sleep(10**6)
    return longer(prompt, response_text)


def broken(prompt: Prompt, response_text: str) -> float:
    """A reward function with a bug: it raises on every sample."""
    return float(prompt.meta["no_such_column"])


def not_a_number(prompt: Prompt, response_text: str) -> float:
    """A reward function with a bug that does not raise: it returns NaN."""
    return math.nan


def half_constant(prompt: Prompt, response_text: str) -> float:
    """1 for every reply to about half the prompts (by a hash of their token ids: nothing to learn from
    those groups), `longer` for the others: what dynamic sampling must filter (tests/test_dapo.py)."""
    if zlib.crc32(str(prompt.prompt_ids).encode()) % 2 == 0:
        return 1.0
    return longer(prompt, response_text)
