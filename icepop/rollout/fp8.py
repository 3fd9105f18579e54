"""FP8 rollouts (rollout.quantization=fp8): the engine's linear layers hold FP8 E4M3 weights with one
scale per tensor, re-quantized from the trainer's weights at every sync.

On GPUs this is vLLM's own online FP8 (`fp8_engine_kwargs`): vLLM 0.32 maps `quantization="fp8"` for a
full-precision checkpoint to its `fp8_per_tensor` online scheme (model_loader/weight_utils.py, "fp8 is
deprecated for online quantization"), and its in-place reload re-runs that quantization for every
layer it reloads (model_loader/reload/layerwise.py `_layerwise_process`: it clears
`_already_called_process_weights_after_loading`, runs the layer's `process_weights_after_loading`,
then copies the result into the tensors the kernels hold). Where the GPU has FP8 GEMMs (compute
capability 8.9+) vLLM quantizes the activations too, per token (W8A8); older GPUs run Marlin's
weight-only kernel (W8A16).

On CPU vLLM 0.32 has FP8 GEMMs only on AMX CPUs (Sapphire Rapids or newer:
kernels/linear/scaled_mm/cpu.py), and the CPU build registers `_C.static_scaled_fp8_quant` without a
kernel, so loading a model with `quantization="fp8_per_tensor"` fails on this machine. Here the engine
stays a 16-bit one and `with_fp8_rounding` rounds the weights on their way in — every reload and the
start-up load — exactly as vLLM's per-tensor scheme quantizes them: "FP8 weight rounding, simulated"
(icepop.rollout.precision.FP8_SIMULATED). It is weight-only (W8A16): the activations stay in
rollout.dtype, as on a GPU without FP8 GEMMs.

Which weights: those of vLLM's FP8 linear layers, by Hugging Face name — the attention and MLP
projections (`q/k/v/o_proj`, `gate/up/down_proj`), routed and shared experts included. Not the
embedding, the norms nor lm_head (vLLM quantizes `LinearBase` layers and fused experts only: Fp8Config
/ OnlineQuantizationConfig.get_quant_method), and not an MoE router: vLLM's Qwen3-MoE would quantize
its `mlp.gate` (a `GateLinear`), Qwen2-MoE's and Mixtral's not; icepop keeps every router in
rollout.dtype, on GPUs too (`FP8_IGNORE`), as FP8 checkpoints usually do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
"""448: the largest FP8 E4M3 value, and the divisor of vLLM's scale (quant_utils.get_fp8_min_max)."""

FP8_IGNORE = ["*.mlp.gate"]
"""vLLM layers left unquantized on GPUs (fnmatch patterns of OnlineQuantizationConfig's `ignore`): the
MoE routers, which the CPU simulation does not round either."""

LINEAR_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections whose `.weight` vLLM's FP8 linear layers and fused experts hold."""

FUSED = {"q_proj": ("qkv_proj", 3), "k_proj": ("qkv_proj", 3), "v_proj": ("qkv_proj", 3),
         "gate_proj": ("gate_up_proj", 2), "up_proj": ("gate_up_proj", 2)}  # fmt: skip
"""Projections vLLM loads into one fused layer (a model's `packed_modules_mapping`: Llama, Qwen2/3,
Mistral …; per expert, `w13` holds gate and up), which then shares one scale: (layer, its parts)."""


def fp8_engine_kwargs(quantization: str | None, on_cpu: bool) -> dict[str, Any]:
    """What vLLM's `LLM` takes for rollout.quantization: on GPUs the online per-tensor FP8 scheme
    (routers excluded, `FP8_IGNORE`); nothing on CPU, where the rounding is simulated instead."""
    if quantization is None or on_cpu:
        return {}
    if quantization != "fp8":
        raise ValueError(f"rollout.quantization={quantization!r} is not one of None, fp8")
    return {"quantization": "fp8_per_tensor", "quantization_config": {"ignore": list(FP8_IGNORE)}}


def fp8_layer(name: str) -> tuple[str, int] | None:
    """(vLLM layer, how many checkpoint tensors it fuses) of a weight that FP8 rounds, None for one it
    leaves alone: 'model.layers.0.self_attn.k_proj.weight' → ('model.layers.0.self_attn.qkv_proj', 3)."""
    module, _, leaf = name.rpartition(".")
    prefix, _, projection = module.rpartition(".")
    if leaf != "weight" or projection not in LINEAR_WEIGHTS:
        return None
    layer, parts = FUSED.get(projection, (projection, 1))
    return f"{prefix}.{layer}", parts


def fp8_round(weights: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The weights of one vLLM layer as its per-tensor FP8 holds them, dequantized to `dtype` (the
    engine's), mirroring Fp8PerTensorOnlineLinearMethod / Fp8PerTensorOnlineMoEMethod's
    process_weights_after_loading (vllm/model_executor/layers/quantization/online/fp8.py): the weights,
    first stored in the engine's dtype, share scale = amax / 448 in float32 (`weight_amax`, `_fp8_scale`)
    and are quantized as `ops.scaled_fp8_quant` with a static scale does, w × (1 / scale) clamped to
    ±448 and rounded to nearest even in float8_e4m3fn. The dequantized value q × scale is rounded to
    `dtype` once more (relative error ≤ 2^-9 in bfloat16 against the FP8 step's 2^-4, where vLLM applies
    the scale to its float32 accumulator instead). An all-zero layer stays zero."""
    stored = [w.to(dtype) for w in weights]
    amax = torch.stack([w.abs().max().float() for w in stored]).max()
    if not amax > 0:
        return [w.clone() for w in stored]
    scale = amax / torch.tensor(FP8_MAX, dtype=torch.float32, device=amax.device)
    inverse = scale.reciprocal()
    rounded = []
    for w in stored:
        q = (w.float() * inverse).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        rounded.append((q.float() * scale).to(dtype))
    return rounded


def with_fp8_rounding(
    tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a weight sync with every FP8 layer's weights rounded by `fp8_round` (the rest as
    they come). The parts of a fused layer (q, k, v; gate, up) wait for each other, since they share a
    scale; parts of a layer that never complete (a model that fuses them otherwise) go out at the end,
    sharing one scale. Like mismatch noise, the rounding goes in through the reload, so it reaches every
    weight, those vLLM's CPU kernels keep only in packed form included."""
    waiting: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors:
        layer = fp8_layer(name)
        if layer is None or tensor.dim() != 2 or not tensor.is_floating_point():
            yield name, tensor
            continue
        parts = waiting.setdefault(layer[0], [])
        parts.append((name, tensor))
        if len(parts) == layer[1]:
            del waiting[layer[0]]
            yield from _rounded(parts, dtype)
    for parts in waiting.values():
        yield from _rounded(parts, dtype)


def _rounded(parts: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    names = [name for name, _ in parts]
    yield from zip(names, fp8_round([tensor for _, tensor in parts], dtype), strict=True)
