"""Value checks shared by the config groups; each raises ValueError with a message naming the field."""

from __future__ import annotations

DTYPES = ("float32", "bfloat16")
"""The trainer's dtypes (model.dtype), and the rollout engines' but for float16."""
ROLLOUT_DTYPES = (*DTYPES, "float16")
"""The engines' dtypes (rollout.dtype): vLLM's CPU and GPU backends both serve float16 (the trainer does
not train in it: DeepSpeed's fp16 needs loss scaling, which icepop.trainer does not set up)."""


def one_of(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


def positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0; got {value}")


def non_negative(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0; got {value}")


def zero_or_one_gpu(name: str, value: int, one: str) -> None:
    """A GPU count per actor: 0 (CPU) or 1; `one` says what the GPU is for and how to use more."""
    if value not in (0, 1):
        raise ValueError(f"{name} must be 0 (CPU) or 1 ({one}); got {value}")
