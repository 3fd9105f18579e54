"""Writing a trainer's full weights for others to load: one safetensors file for an engine, or a Hugging
Face checkpoint folder. Framework-free (transformers' `save_pretrained` only): the trainer backend
passes its way of gathering sharded parameters, these functions collect and lay out the state dict.

Key design choice: transformers' own save path does the renaming (fused MoE experts → per-expert
tensors, the layout vLLM loads), and every file is written beside its destination and renamed into
place, so a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from icepop.trainer.inputs import buckets

ONE_FILE = 2**62  # max_shard_size for save_pretrained: never shard the exported file
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")  # not copied from model_path


def write_weights_file(module: Any, state: dict[str, Tensor], path: str) -> None:
    """One safetensors file at `path` with exactly the names and shapes `save_pretrained` writes."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # A scratch folder beside `path`: same file system, so the final rename is atomic.
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".export-") as folder:
        module.save_pretrained(folder, state_dict=state, max_shard_size=ONE_FILE)
        os.replace(os.path.join(folder, "model.safetensors"), path)


def write_checkpoint(module: Any, state: dict[str, Tensor], model_path: str, directory: str) -> None:
    """A Hugging Face folder: config and generation config, the tokenizer files of `model_path`, and
    safetensors weights; AutoModelFor* and vLLM load it directly."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    for source in Path(model_path).iterdir():  # tokenizer files; config is written by save_pretrained
        if source.is_file() and not source.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(source, target / source.name)
    module.save_pretrained(target, state_dict=state)


def engine_buckets(module: Any, buckets: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    """`buckets` of `module`'s state with the names and shapes `save_pretrained` writes (fused MoE experts
    split per expert: what vLLM loads); empty buckets are skipped."""
    from transformers.core_model_loading import revert_weight_conversion

    for bucket in buckets:
        if bucket:
            yield revert_weight_conversion(module, bucket)


def state_buckets(
    module: torch.nn.Module,
    gathered: Callable[[list[Tensor]], Any],
    receiver: bool,
    device: torch.device | str,
    bucket_bytes: int,
) -> Iterator[dict[str, Tensor]]:
    """Every parameter and persistent buffer of `module`, full-size, in buckets of about bucket_bytes,
    as copies on `device` for the receiver (empty dicts on the other ranks). `gathered(params)` is a
    context in which sharded parameters are whole (ZeRO-3: one all-gather per bucket, never the whole
    model; every rank must iterate). Tied weights appear once (named_parameters deduplicates them)."""
    for bucket in buckets(list(module.named_parameters()), bucket_bytes):
        with gathered([p for _, p in bucket]):
            copies = {n: p.detach().to(device, copy=True) for n, p in bucket} if receiver else {}
        yield copies
    if receiver:
        persistent = set(module.state_dict().keys())  # without the non-persistent (rotary) buffers
        yield {n: b.to(device, copy=True) for n, b in module.named_buffers() if n in persistent}
