"""LoRA in the trainer: peft adapters on a Hugging Face model, and the merged weights an engine loads.

Key design choice: the engine never sees an adapter. Every export (weight sync, checkpoint) writes the
base model's own names with W + ΔW, where ΔW is peft's `get_delta_weight` — so a merged tensor equals,
bit for bit, what `merge_and_unload` gives — computed per bucket of base weights beside the ZeRO-3
gather of that bucket, never for the whole model at once. The base weights themselves are never
written to: they stay bit-identical to the checkpoint they came from. (Why not vLLM's own LoRA: the
bench/lora_sync.py numbers in docs/measurements.md.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

ADAPTER = "default"  # peft's name of the one adapter
PEFT_PREFIX = "base_model.model."


def expert_parameters(model: torch.nn.Module) -> list[str]:
    """The fused expert weights of a MoE model (3-d parameters, experts × out × in), as peft's
    target_parameters: their names below the decoder layer, e.g. ["mlp.experts.gate_up_proj", ...]."""
    names = {
        name.split(".layers.", 1)[-1].split(".", 1)[-1]
        for name, param in model.named_parameters()
        if param.dim() == 3 or len(getattr(param, "ds_shape", ())) == 3
    }
    return sorted(names)


def decoder_linears(model: torch.nn.Module) -> list[str]:
    """The default target_modules: the names of the decoder layers' linear layers (attention and MLP
    projections) — not lm_head or a score head, and not a MoE router (a `gate` or `router` beside an
    `experts` module), so LoRA never moves which experts a token goes to."""
    modules = dict(model.named_modules())
    routers = {
        name for name in modules if name.rpartition(".")[2] in ("gate", "router")
        and f"{name.rpartition('.')[0]}.experts" in modules
    }  # fmt: skip
    return sorted(
        {
            name.rpartition(".")[2]
            for name, module in modules.items()
            if isinstance(module, torch.nn.Linear) and ".layers." in name and name not in routers
        }
    )


def add_adapters(
    model: Any,
    kind: str,
    *,
    rank: int,
    alpha: float = 0.0,
    dropout: float = 0.0,
    target_modules: Iterable[str] = (),
    experts: bool = True,
) -> Any:
    """`model` wrapped by peft with LoRA adapters (trainer.lora; alpha 0 means 2 × rank): every base
    weight frozen, the adapters — and a reward model's score head (kind "reward") — trainable."""
    from peft import LoraConfig, get_peft_model

    parameters = expert_parameters(model) if experts else []
    if parameters and dropout:
        raise ValueError(
            f"trainer.lora.dropout={dropout} with a MoE model's experts adapted: peft's LoRA on fused expert "
            "weights has no dropout; set trainer.lora.dropout=0 or trainer.lora.experts=false"
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        lora_dropout=dropout,
        # Explicit names, never "all-linear": peft would map a MoE model's old (transformers 4) names onto
        # its fused experts and router behind our back.
        target_modules=list(target_modules) or decoder_linears(model),
        target_parameters=parameters or None,
        # SEQ_CLS: the new score head trains whole (peft's modules_to_save) and is not adapted.
        task_type="SEQ_CLS" if kind == "reward" else "CAUSAL_LM",
    )
    return get_peft_model(model, config)


def check_same_adapters(saved: dict[str, Any] | None, current: dict[str, Any] | None, directory: str) -> None:
    """A trainer state resumes only into the same adapters (or none): a full fine-tuning state has no
    adapters to load, and an adapter state would leave a full fine-tuning run at the base weights."""
    if saved != current:
        raise ValueError(
            f"{directory} was saved with trainer.lora={saved or 'off'}, this run has trainer.lora="
            f"{current or 'off'}: resume with the settings it was saved with"
        )


MMAP_THRESHOLD_BYTES = 4 * 2**20
"""glibc's M_MMAP_THRESHOLD for a CPU rank training adapters (`fewer_heap_holes`)."""


def fewer_heap_holes() -> None:
    """On a CPU rank with adapters, allocate blocks of ≥ 4 MiB with mmap, returned to the system when
    freed. peft's per-layer temporaries (B·A·x, then its sum with W·x) otherwise leave holes in glibc's
    heap between the activations kept for backward, which count as resident memory: on SmolLM2-135M one
    rank's peak fell from 8.5 to 5.9 GB (8.2 → 7.5 GB without LoRA), the step 8% slower
    (docs/measurements.md). Nothing to do outside glibc (the call is skipped)."""
    mallopt(-3, MMAP_THRESHOLD_BYTES)  # -3: M_MMAP_THRESHOLD (malloc.h)


def keep_freed_memory() -> None:
    """On a CPU rank training every weight, take large blocks from glibc's heap and keep what a step
    frees for the next one, instead of handing it back to the kernel and faulting it in again page by
    page at every step (SmolLM2-135M W1: the update 12.4-13.9 s → 8.9-10.1 s in a run, where
    generation, sync and probe come between updates). Skipped outside glibc."""
    mallopt(-3, 2**31 - 1)  # M_MMAP_THRESHOLD: blocks up to 2 GiB (mallopt's largest) from the heap
    mallopt(-1, -1)  # M_TRIM_THRESHOLD -1: never trim the heap's top (mallopt(3))


def mallopt(option: int, value: int) -> None:
    """glibc's mallopt(option, value) for this process (malloc.h); nothing outside glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(option, value)


def hf_name(peft_name: str) -> str:
    """The base model's name of a peft model's parameter or buffer: no `base_model.model.` prefix, no
    `base_layer` wrappers, and a trained copy (`modules_to_save.default`) under the original's name."""
    name = peft_name.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default.", ".")
    return ".".join(part for part in name.split(".") if part != "base_layer")


class Adapters:
    """The LoRA layers of a peft model, seen as the base model's weights: which tensors an export
    must gather together, and the merged value of each base weight."""

    def __init__(self, model: torch.nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        self.layers: dict[int, Any] = {}  # id(base weight) → the LoRA layer adapting it
        adapter_ids: set[int] = set()
        for module in model.modules():
            if isinstance(module, LoraLayer):
                self.layers[id(_adapted(module))] = module
                adapter_ids.update(id(p) for p in _adapter_parameters(module))
        self.adapter_parameters = [p for p in model.parameters() if id(p) in adapter_ids]
        self.named = [
            (hf_name(name), param)
            for name, param in model.named_parameters()
            if id(param) not in adapter_ids and ".original_module." not in name
        ]

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(base model name, tensor) of every weight an engine loads; merged values via `merged`."""
        return self.named

    def companions(self, params: Iterable[Tensor]) -> list[Tensor]:
        """The adapter parameters that `merged` reads for these base weights (to gather with them)."""
        return [p for q in params if id(q) in self.layers for p in _adapter_parameters(self.layers[id(q)])]

    def merged(self, param: Tensor, device: torch.device | str) -> Tensor:
        """A copy of `param` on `device`, plus its adapter's ΔW when one adapts it (peft's merge)."""
        copy = param.detach().to(device, copy=True)
        layer = self.layers.get(id(param))
        if layer is not None:
            copy += layer.get_delta_weight(ADAPTER).to(device)
        return copy


def _adapted(layer: Any) -> Tensor:
    """The base tensor a LoRA layer adapts: a fused-expert parameter (ParamWrapper) or a layer's weight."""
    return layer.get_param() if hasattr(layer, "parameter_name") else layer.get_base_layer().weight


def _adapter_parameters(layer: Any) -> list[Tensor]:
    """The layer's own adapter tensors (not those of a LoRA layer it wraps)."""
    return [p for name in layer.adapter_layer_names for p in getattr(layer, name).parameters()]
