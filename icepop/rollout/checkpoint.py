"""The model's checkpoint as the engine sees it: the safetensors files vLLM loads at start-up, their
tensor names (what a weight sync must cover) and tensors, and whether the checkpoint is quantized."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def checkpoint_folder(model_path: str) -> Path | None:
    """A local folder as it is, or a hub id's snapshot in this node's Hugging Face cache (where vLLM has
    just loaded it from); None if it is not there."""
    folder = Path(model_path)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        patterns = ["*.safetensors", "config.json"]
        return Path(snapshot_download(model_path, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def checkpoint_files(model_path: str) -> list[Path]:
    """The model's safetensors files, sorted (none if the checkpoint is not on this node)."""
    folder = checkpoint_folder(model_path)
    return sorted(folder.glob("*.safetensors")) if folder is not None else []


def checkpoint_names(model_path: str) -> frozenset[str]:
    """Tensor names in the model's safetensors files (empty if they are not on this node)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in checkpoint_files(model_path):
        with safe_open(file, framework="pt") as f:
            names.update(f.keys())
    return frozenset(names)


def checkpoint_tensors(model_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the model's safetensors files, one tensor at a time."""
    from safetensors import safe_open

    for file in checkpoint_files(model_path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def checkpoint_quantization(model_path: str) -> str | None:
    """The quant_method of the checkpoint's config.json quantization_config ("fp8", "awq", …), or None
    for a full-precision checkpoint (or one not on this node)."""
    folder = checkpoint_folder(model_path)
    config = folder / "config.json" if folder is not None else None
    if config is None or not config.is_file():
        return None
    quantization = json.loads(config.read_text()).get("quantization_config")
    if not quantization:
        return None
    return str(quantization.get("quant_method", "unknown")) if isinstance(quantization, dict) else "unknown"


def check_full_precision(quantization: str | None, model_path: str) -> None:
    """rollout.quantization re-quantizes the trainer's pushes: the checkpoint must be full precision."""
    if quantization is not None and (quantized := checkpoint_quantization(model_path)) is not None:
        raise ValueError(
            f"rollout.quantization={quantization} quantizes the trainer's full-precision weights at "
            f"each sync, but {model_path} is {quantized}-quantized: give a full-precision checkpoint"
        )
