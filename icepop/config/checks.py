"""Value checks shared by the config groups; each raises ValueError with a message naming the field."""

from __future__ import annotations

from pathlib import Path

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


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU instructions that make bfloat16 arithmetic fast; without them torch and vLLM emulate it (a
bfloat16 engine generated 4-5× slower than a float32 one on an AVX2-only EPYC)."""


def cpu_flags() -> set[str]:
    """This machine's CPU flags (/proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return {flag for line in lines for flag in line.split(":", 1)[1].split()}


def engine_dtype(gpus_per_engine: int, flags: set[str]) -> tuple[str, str]:
    """What rollout.dtype=auto means for an engine with these GPUs on a CPU with these flags, and why:
    bfloat16 where it has bfloat16 arithmetic (a GPU, or AVX512-BF16/AMX), float32 otherwise."""
    if gpus_per_engine:
        return "bfloat16", "a GPU engine"
    found = sorted(set(BF16_CPU_FLAGS) & flags)
    if found:
        return "bfloat16", f"this CPU has {', '.join(found)}"
    return "float32", "this CPU has no bfloat16 instructions (AVX512-BF16/AMX): bfloat16 would be emulated"
