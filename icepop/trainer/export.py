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
from icepop.trainer.lora import Adapters, hf_name

GATHER_BUCKET_BYTES = 256 * 2**20  # ZeRO-3 export: one all-gather per bucket, never the whole model
ADAPTER_FOLDER = "adapter"  # under LoRA, the sub-folder of a checkpoint holding the peft adapter
ONE_FILE = 2**62  # max_shard_size for save_pretrained: never shard the exported file
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".gguf", ".onnx", ".h5", ".ckpt")
"""Weight files of `model_path` in any format: never copied into a checkpoint, nor downloaded for one."""


def write_weights_file(module: Any, state: dict[str, Tensor], path: str) -> None:
    """One safetensors file at `path` with exactly the names and shapes `save_pretrained` writes."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # A scratch folder beside `path`: same file system, so the final rename is atomic.
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".export-") as folder:
        module.save_pretrained(folder, state_dict=state, max_shard_size=ONE_FILE)
        os.replace(os.path.join(folder, "model.safetensors"), path)


def model_files(model_path: str) -> Path:
    """The folder holding `model_path`'s files besides its weights (tokenizer, chat template, …): the
    folder itself, or for a hub id ("org/name") its snapshot in this node's Hugging Face cache — where
    the hub is reachable its missing top-level files are downloaded first (never weights), offline
    (HF_HUB_OFFLINE=1) it is what the cache holds."""
    if Path(model_path).is_dir():
        return Path(model_path)
    from huggingface_hub import snapshot_download

    ignored = ["*/*", *(f"*{suffix}" for suffix in WEIGHT_SUFFIXES)]  # top-level files, no weights
    return Path(snapshot_download(model_path, ignore_patterns=ignored))


def write_checkpoint(module: Any, state: dict[str, Tensor], model_path: str, directory: str) -> None:
    """A Hugging Face folder: config and generation config, every other top-level file of `model_path`
    (a folder or a hub id: `model_files`) but its weights — the tokenizer, its chat template — and
    safetensors weights; AutoModelFor* and vLLM load it directly."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    for source in model_files(model_path).iterdir():  # config is written by save_pretrained
        if source.is_file() and not source.name.endswith(WEIGHT_SUFFIXES):  # copy2 follows a cache's links
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
    adapters: Adapters | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Every parameter and persistent buffer of `module`, full-size, in buckets of about bucket_bytes,
    as copies on `device` for the receiver (empty dicts on the other ranks). `gathered(params)` is a
    context in which sharded parameters are whole (ZeRO-3: one all-gather per bucket, never the whole
    model; every rank must iterate). Tied weights appear once (named_parameters deduplicates them).
    With `adapters` (a peft model's LoRA layers) the state is the base model's: its names, each adapted
    weight merged with its adapter, whose tensors are gathered in the same bucket."""
    named = list(module.named_parameters()) if adapters is None else adapters.named_parameters()
    for bucket in buckets(named, bucket_bytes):
        params = [p for _, p in bucket]
        with gathered(params if adapters is None else params + adapters.companions(params)):
            if not receiver:
                copies = {}
            elif adapters is None:
                copies = {n: p.detach().to(device, copy=True) for n, p in bucket}
            else:
                copies = {n: adapters.merged(p, device) for n, p in bucket}
        yield copies
    if receiver:
        persistent = set(module.state_dict().keys())  # without the non-persistent (rotary) buffers
        name = (lambda n: n) if adapters is None else hf_name
        yield {name(n): b.to(device, copy=True) for n, b in module.named_buffers() if n in persistent}


class TrainerWeights:
    """What one trainer rank's model hands out — to engines, files and checkpoints — in the base model's
    layout: under LoRA (`adapters`) merged. `gathered(params)` makes sharded parameters whole (ZeRO-3);
    every method is then collective, and only the `receiver` rank gets (or writes) anything."""

    def __init__(
        self,
        module: torch.nn.Module,
        gathered: Callable[[list[Tensor]], Any],
        receiver: bool,
        adapters: Adapters | None = None,
    ) -> None:
        self.module, self.gathered, self.receiver, self.adapters = module, gathered, receiver, adapters
        # The Hugging Face model (under LoRA, the one inside peft's wrapper): its save_pretrained and
        # weight conversions give the layout an engine loads.
        self.hf_model: Any = module if adapters is None else module.get_base_model()

    def buckets(self, device: torch.device | str, every_rank: bool = False) -> Iterator[dict[str, Tensor]]:
        """`state_buckets` for the receiver (or every rank)."""
        receiver = every_rank or self.receiver
        return state_buckets(self.module, self.gathered, receiver, device, GATHER_BUCKET_BYTES, self.adapters)

    def engine_buckets(
        self, device: torch.device | str, every_rank: bool = False
    ) -> Iterator[dict[str, Tensor]]:
        """`buckets` with the names and shapes an engine loads (`engine_buckets`)."""
        return engine_buckets(self.hf_model, self.buckets(device, every_rank))

    def state(self) -> dict[str, Tensor]:
        """The whole state on the CPU for the receiver ({} elsewhere)."""
        return {name: t for bucket in self.buckets("cpu") for name, t in bucket.items()}

    def write_file(self, path: str) -> None:
        """`write_weights_file` of the whole state (the receiver writes)."""
        state = self.state()
        if self.receiver:
            write_weights_file(self.hf_model, state, path)

    def write_checkpoint(self, model_path: str, directory: str) -> Exception | None:
        """`write_checkpoint` of the whole state; under LoRA also the adapter alone, in peft's format, in
        its `adapter/` sub-folder (`PeftModel.from_pretrained(base, directory + "/adapter")`). Collective:
        the receiver's failure to write is returned, not raised, so that every rank still finishes the
        gathers and the caller can tell them all (`DeepSpeedTrainer.save`)."""
        state = self.state()
        failure = None
        try:
            if self.receiver:
                write_checkpoint(self.hf_model, state, model_path, directory)
        except Exception as error:  # the disk's or the model folder's: rank 0 alone sees it
            failure = error
        if self.adapters is not None:
            with self.gathered(self.adapters.adapter_parameters):
                if self.receiver and failure is None:
                    try:
                        self.module.save_pretrained(os.path.join(directory, ADAPTER_FOLDER))
                    except Exception as error:
                        failure = error
        return failure
