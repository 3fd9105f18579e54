"""DeepSpeed ZeRO trainer backend: one data-parallel rank of the policy trainer; the only module that
imports deepspeed (lazily, so importing this one stays cheap).

Key design choice: the caller owns the gradient-accumulation boundary. One `train_*` call is one
optimizer step however many micro-batches it holds: the boundary is set by hand on the last one,
backward never divides by gradient_accumulation_steps, and each micro-batch loss — already divided
by the *global* token or sequence count (docs/algorithm.md §5) — is multiplied by world_size to
undo DeepSpeed's mean over ranks, so the gradient is Σ_ranks Σ_micro ∇loss_micro = ∇L_full exactly.

Every public method is collective (ZeRO-2 reduces in every backward, ZeRO-3 gathers in every
forward): ranks pad to the same number of micro-batches with dummies whose loss and gradient are 0.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from icepop import comm
from icepop.algo import PolicyLossOptions, bradley_terry_loss, pg_loss
from icepop.trainer.export import TrainerWeights
from icepop.trainer.inputs import (
    RLStepRecord,
    apply_step,
    check_args,
    check_batch,
    check_pairs,
    clips_itself,
    decay_groups,
    deepspeed_config,
    first_label,
    lr_factor,
    place_rows,
    rows_of,
    skipped_step,
)
from icepop.trainer.lora import Adapters, check_same_adapters, fewer_heap_holes, keep_freed_memory
from icepop.trainer.models import load_model
from icepop.trainer.packing import micro_batch_items, refuse_unpackable, row_scores, token_logprobs
from icepop.types import PreferenceBatch, RLBatch, SFTBatch

STATE_TAG = "trainer"  # the DeepSpeed checkpoint tag (sub-folder) of `save_state`


class DeepSpeedTrainer:
    """One rank of a ZeRO-1/2/3 data-parallel trainer (see the module docstring).

    Every argument is required: a run's come from its config (icepop.trainer.settings.trainer_settings).
    `temperature` is the rollout's sampling temperature, applied by `train_rl` (docs/algorithm.md §1);
    `ds_config_overrides` is merged last into the generated DeepSpeed config (e.g. ZeRO-3 bucket sizes).
    `model_kind` "reward" builds a sequence-classification model with one output (a reward model,
    `train_rm`/`scores`) on top of the checkpoint instead of the causal LM policy. `micro_batch_tokens`
    > 0 forms micro-batches by a token budget instead of `micro_batch_size` rows
    (inputs.micro_batch_rows); `packing` concatenates a micro-batch's rows into one padding-free sequence
    (trainer.packing, icepop.trainer.packing). `cpu_threads`: torch threads of a CPU rank (None keeps the
    process's). `lora`: the keyword arguments of `lora.add_adapters` (trainer.lora) to train LoRA
    adapters instead of every weight.
    """

    def __init__(
        self,
        *,
        model_path: str,
        model_kind: str,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        zero_stage: int,
        offload: bool,
        dtype: str,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        warmup_steps: int,
        lr_schedule: str,
        total_steps: int | None,
        grad_clip: float,
        micro_batch_size: int,
        micro_batch_tokens: int,
        packing: bool,
        temperature: float,
        gradient_checkpointing: bool,
        seed: int,
        cpu_threads: int | None,
        ds_config_overrides: dict[str, Any] | None,
        lora: dict[str, Any] | None,
    ) -> None:
        """Join the process group and build the ZeRO engine (the arguments: the class docstring)."""
        check_args(zero_stage, dtype, micro_batch_size, lr_schedule, total_steps, model_kind)
        self.model_kind, self.model_path = model_kind, model_path
        self.rank, self.world_size = rank, world_size
        self.zero_stage, self.micro_batch_size, self.temperature = zero_stage, micro_batch_size, temperature
        self.micro_batch_tokens, self.packing, self.lora = micro_batch_tokens, packing, lora
        self._own_clip = grad_clip if clips_itself(zero_stage, dtype) else None  # inputs.apply_step
        torch.manual_seed(seed)
        self.device = self._init_distributed(master_addr, master_port)
        if self.device.type == "cpu" and cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        if self.device.type == "cpu":
            fewer_heap_holes() if lora else keep_freed_memory()
        self._weight_group: dist.ProcessGroup | None = None  # rank 0 only, after join_weight_group
        self._last_old_logprobs: Tensor | None = None
        config = deepspeed_config(
            micro_batch_size, grad_clip, zero_stage, dtype, offload, (lr, betas, eps), ds_config_overrides
        )
        zero3_config = config if zero_stage == 3 else None
        model = load_model(model_path, model_kind, dtype, zero3_config, gradient_checkpointing, lora)
        if packing:
            refuse_unpackable(model)
        self.adapters = Adapters(model) if lora else None
        self.engine = self._build_engine(model, config, weight_decay, warmup_steps, lr_schedule, total_steps)
        self.weights = TrainerWeights(self.engine.module, self._gathered, self.rank == 0, self.adapters)

    def _init_distributed(self, addr: str, port: int) -> torch.device:
        cuda = torch.cuda.is_available()
        local_rank = self.rank % max(1, torch.cuda.device_count())  # Ray shows a rank its own GPU: 0
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(local_rank),
            MASTER_ADDR=addr,
            MASTER_PORT=str(port),
        )
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, at deepspeed's first import
        importlib.import_module("torch._dynamo")  # before deepspeed: ZeRO-3 + transformers 5 (ENVIRONMENT.md)
        import deepspeed

        if cuda:
            torch.cuda.set_device(local_rank)
        else:
            # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op (≈ 70 s,
            # needs g++) that only its inference path uses; marking it incompatible skips that.
            importlib.import_module("deepspeed.ops").__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "nccl" if cuda else "gloo"
        # Our own store, listening on `addr` only; DeepSpeed then adopts the initialised group.
        comm.init_world(addr, port, self.rank, self.world_size, backend)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        return torch.device("cuda", local_rank) if cuda else torch.device("cpu")

    def _build_engine(
        self, model: Any, config: dict[str, Any], weight_decay: float, warmup: int, schedule: str, total: Any
    ) -> Any:
        import deepspeed

        groups = decay_groups(model, weight_decay)
        factor = functools.partial(lr_factor, warmup_steps=warmup, schedule=schedule, total_steps=total)
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            config=config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
        )
        return engine

    def _all_reduce(self, values: list[float], op: str) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.tolist()

    def _micro_batches(self, lengths: Tensor) -> list[Tensor | None]:
        """This rank's micro-batches (indices into `lengths`: [rows] token lengths, or [2, pairs]), padded
        with None (dummy) to the largest count of any rank: all run the same forwards and backwards."""
        sizes = (self.micro_batch_size, self.micro_batch_tokens, self.packing)
        groups: list[Tensor | None] = [*micro_batch_items(lengths, *sizes)]
        count = int(self._all_reduce([len(groups)], "max")[0])
        return groups + [None] * (count - len(groups))

    def _forward(
        self, input_ids: Tensor, attention_mask: Tensor, temperature: float, inplace_backward: bool,
        from_label: int = 0,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(ℓ, entropy) of the labels input_ids[:, 1:], [b, L-1], padded or packed (token_logprobs)."""
        return token_logprobs(
            self.engine, input_ids, attention_mask, temperature, inplace_backward, self.packing, from_label
        )

    def _backward(self, loss: Tensor, is_last: bool) -> None:
        # × world_size undoes DeepSpeed's mean over ranks (the loss already carries the global
        # denominator); scale_wrt_gas=False keeps it from dividing by gradient_accumulation_steps.
        # A non-finite loss makes the *whole* gradient NaN, so that DeepSpeed's overflow check (or
        # inputs.apply_step's; every rank agrees) skips the step instead of applying a partly-NaN update.
        poison = torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)
        self.engine.set_gradient_accumulation_boundary(is_last)
        self.engine.backward(loss * (self.world_size * poison), scale_wrt_gas=False)

    def _step(self, local_sums: dict[str, float], prefix: str) -> dict[str, float]:
        """Apply the accumulated gradient (or skip it: inputs.skipped_step says why) and return the step
        metrics, local_sums ("loss", other additive parts) summed over the ranks: full-batch values."""
        lr = float(self.engine.get_lr()[0])
        scale = float(getattr(self.engine.optimizer, "cur_scale", 1.0))  # the backward's; 1 but in float16
        norm, skipped = apply_step(self.engine, self._own_clip)  # norm before clipping; inf when skipped
        totals = self._all_reduce(list(local_sums.values()), "sum")  # each loss carries the global count
        values = dict(zip(local_sums, totals, strict=True))
        values |= {"grad_norm": norm, "lr": lr, "loss_scale": scale}
        values |= skipped_step(skipped, self.engine.fp16_enabled(), values["loss"])
        return {f"{prefix}/{key}": value for key, value in values.items()}

    @torch.no_grad()
    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, temperature: float) -> Tensor:
        """ℓ of every label position, [B, L-1] float32 on the CPU (meaningless past a row's end: 0 past
        its micro-batch's longest row), no gradient; collective."""
        batch = SFTBatch(input_ids, attention_mask, torch.zeros_like(input_ids[:, 1:], dtype=torch.bool))
        check_batch(batch)
        self.engine.eval()
        parts = []
        for rows in self._micro_batches(attention_mask.sum(-1)):
            mb = rows_of(batch, rows, self.device)
            logprobs = self._forward(mb["input_ids"], mb["attention_mask"], temperature, False)[0]
            if rows is not None:
                parts.append((rows, logprobs))
        self.engine.train()
        return place_rows(parts, *batch.loss_mask.shape)

    def train_rl(
        self, batch: RLBatch, options: PolicyLossOptions, global_token_count: int, global_seq_count: int
    ) -> dict[str, float]:
        """One optimizer step of `pg_loss` on this rank's shard; collective. The counts are those of
        the whole batch over all ranks. old_logprobs=None means on-policy (θ_old = θ): ℓ_old is the
        detached current ℓ. Metrics: actor/loss is the full-batch loss and actor/pg_loss its
        policy-gradient part (without the KL term), the same on every rank; pg_loss's other metrics are
        means over this rank's micro-batches; actor/entropy (and
        actor/entropy_masked) is the token mean over this rank's response (masked) tokens at the
        sampling temperature."""
        check_batch(batch, options)
        self.engine.train()
        slices = self._micro_batches(batch.attention_mask.sum(-1))
        record = RLStepRecord()
        for i, rows in enumerate(slices):
            mb = rows_of(batch, rows, self.device)
            first = first_label(mb["response_mask"])  # the prompts' positions before it need no logits
            logprobs, entropy = self._forward(
                mb["input_ids"], mb["attention_mask"], self.temperature, True, first
            )
            old = logprobs.detach() if mb["old_logprobs"] is None else mb["old_logprobs"]
            loss, metrics, keep = pg_loss(
                logprobs,
                old,
                mb["rollout_logprobs"],
                mb["advantages"],
                mb["response_mask"],
                options,
                global_token_count=global_token_count,
                global_seq_count=global_seq_count,
                ref_logprobs=mb["ref_logprobs"],
            )
            self._backward(loss, is_last=i == len(slices) - 1)
            record.add(loss, metrics, entropy, keep, mb["response_mask"], old, rows)
        self._last_old_logprobs = place_rows(record.old_logprobs, *batch.response_mask.shape)
        return {**record.metrics(len(slices)), **self._step(record.additive, "actor")}

    def last_old_logprobs(self) -> Tensor:
        """ℓ_old of the last `train_rl` call's rows, [rows, L-1] float32 on the CPU: its batch's, or
        on-policy the training forward's detached ℓ (a `logprobs` pass's at the replies' positions)."""
        if self._last_old_logprobs is None:
            raise RuntimeError("last_old_logprobs before any train_rl")
        return self._last_old_logprobs

    def train_sft(self, batch: SFTBatch, global_token_count: int) -> dict[str, float]:
        """One optimizer step of Σ −ℓ·loss_mask / global_token_count (temperature 1); collective.
        sft/loss is the full-batch token-mean cross-entropy, the same on every rank."""
        check_batch(batch)
        self.engine.train()
        slices = self._micro_batches(batch.attention_mask.sum(-1))
        local_loss = 0.0
        for i, rows in enumerate(slices):
            mb = rows_of(batch, rows, self.device)
            logprobs, _ = self._forward(mb["input_ids"], mb["attention_mask"], 1.0, inplace_backward=True)
            # Select, don't multiply: padded positions may hold anything, 0·NaN = NaN.
            loss = torch.where(mb["loss_mask"], -logprobs, 0.0).sum() / max(1, global_token_count)
            self._backward(loss, is_last=i == len(slices) - 1)
            local_loss += float(loss.detach())
        return {**self._step({"loss": local_loss}, "sft"), "sft/micro_batches": float(len(slices))}

    @torch.no_grad()
    def scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Reward-model scores [B] (float32, CPU) at each row's last token; collective (reward model)."""
        self.engine.eval()
        scores = torch.zeros(input_ids.shape[0])
        for rows in self._micro_batches(attention_mask.sum(-1)):
            part = self._score_rows(input_ids, attention_mask, rows)
            if rows is not None:
                scores[rows] = part.float().cpu()
        self.engine.train()
        return scores

    def train_rm(self, batch: PreferenceBatch, global_pair_count: int) -> dict[str, float]:
        """One optimizer step of the Bradley–Terry loss over this rank's pairs (micro_batch_size pairs,
        or pairs within the token budget, per forward, chosen and rejected together); collective.
        rm/loss and rm/accuracy are over the whole batch of all ranks."""
        pairs = check_pairs(batch)
        self.engine.train()
        slices = self._micro_batches(batch.attention_mask.sum(-1).view(2, pairs))
        local_loss, correct = 0.0, 0.0
        for i, rows in enumerate(slices):
            both = None if rows is None else torch.cat([rows, rows + pairs])  # chosen, rejected
            scores = self._score_rows(batch.input_ids, batch.attention_mask, both)
            chosen, rejected = scores.view(2, -1)
            loss, metrics = bradley_terry_loss(chosen, rejected, global_pair_count)
            loss = loss if rows is not None else loss * 0.0  # the padding micro-batch: no gradient
            self._backward(loss, is_last=i == len(slices) - 1)
            local_loss += float(loss.detach())
            correct += float(metrics["accuracy"]) * chosen.numel() if rows is not None else 0.0
        accuracy = self._all_reduce([correct], "sum")[0] / global_pair_count
        return {**self._step({"loss": local_loss}, "rm"), "rm/accuracy": accuracy}

    def _score_rows(self, input_ids: Tensor, attention_mask: Tensor, rows: Any) -> Tensor:
        """Scores of the selected rows (None: the padding micro-batch's dummies; packing.row_scores)."""
        return row_scores(self.engine, input_ids, attention_mask, rows, self.device, self.packing)

    def _gathered(self, params: list[Tensor]) -> Any:
        """A context in which `params` are whole on every rank (ZeRO-3 all-gathers them; ZeRO-1/2 keep
        full, updated parameters on every rank); collective under ZeRO-3."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def weight_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """The full weights as (name, tensor) pairs, named as for `broadcast_weights`, on every rank: for
        an engine in this process (cluster.placement=colocated); collective under ZeRO-3."""
        for bucket in self.weights.engine_buckets(self.device, every_rank=True):
            yield from bucket.items()

    def export_weights(self, path: str) -> None:
        """One safetensors file in save_pretrained's layout (MoE experts per expert, what vLLM loads),
        renamed into place when complete; collective, rank 0 writes."""
        self.weights.write_file(path)
        dist.barrier()  # when export_weights returns on any rank, the file is complete

    def join_weight_group(self, addr: str, port: int, world_size: int) -> None:
        """Rank 0 joins the weight group as its rank 0 (the sender), beside the engines; the other
        ranks have nothing to do. Collective with the engines' `join_weight_group`."""
        if self.rank == 0:
            self._weight_group = comm.weight_group(addr, port, 0, world_size, self.device)

    def broadcast_weights(self) -> int:
        """Stream the full weights, with the names and shapes `save_pretrained` writes, to every engine
        of the weight group; collective over the trainer ranks (ZeRO-3 gathers) and with the engines'
        `receive_weights`. Returns the bytes sent (0 on ranks other than 0)."""
        if self.rank != 0:
            for _ in self.weights.buckets(self.device):  # take part in the ZeRO-3 gathers
                pass
            return 0
        if self._weight_group is None:
            raise RuntimeError("broadcast_weights before join_weight_group: there is no engine to send to")
        return comm.send_tensors(self._weight_group, self.weights.engine_buckets(self.device), self.device)

    def save(self, directory: str) -> None:
        """A Hugging Face checkpoint folder (icepop.trainer.export.TrainerWeights.write_checkpoint: under
        LoRA merged, with the peft adapter in its `adapter/`); collective, rank 0 writes. Where rank 0
        cannot, every rank raises (the others would otherwise wait for it at the next collective)."""
        failure = self.weights.write_checkpoint(self.model_path, directory)
        if self._all_reduce([float(failure is not None)], "max")[0]:
            raise failure or RuntimeError(f"trainer rank 0 could not write the checkpoint {directory}")

    def save_state(self, directory: str) -> None:
        """What exact resumption needs — weights, optimizer and scheduler state — as DeepSpeed's own
        checkpoint (every rank writes its ZeRO shard: the folder must be on storage all ranks share).
        Under LoRA the frozen base weights are left out: they are the model's own."""
        self.engine.save_checkpoint(
            directory, tag=STATE_TAG, save_latest=False, client_state={"lora": self.lora},
            exclude_frozen_parameters=self.adapters is not None,
        )  # fmt: skip

    def load_state(self, directory: str) -> None:
        """Restore what `save_state` wrote; collective."""
        path, saved = self.engine.load_checkpoint(
            directory, tag=STATE_TAG, load_lr_scheduler_states=True, load_module_strict=self.adapters is None
        )
        if path is None:
            raise FileNotFoundError(f"{directory} holds no trainer state (tag {STATE_TAG!r})")
        check_same_adapters(saved.get("lora"), self.lora, directory)

    def close(self) -> None:
        """Free the engine and leave the process group (also avoids a rare SIGABRT at exit)."""
        self._weight_group = None
        if self.engine is not None and dist.is_initialized():  # a colocated engine's close ends the group
            self.engine.destroy()
        self.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if dist.is_initialized():
            dist.destroy_process_group()
        # DeepSpeed caches its clone of the world group; a later trainer in this process would use it.
        importlib.import_module("deepspeed.utils.groups")._WORLD_GROUP = None
