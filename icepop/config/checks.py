"""Value checks shared by the config groups; each raises ValueError with a message naming the field."""

from __future__ import annotations

from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
"""The trainer's dtypes (model.dtype): float16 trains with DeepSpeed's dynamic loss scaling
(icepop.trainer.inputs.FP16_LOSS_SCALING), on CPU ranks only where DeepSpeed can (`check_trainer_dtype`)."""
ROLLOUT_DTYPES = DTYPES
"""The engines' dtypes (rollout.dtype): vLLM's CPU and GPU backends serve all three."""


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


def cpu_trains_float16() -> bool:
    """Whether DeepSpeed trains in float16 on this CPU: its CPU accelerator's own test
    (deepspeed/accelerator/cpu_accelerator.py, `is_fp16_supported`: oneDNN's float16 kernels, an error
    meaning no); where it fails, `deepspeed.initialize` refuses fp16 ("Type fp16 is not supported on your
    device"). Imports torch: called only for model.dtype=float16 on CPU ranks."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:
        return False


def check_trainer_dtype(dtype: str, on_gpu: bool) -> None:
    """Refuse model.dtype=float16 for CPU trainer ranks on a CPU DeepSpeed cannot train float16 on
    (`cpu_trains_float16`), before anything starts; on_gpu: the ranks have a GPU (cluster=gpu)."""
    if dtype == "float16" and not on_gpu and not cpu_trains_float16():
        raise ValueError(
            "model.dtype=float16 cannot train on this CPU: DeepSpeed's CPU accelerator has no float16 here "
            "(torch.ops.mkldnn._is_mkldnn_fp16_supported() is False); use model.dtype=bfloat16 or float32 "
            "on this CPU, or float16 on GPUs (cluster=gpu)"
        )
