"""The contract every PolicyTrainer implementation passes, checked from inside each of its ranks.

Call `check_trainer_backend_contract(trainer, rank, world_size, rl, sft, out_dir, weight_port)` on every
rank with the same full batches; each rank takes its contiguous share of rows, as the Ray trainer group
does. Meanwhile one more process runs `receive_broadcast(weight_port, out_dir)`: an engine's side of the
weight group, whose tensors must equal the exported file's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from icepop.algo import PolicyLossOptions
from icepop.trainer.base import PolicyTrainer
from icepop.types import RLBatch, SFTBatch

RL_KEYS = ("actor/loss", "actor/grad_norm", "actor/lr", "actor/entropy", "icepop/mask_frac")


def _share(batch, rank: int, world_size: int):  # type: ignore[no-untyped-def]
    rows = batch.input_ids.shape[0]
    part = slice(rows * rank // world_size, rows * (rank + 1) // world_size)
    return type(batch)(**{k: None if v is None else v[part] for k, v in vars(batch).items()})


def receive_broadcast(weight_port: int, out_dir: str) -> None:
    from icepop import comm

    group = comm.weight_group("127.0.0.1", weight_port, 1, 2, torch.device("cpu"))
    received = {name: t.clone() for name, t in comm.receive_tensors(group, torch.device("cpu"))}
    torch.save(received, Path(out_dir) / "broadcast.pt")


def check_trainer_backend_contract(
    trainer: PolicyTrainer,
    rank: int,
    world_size: int,
    rl: RLBatch,
    sft: SFTBatch,
    out_dir: str,
    weight_port: int,
) -> None:
    mine = _share(rl, rank, world_size)
    before = trainer.logprobs(mine.input_ids, mine.attention_mask, 1.0)
    assert before.shape == (mine.input_ids.shape[0], mine.input_ids.shape[1] - 1)
    valid = mine.attention_mask[:, 1:].bool()
    assert torch.isfinite(before[valid]).all() and (before[valid] <= 0).all()

    tokens, seqs = int(rl.response_mask.sum()), int((rl.response_mask.sum(-1) > 0).sum())
    metrics = trainer.train_rl(mine, PolicyLossOptions(), tokens, seqs)
    assert all(key in metrics for key in RL_KEYS), sorted(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics
    after = trainer.logprobs(mine.input_ids, mine.attention_mask, 1.0)
    assert not torch.equal(before, after), "train_rl did not change the weights"
    old = trainer.last_old_logprobs()  # ℓ_old the step trained against (on-policy: its own forward's ℓ)
    assert old.shape == before.shape and torch.isfinite(old[valid]).all() and (old[valid] <= 0).all()

    sft_metrics = trainer.train_sft(_share(sft, rank, world_size), int(sft.loss_mask.sum()))
    assert math.isfinite(sft_metrics["sft/loss"]) and sft_metrics["sft/loss"] > 0

    weights = Path(out_dir) / "weights.safetensors"
    trainer.export_weights(str(weights))  # collective: returns on every rank once the file is complete
    state = load_file(weights)
    assert state and all(torch.isfinite(t.float()).all() for t in state.values())
    # The same weights handed to an engine in this process (colocated), on every rank.
    handed = dict(trainer.weight_tensors())
    assert handed.keys() == state.keys() and all(torch.equal(handed[k].cpu(), state[k]) for k in state)
    # The same weights over the weight group: what `receive_broadcast` got must equal the file.
    trainer.join_weight_group("127.0.0.1", weight_port, 2)
    sent = trainer.broadcast_weights()
    assert (sent > 0) == (rank == 0)
    # A checkpoint rank 0 cannot write (its parent is a file) fails on every rank: none is left waiting.
    blocked = Path(out_dir) / "a-file"
    if rank == 0:
        blocked.write_text("")
    try:
        trainer.save(str(blocked / "checkpoint"))
    except (OSError, RuntimeError) as error:
        assert isinstance(error, OSError) == (rank == 0), error  # rank 0's own error; the others are told
    else:
        raise AssertionError("a checkpoint rank 0 could not write was reported as saved")
    trainer.save(str(Path(out_dir) / "checkpoint"))  # and the ranks go on together
    assert (Path(out_dir) / "checkpoint" / "config.json").is_file()
    assert load_file(Path(out_dir) / "checkpoint" / "model.safetensors").keys() == state.keys()
