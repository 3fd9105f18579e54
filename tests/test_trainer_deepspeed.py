"""DeepSpeedTrainer on 2 real gloo ranks (spawned processes), against a single-process plain-torch
reference: exact gradients under micro-batching and data parallelism, log-probs, weight export in
save_pretrained's layout (MoE experts per expert), checkpoints, non-finite steps, and learning.

One spawned run of two ranks is shared by all tests (a module fixture): ZeRO-2 on the dense model,
then, in the same processes (exercising close() and a new process group), ZeRO-3, ZeRO-1 (micro-batches
by a token budget) and ZeRO-2 with bf16 + optimizer offload + gradient checkpointing on the MoE model.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from backend_args import trainer_args
from dist_helpers import free_port, run_ranks
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from icepop.algo import PolicyLossOptions, pg_loss
from icepop.models.tiny import build_tiny_model, build_tokenizer
from icepop.trainer.inputs import micro_batch_rows
from icepop.types import RLBatch, SFTBatch

LR, CLIP, WARMUP, MICRO, TEMPERATURE = 1e-3, 1.0, 2, 2, 0.7
# Adam's first update is g/(|g| + eps): for gradient elements near eps = 1e-8 it turns fp32
# summation-order noise (≈1e-10) into 1e-5 parameter differences, and it is blind to the gradient's
# scale. eps = 1e-3 makes small elements move linearly in g, so a wrong loss scale shows.
EPS = 1e-3
PROMPT_LEN, VOCAB = 3, len(build_tokenizer())
PROBE_ROWS = (slice(0, 3), slice(3, 4))  # uneven shards: 2 micro-batches on rank 0, 1 (+ dummy) on rank 1
TIMEOUT_S = 240


def rl_batch(seed: int, rows: int, length: int = 12, with_old: bool = False) -> RLBatch:
    """Right-padded random sequences; ℓ_inf ≈ ℓ ± 1 nat so IcePop masks some tokens (k ∉ [0.5, 5])."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length - 5, length + 1, (rows,), generator=g)
    valid = torch.arange(length) < lengths[:, None]
    input_ids = torch.where(valid, torch.randint(3, VOCAB, (rows, length), generator=g), 0)
    response_mask = (torch.arange(1, length) >= PROMPT_LEN) & valid[:, 1:]  # label j is token j+1
    shape = (rows, length - 1)
    near_model = lambda scale: -5.9 + scale * torch.randn(shape, generator=g)  # noqa: E731  ln 375 ≈ 5.9
    advantages = torch.randn(rows, 1, generator=g).expand(shape).clone()
    old, ref = (near_model(0.2), near_model(0.2)) if with_old else (None, None)
    return RLBatch(input_ids, valid.long(), response_mask, near_model(1.0), advantages, old, ref)


def sft_batch(seed: int, rows: int) -> SFTBatch:
    batch = rl_batch(seed, rows)
    return SFTBatch(batch.input_ids, batch.attention_mask, batch.response_mask)


def shard(batch: Any, rows: slice) -> Any:
    fields = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    return type(batch)(**fields)


def counts(mask: torch.Tensor) -> tuple[int, int]:
    return int(mask.sum()), int((mask.sum(-1) > 0).sum())


SEQ_MEAN_WITH_KL = PolicyLossOptions(agg="seq-mean-token-mean", kl_coef=0.1)


def exact_steps() -> list[tuple[str, Any, PolicyLossOptions | None, tuple[slice, slice]]]:
    """(kind, full batch, options, rows of rank 0 and rank 1), run in order by trainer and reference."""
    return [
        # The plain case: 2 ranks × 2 micro-batches of 2, on-policy (old_logprobs None), token-mean.
        ("rl", rl_batch(1, 8), PolicyLossOptions(), (slice(0, 4), slice(4, 8))),
        # Uneven shards (3 vs 1 micro-batches: rank 1 runs 2 dummies), seq-mean, KL to a reference.
        ("rl", rl_batch(2, 7, with_old=True), SEQ_MEAN_WITH_KL, (slice(0, 5), slice(5, 7))),
        ("sft", sft_batch(3, 5), None, (slice(0, 4), slice(4, 5))),
    ]


def run_step(trainer: Any, kind: str, batch: Any, options: Any, rows: slice) -> dict[str, float]:
    if kind == "rl":
        return trainer.train_rl(shard(batch, rows), options, *counts(batch.response_mask))
    return trainer.train_sft(shard(batch, rows), counts(batch.loss_mask)[0])


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


SPAWNS_RANKS = pytest.mark.slow  # DeepSpeed on 2 gloo ranks in spawned processes

# ---- the spawned run ------------------------------------------------------------------------


TRAINER_ARGS: dict[str, Any] = {
    "lr": LR, "warmup_steps": WARMUP, "grad_clip": CLIP, "micro_batch_size": MICRO,
    "temperature": TEMPERATURE, "eps": EPS,
}  # fmt: skip


def nan_step(trainer: Any, rank: int, before: dict[str, torch.Tensor]) -> tuple[dict[str, float], float]:
    """A NaN advantage on a valid token of rank 1 only (every rank must skip the step): its metrics, and
    the largest change of a parameter from `before`."""
    bad = rl_batch(5, 4)
    last = int(bad.attention_mask[3].sum()) - 2  # row 3's last label position
    bad.advantages[3, last] = float("nan")
    bad.response_mask[3, last] = True
    metrics = trainer.train_rl(shard(bad, PROBE_ROWS[rank]), PolicyLossOptions(correction="none"), 10, 4)
    change = max((p - before[n]).abs().max().item() for n, p in params(trainer.engine.module).items())
    return metrics, change


def _dense_part(rank: int, world_size: int, port: int, model_dir: str, out: str) -> None:
    from icepop.trainer.deepspeed import DeepSpeedTrainer

    trainer = DeepSpeedTrainer(
        **trainer_args(
            model_dir, rank=rank, world_size=world_size, master_port=port, zero_stage=2, **TRAINER_ARGS
        )
    )
    res: dict[str, Any] = {}
    probe = rl_batch(0, 4)
    rows = PROBE_ROWS[rank]
    res["logprobs"] = trainer.logprobs(probe.input_ids[rows], probe.attention_mask[rows], TEMPERATURE)
    res["metrics"], res["step_s"] = [], []
    _, first, _, first_rows = exact_steps()[0]  # on-policy: old_logprobs None
    mine = shard(first, first_rows[rank])
    res["two_pass_old"] = trainer.logprobs(mine.input_ids, mine.attention_mask, TEMPERATURE)
    for kind, batch, options, shards in exact_steps():
        metrics, seconds = timed(run_step, trainer, kind, batch, options, shards[rank])
        res["metrics"].append(metrics)
        res["step_s"].append(seconds)
        res.setdefault("single_pass_old", trainer.last_old_logprobs())  # the first (on-policy) step's
    res["params"] = before = params(trainer.engine.module)
    res["fused_adamw"] = trainer.engine.optimizer.optimizer.defaults["fused"]  # ZeRO's torch AdamW
    res["nan_metrics"], res["nan_change"] = nan_step(trainer, rank, before)

    tiny = sft_batch(4, 2)  # right after the skipped step: training must carry on normally
    res["sft_losses"] = [
        trainer.train_sft(shard(tiny, slice(rank, rank + 1)), counts(tiny.loss_mask)[0])["sft/loss"]
        for _ in range(6)
    ]
    _, res["export_s"] = timed(trainer.export_weights, f"{out}/dense.safetensors")
    _, res["save_s"] = timed(trainer.save, f"{out}/dense_ckpt")
    res["final_params"] = params(trainer.engine.module)
    trainer.close()
    torch.save(res, f"{out}/dense_rank{rank}.pt")


# Persistence threshold 0: partition even the tiny model's small tensors under ZeRO-3.
PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
MOE_CONFIGS = {
    "z3": {"zero_stage": 3, "ds_config_overrides": PARTITION_ALL},
    # Micro-batches by a token budget: rows sorted longest first, 1-2 rows each (lengths 7-12).
    "z1": {"zero_stage": 1, "micro_batch_tokens": 20, "cpu_threads": 3},
    "z2bf16": {"zero_stage": 2, "dtype": "bfloat16", "offload": True, "gradient_checkpointing": True},
    # No ZeRO (model=smollm2-135m's one rank): the plain optimizer; icepop clips, measures and skips.
    "z0": {"zero_stage": 0},
}
"""Trainers built one after the other in the same two processes (close() then a new process group)."""


def _moe_part(rank: int, world_size: int, ports: list[int], model_dir: str, out: str) -> None:
    import deepspeed

    from icepop.trainer.deepspeed import DeepSpeedTrainer

    res: dict[str, Any] = {}
    probe = shard(rl_batch(0, 4), PROBE_ROWS[rank])
    kind, batch, options, shards = exact_steps()[0]
    for (tag, config), port in zip(MOE_CONFIGS.items(), ports, strict=True):
        trainer = DeepSpeedTrainer(
            **trainer_args(
                model_dir, rank=rank, world_size=world_size, master_port=port, **TRAINER_ARGS, **config
            )
        )
        res[f"{tag}_threads"] = torch.get_num_threads()
        res[f"{tag}_logprobs_before"] = trainer.logprobs(probe.input_ids, probe.attention_mask, TEMPERATURE)
        res[f"{tag}_metrics"], res[f"{tag}_step_s"] = timed(
            run_step, trainer, kind, batch, options, shards[rank]
        )
        _, res[f"{tag}_export_s"] = timed(trainer.export_weights, f"{out}/moe_{tag}.safetensors")
        module = trainer.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=tag == "z3"):
            res[f"{tag}_params"] = params(module)
        res[f"{tag}_logprobs_after"] = trainer.logprobs(probe.input_ids, probe.attention_mask, TEMPERATURE)
        if tag == "z0":
            res["z0_nan_metrics"], res["z0_nan_change"] = nan_step(trainer, rank, res["z0_params"])
        if tag == "z3":
            trainer.save(f"{out}/moe_ckpt")
        trainer.close()
    torch.save(res, f"{out}/moe_rank{rank}.pt")


def _load_ranks(out: Path, name: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(2)]


def _worker(rank: int, world_size: int, ports: list[int], models: dict[str, str], out: str) -> None:
    # One spawn for both parts: importing transformers' model classes costs ≈ 9 s per process.
    _dense_part(rank, world_size, ports[0], models["dense"], out)
    _moe_part(rank, world_size, ports[1:], models["moe"], out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("runs")
    models = {arch: build_tiny_model(root / arch, arch) for arch in ("dense", "moe")}
    ports = [free_port() for _ in range(1 + len(MOE_CONFIGS))]
    str_models = {arch: str(path) for arch, path in models.items()}
    run_ranks(_worker, 2, ports, str_models, str(root), error_dir=root / "errors", timeout_s=TIMEOUT_S)
    return {
        arch: {"root": root, "model_dir": models[arch], "ranks": _load_ranks(root, arch)} for arch in models
    }


@pytest.fixture(scope="module")
def dense(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return runs["dense"]


@pytest.fixture(scope="module")
def moe(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return runs["moe"]


# ---- the single-process reference ----------------------------------------------------------------


def reference_logprobs(model: torch.nn.Module, batch: Any, temperature: float) -> torch.Tensor:
    """The textbook computation: full-sequence logits, log_softmax(logits / T), gather."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)


def reference_training(
    model_dir: Path, steps: list[Any], model: torch.nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Plain torch AdamW on each full batch: one loss, one backward, clip, step (no DeepSpeed); on the
    model in model_dir, or on `model` (its trainable parameters: a peft model's adapters)."""
    model = (
        model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": 0.01},
        {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=EPS)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
    metrics = []
    for kind, batch, options, _ in steps:
        if kind == "rl":
            lp = reference_logprobs(model, batch, TEMPERATURE)
            old = lp.detach() if batch.old_logprobs is None else batch.old_logprobs
            tensors = (batch.rollout_logprobs, batch.advantages, batch.response_mask)
            # Local counts: this *is* the full batch.
            loss, pg_metrics, _ = pg_loss(lp, old, *tensors, options, ref_logprobs=batch.ref_logprobs)
            pg_part = float(pg_metrics["actor/pg_loss"])
        else:
            lp = reference_logprobs(model, batch, 1.0)
            loss = torch.where(batch.loss_mask, -lp, 0.0).sum() / batch.loss_mask.sum()
            pg_part = float(loss.detach())
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in named], CLIP))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        metrics.append({"loss": float(loss.detach()), "pg_loss": pg_part, "grad_norm": grad_norm, "lr": lr})
    return params(model), metrics


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def safetensors_layout(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ---- tests -----------------------------------------------------------------------------------


@SPAWNS_RANKS
def test_logprobs_match_transformers_log_softmax(dense: dict[str, Any], moe: dict[str, Any]) -> None:
    probe = rl_batch(0, 4)
    # bf16 weights and activations make a real, small difference; fp32 must agree to rounding.
    keys = {"logprobs": 1e-5, "z3_logprobs_before": 1e-5, "z1_logprobs_before": 1e-5}
    for run in (dense, moe):
        model = AutoModelForCausalLM.from_pretrained(run["model_dir"], dtype=torch.float32)
        with torch.no_grad():
            expected = reference_logprobs(model, probe, TEMPERATURE)
        for key, atol in {**keys, "z2bf16_logprobs_before": 0.1}.items():
            if key not in run["ranks"][0]:
                continue
            ours = torch.cat([r[key] for r in run["ranks"]])  # rank 0 had rows 0-2, rank 1 row 3
            assert ours.dtype == torch.float32 and ours.shape == (4, 11)
            # Each micro-batch is cut at its longest row: label positions past a row's end mean nothing.
            valid = probe.attention_mask[:, 1:].bool()
            torch.testing.assert_close(ours[valid], expected[valid], atol=atol, rtol=0)


@SPAWNS_RANKS
def test_rl_and_sft_steps_equal_one_full_batch_torch_step(dense: dict[str, Any]) -> None:
    steps = exact_steps()
    expected_params, expected = reference_training(dense["model_dir"], steps)
    for rank_result in dense["ranks"]:
        for ours, ref, (kind, *_) in zip(rank_result["metrics"], expected, steps, strict=True):
            prefix = "actor" if kind == "rl" else "sft"
            # The loss is the full-batch loss on every rank; the pre-clip norm is that of the
            # full-batch gradient (Adam's update alone would hide a wrong gradient scale).
            assert ours[f"{prefix}/loss"] == pytest.approx(ref["loss"], rel=1e-5)
            if kind == "rl":  # its policy-gradient part (step 2 adds a KL term): also that of one rank
                assert ours["actor/pg_loss"] == pytest.approx(ref["pg_loss"], rel=1e-5)
            assert ours[f"{prefix}/grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
            assert ours[f"{prefix}/lr"] == pytest.approx(ref["lr"], rel=1e-12)
            assert ours[f"{prefix}/nonfinite_skipped"] == 0.0
        diff = max_diff(rank_result["params"], expected_params)
        assert diff < 1e-6
    print(f"max |Δθ| vs the torch reference after 3 steps: {diff:.1e}")
    assert dense["ranks"][0]["fused_adamw"]  # the fused kernel gives the reference's update too
    first = dense["ranks"][0]["metrics"][0]
    assert first["actor/micro_batches"] == 2.0 and 0.0 < first["icepop/mask_frac"] < 1.0
    assert first["actor/entropy"] > 5.0  # near ln 375 ≈ 5.9 for a random model
    assert dense["ranks"][1]["metrics"][1]["actor/micro_batches"] == 3.0  # 1 real + 2 dummies
    print(f"step seconds (rank 0): {[round(s, 3) for s in dense['ranks'][0]['step_s']]}")


@SPAWNS_RANKS
def test_the_training_forward_gives_the_old_log_probs_of_an_on_policy_step(dense: dict[str, Any]) -> None:
    # One update per step: θ_old is θ, so ℓ_old is the training forward's own detached ℓ, no second pass.
    _, first, _, rows = exact_steps()[0]
    for rank, result in enumerate(dense["ranks"]):
        mask = shard(first, rows[rank]).response_mask
        two_pass, single_pass = result["two_pass_old"], result["single_pass_old"]
        assert single_pass.shape == two_pass.shape and mask.any()
        difference = (single_pass - two_pass)[mask].abs().max().item()
        print(f"rank {rank}: max |ℓ_old single pass − separate pass| = {difference:.1e}")
        assert difference < 1e-5  # float noise: train vs eval mode, the in-place backward kernel


@SPAWNS_RANKS
def test_moe_steps_under_zero3_and_zero1_are_exact_too_and_bf16_runs(moe: dict[str, Any]) -> None:
    expected_params, expected = reference_training(moe["model_dir"], exact_steps()[:1])
    for tag in MOE_CONFIGS:
        exact = tag != "z2bf16"
        for rank_result in moe["ranks"]:
            metrics = rank_result[f"{tag}_metrics"]
            assert metrics["actor/nonfinite_skipped"] == 0.0
            assert metrics["actor/loss"] == pytest.approx(expected[0]["loss"], rel=1e-5 if exact else 0.05)
            assert metrics["actor/grad_norm"] == pytest.approx(
                expected[0]["grad_norm"], rel=1e-5 if exact else 0.05
            )
            # bf16 + offload + checkpointing: the same update up to bf16 rounding of the weights.
            diff = max_diff(rank_result[f"{tag}_params"], expected_params)
            assert diff < (1e-6 if exact else 0.01)
        print(f"{tag} MoE: step {moe['ranks'][0][f'{tag}_step_s']:.3f} s, max |Δθ| vs torch {diff:.1e}")
    # z1's token budget of 20 packs rank 0's 4 rows (lengths 7-12) into 3 micro-batches, not 4 / 2 = 2.
    _, batch, _, shards = exact_steps()[0]
    budget = MOE_CONFIGS["z1"]["micro_batch_tokens"]
    lengths = [batch.attention_mask[rows].sum(-1).tolist() for rows in shards]
    expected_count = max(len(micro_batch_rows(rank_lengths, MICRO, budget)) for rank_lengths in lengths)
    assert expected_count != len(lengths[0]) // MICRO
    assert moe["ranks"][0]["z1_metrics"]["actor/micro_batches"] == expected_count
    assert moe["ranks"][0]["z1_threads"] == 3  # cpu_threads (trainer.cpus_per_rank) on a CPU rank


@SPAWNS_RANKS
def test_nonfinite_loss_skips_the_step_on_every_rank(dense: dict[str, Any], moe: dict[str, Any]) -> None:
    for result, key in [(r, "nan") for r in dense["ranks"]] + [(r, "z0_nan") for r in moe["ranks"]]:
        assert result[f"{key}_metrics"]["actor/nonfinite_skipped"] == 1.0
        assert result[f"{key}_change"] == 0.0


@SPAWNS_RANKS
def test_sft_on_a_repeated_batch_lowers_the_loss(dense: dict[str, Any]) -> None:
    losses = dense["ranks"][0]["sft_losses"]
    assert losses == dense["ranks"][1]["sft_losses"]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.9 * losses[0]


@SPAWNS_RANKS
def test_export_has_save_pretrained_layout_and_values(moe: dict[str, Any], dense: dict[str, Any]) -> None:
    for run, names in ((moe, [f"moe_{tag}" for tag in MOE_CONFIGS]), (dense, ["dense"])):
        fresh = AutoModelForCausalLM.from_pretrained(run["model_dir"], dtype=torch.float32)
        reference_folder = run["root"] / f"save_pretrained_{run['model_dir'].name}"
        fresh.save_pretrained(reference_folder)
        expected_layout = safetensors_layout(reference_folder / "model.safetensors")
        for name in names:
            exported = run["root"] / f"{name}.safetensors"
            assert safetensors_layout(exported) == expected_layout
            # Load the file the way an engine would see it: a folder with the config and this file.
            folder = run["root"] / f"{name}_loaded"
            folder.mkdir()
            shutil.copy(run["model_dir"] / "config.json", folder)
            shutil.copy(exported, folder / "model.safetensors")
            loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            tag = name.removeprefix("moe_")
            trained = run["ranks"][0]["final_params" if name == "dense" else f"{tag}_params"]
            assert max_diff(params(loaded), {k: v.float() for k, v in trained.items()}) == 0.0
            if name in ("moe_z3", "moe_z1"):  # fp32: the engine computes what the trainer computed
                with torch.no_grad():
                    probe = rl_batch(0, 4)
                    logprobs = reference_logprobs(loaded, probe, TEMPERATURE)
                after = torch.cat([r[f"{tag}_logprobs_after"] for r in run["ranks"]])
                valid = probe.attention_mask[:, 1:].bool()
                torch.testing.assert_close(after[valid], logprobs[valid], atol=1e-5, rtol=0)
    moe_keys = safetensors_layout(moe["root"] / "moe_z3.safetensors")
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in moe_keys  # per expert, as vLLM loads
    with safe_open(str(moe["root"] / "moe_z2bf16.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16  # the training dtype
    seconds = {"dense z2": dense["ranks"][0]["export_s"]}
    seconds.update({f"moe {tag}": moe["ranks"][0][f"{tag}_export_s"] for tag in MOE_CONFIGS})
    print(f"export seconds (rank 0): { {k: round(v, 3) for k, v in seconds.items()} }")


@SPAWNS_RANKS
def test_saved_checkpoint_loads_with_auto_classes(dense: dict[str, Any], moe: dict[str, Any]) -> None:
    original = AutoTokenizer.from_pretrained(dense["model_dir"])
    for folder, expected in (
        (dense["root"] / "dense_ckpt", dense["ranks"][0]["final_params"]),
        (moe["root"] / "moe_ckpt", moe["ranks"][0]["z3_params"]),
    ):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert max_diff(params(model), expected) == 0.0
        tokenizer = AutoTokenizer.from_pretrained(folder)
        text = "<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n"
        assert tokenizer.encode(text) == original.encode(text)
        assert tokenizer.chat_template == original.chat_template


def test_bad_arguments_fail_early_and_importing_the_module_does_not_import_deepspeed() -> None:
    code = """
import sys
from backend_args import trainer_args
from icepop.trainer.deepspeed import DeepSpeedTrainer
bad = ({"zero_stage": 4}, {"dtype": "float64"}, {"micro_batch_size": 0},
       {"lr_schedule": "cosine", "total_steps": None})
for kwargs in bad:
    try:
        DeepSpeedTrainer(**trainer_args("unused", rank=0, world_size=1, master_port=1, **kwargs))
    except ValueError as error:
        print(error)
    else:
        raise AssertionError(kwargs)
assert "deepspeed" not in sys.modules and "transformers" not in sys.modules
"""
    here = Path(__file__).parent  # backend_args
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=here)
    assert done.returncode == 0, done.stderr
    for field in ("zero_stage", "dtype", "micro_batch_size", "total_steps"):
        assert field in done.stdout


def _contract_worker(rank: int, _: int, ports: list[int], model_dir: str, out: str, zero: int) -> None:
    from trainer_contract import check_trainer_backend_contract, receive_broadcast

    from icepop.trainer.deepspeed import DeepSpeedTrainer

    if rank == 2:  # not a trainer rank: an engine's end of the weight group
        receive_broadcast(ports[1], out)
        return
    zero_config = {"zero_stage": zero, "ds_config_overrides": PARTITION_ALL if zero == 3 else None}
    args = trainer_args(
        model_dir, rank=rank, world_size=2, master_port=ports[0], **TRAINER_ARGS, **zero_config
    )
    trainer = DeepSpeedTrainer(**args)
    try:
        rl, sft = rl_batch(7, 6), sft_batch(8, 4)
        check_trainer_backend_contract(trainer, rank, 2, rl, sft, out, weight_port=ports[1])
    finally:
        trainer.close()


@SPAWNS_RANKS
@pytest.mark.parametrize(("arch", "zero"), [("dense", 2), ("moe", 3)])
def test_deepspeed_trainer_passes_the_trainer_backend_contract(tmp_path: Path, arch: str, zero: int) -> None:
    model = build_tiny_model(tmp_path / "model", arch)
    ports = [free_port(), free_port()]
    run_ranks(_contract_worker, 3, ports, str(model), str(tmp_path), zero, error_dir=tmp_path / "errors",
              timeout_s=TIMEOUT_S)  # fmt: skip
    # The broadcast carried exactly the exported file: names (per expert for MoE), dtypes, values.
    exported = load_file(tmp_path / "weights.safetensors")
    received = torch.load(tmp_path / "broadcast.pt")
    assert received.keys() == exported.keys()
    for name, tensor in exported.items():
        assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name
    if arch == "moe":
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in received


# ---- the reward model (model_kind="reward") ---------------------------------------------------


def _reward_worker(rank: int, world_size: int, port: int, model_dir: str, out: str) -> None:
    from icepop.algo import bradley_terry_loss
    from icepop.data.preferences import builtin_preference_pairs, collate_pairs, tokenize_pairs
    from icepop.trainer.deepspeed import DeepSpeedTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = tokenize_pairs(builtin_preference_pairs("arithmetic", 6, seed=0), tokenizer, None)
    whole = collate_pairs(pairs, tokenizer.pad_token_id)
    mine = collate_pairs(pairs[rank * 3 : rank * 3 + 3], tokenizer.pad_token_id)  # 3 pairs per rank
    trainer = DeepSpeedTrainer(**trainer_args(
        model_dir, rank=rank, world_size=world_size, master_port=port, stage="rm", zero_stage=3,
        ds_config_overrides=PARTITION_ALL, **{**TRAINER_ARGS, "micro_batch_tokens": 160},
    ))  # fmt: skip
    res: dict[str, Any] = {"before": trainer.scores(whole.input_ids, whole.attention_mask)}
    res["expected_first_loss"] = float(bradley_terry_loss(*res["before"].view(2, -1))[0])
    res["metrics"] = [trainer.train_rm(mine, global_pair_count=6) for _ in range(8)]
    res["after"] = trainer.scores(whole.input_ids, whole.attention_mask)
    trainer.save(f"{out}/rm_ckpt")
    trainer.close()
    torch.save(res, f"{out}/rm_rank{rank}.pt")
    torch.save(whole, f"{out}/rm_batch.pt")


@SPAWNS_RANKS
def test_reward_model_trains_bradley_terry_over_ranks_and_saves_a_loadable_classifier(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = build_tiny_model(tmp_path / "model", "dense")
    run_ranks(_reward_worker, 2, free_port(), str(model), str(tmp_path), error_dir=tmp_path / "errors",
              timeout_s=TIMEOUT_S)  # fmt: skip
    ranks = [torch.load(tmp_path / f"rm_rank{r}.pt", weights_only=False) for r in range(2)]
    losses = [m["rm/loss"] for m in ranks[0]["metrics"]]
    # The first step's loss is the mean over all 6 pairs (both ranks), at the initial weights.
    assert losses[0] == pytest.approx(ranks[0]["expected_first_loss"], abs=1e-5)
    assert [m["rm/loss"] for m in ranks[1]["metrics"]] == losses  # the same full-batch value on every rank
    assert losses[-1] < 0.5 * losses[0], losses
    assert ranks[0]["metrics"][-1]["rm/accuracy"] == 1.0
    chosen, rejected = ranks[0]["after"].view(2, -1)
    assert bool((chosen > rejected).all())
    # The checkpoint is a one-label sequence classifier that scores as the trainer did.
    loaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm_ckpt", dtype=torch.float32
    ).eval()
    assert loaded.config.num_labels == 1
    batch = torch.load(tmp_path / "rm_batch.pt", weights_only=False)
    with torch.no_grad():
        scores = loaded.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(scores, ranks[0]["after"], atol=1e-5, rtol=0)
