"""An engine's numerics: what they need from its process environment, decided from its dtype and device
alone (icepop.rollout.vllm sets it before the engine starts), and how they are described."""

from __future__ import annotations

FLOAT32_ON_GPU = {"TRITON_F32_DEFAULT": "ieee"}
"""Exact float32 dot products in Triton kernels. vLLM 0.32 serves a float32 model on NVIDIA GPUs with its
Triton attention (FlashAttention and FlashInfer take 16-bit dtypes only: vllm/platforms/cuda.py's backend
priorities, each backend's `supported_dtypes`), whose `tl.dot(Q, K)` and `tl.dot(P, V)` name no input
precision (vllm/v1/attention/ops/triton_unified_attention.py). Triton then takes TRITON_F32_DEFAULT, else
"tf32" on GPUs that have it (triton.language.core.dot; Ampere and newer): an emulation on the trained tiny
model put that at 6.8e-3 in log p, over the float32 probe limit of 1e-3. Triton reads the variable as each
kernel compiles, and it is part of Triton's cache key, so a kernel cached in TF32 is not reused. torch's
own float32 matmuls are exact already: vLLM's GPU worker sets torch.set_float32_matmul_precision from
VLLM_FLOAT32_MATMUL_PRECISION, "highest" by default (vllm/v1/worker/gpu_worker.py)."""


def precision_env(dtype: str, on_gpu: bool) -> dict[str, str]:
    """The variables an engine of `dtype` ("float32", "bfloat16", "float16") on a GPU (or on CPU) sets
    where unset: `FLOAT32_ON_GPU` for a float32 engine on a GPU; nothing for 16-bit engines, whose dot
    products take 16-bit inputs whatever Triton's float32 default, nor on CPU, where vLLM runs no Triton
    kernel."""
    return dict(FLOAT32_ON_GPU) if on_gpu and dtype == "float32" else {}


FP8_SIMULATED = "FP8 weight rounding, simulated"
"""How a CPU engine with rollout.quantization=fp8 is labelled wherever the run describes itself: vLLM has
no FP8 kernel there, so icepop.rollout.fp8 rounds the weights of a 16-bit engine as vLLM's FP8 would."""


def precision_label(dtype: str, quantization: str | None, on_cpu: bool) -> str:
    """How an engine's precision is described: 'bfloat16'; with rollout.quantization=fp8 'fp8 (vLLM
    online FP8, per-tensor, in a bfloat16 engine)' on GPUs, 'fp8 (FP8 weight rounding, simulated:
    per-tensor E4M3 weights in a bfloat16 engine)' on CPU."""
    if quantization is None:
        return dtype
    if on_cpu:
        return f"{quantization} ({FP8_SIMULATED}: per-tensor E4M3 weights in a {dtype} engine)"
    return f"{quantization} (vLLM online FP8, per-tensor, in a {dtype} engine)"
