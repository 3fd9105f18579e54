"""LoRA (trainer.lora): which weights get adapters, the merged weights every export writes, and the
DeepSpeed trainer on 2 real gloo ranks training adapters only — exact against plain torch on a peft
model, base weights untouched, checkpoints (merged folder + peft adapter) and an exact resume.

The fast tests need no process group; one spawned run of two ranks (ZeRO-1 dense, then ZeRO-3 MoE in
the same processes) serves the slow ones, among them a vLLM engine given the merged weights by an
in-place reload and as a checkpoint, against the peft model's own forward.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from backend_args import engine_args, trainer_args
from dist_helpers import free_port, run_ranks
from safetensors.torch import load_file
from test_config import compose_config
from test_inputs import readme_commands
from test_trainer_deepspeed import (
    PARTITION_ALL,
    SPAWNS_RANKS,
    TEMPERATURE,
    TRAINER_ARGS,
    exact_steps,
    reference_logprobs,
    reference_training,
    rl_batch,
    run_step,
    shard,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from icepop.errors import InputError
from icepop.models.tiny import build_tiny_model
from icepop.preflight import check_inputs
from icepop.trainer.export import state_buckets
from icepop.trainer.lora import Adapters, add_adapters, check_same_adapters, hf_name

RANK = 4
LORA = {"rank": RANK, "alpha": 8.0}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("dense", "moe")}


def merged_state(model: Any) -> dict[str, torch.Tensor]:
    """What an export of this peft model writes (one process: nothing is sharded)."""
    no_gather = lambda params: contextlib.nullcontext()  # noqa: E731
    buckets = state_buckets(model, no_gather, True, "cpu", 2**16, Adapters(model))
    return {name: t for bucket in buckets for name, t in bucket.items()}


def perturbed(model: Any, seed: int) -> Any:
    """Non-zero adapters (B starts at 0, which would make every merge trivially exact)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=g))
    return model


# ---- fast: targets and merged weights ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["dense", "moe"])
@pytest.mark.parametrize("kind", ["policy", "reward"])
def test_only_adapters_train_and_the_merged_state_is_peft_merge_bit_for_bit(
    tiny_models: dict[str, Path], arch: str, kind: str
) -> None:
    auto = AutoModelForCausalLM if kind == "policy" else AutoModelForSequenceClassification
    options = {} if kind == "policy" else {"num_labels": 1}
    base = auto.from_pretrained(tiny_models[arch], dtype=torch.float32, **options)
    original = {name: t.clone() for name, t in base.state_dict().items()}
    model = perturbed(add_adapters(base, kind, **LORA), seed=1)

    trainable = [hf_name(n) for n, p in model.named_parameters() if p.requires_grad]
    adapted = {
        name.split(".lora_")[0].removeprefix("model.layers.0.") for name in trainable if "layers.0." in name
    }
    # Dense: every projection of attention and MLP. MoE: attention and both fused expert stacks (the
    # nested wrappers of one experts module), never the router (mlp.gate) nor lm_head.
    expected = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    expected |= {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} if arch == "dense" else {"mlp.experts"}
    assert adapted == expected
    assert all(".lora_" in n for n in trainable if n != "score.weight")
    assert ("score.weight" in trainable) == (kind == "reward")  # a new score head trains whole

    state = merged_state(model)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    tied = set(merged) - set(state)  # lm_head.weight is embed_tokens.weight
    assert tied == ({"lm_head.weight"} if kind == "policy" else set())
    assert all(torch.equal(state[name], merged[name]) for name in state)  # names and values: peft's merge
    changed = {n for n in state if n in original and not torch.equal(state[n], original[n])}
    adapters = Adapters(model)
    assert changed == {n for n, p in adapters.named_parameters() if id(p) in adapters.layers} | (
        {"score.weight"} if kind == "reward" else set()
    )
    # The base weights themselves were never written to.
    base_now = {hf_name(n): t for n, t in model.state_dict().items() if ".lora_" not in n}
    assert all(
        torch.equal(base_now[n], original[n]) for n in original if n in base_now and n != "score.weight"
    )


def test_lora_settings_are_checked_before_anything_starts(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"trainer\.lora\.rank must be >= 0"):
        compose_config("+recipe=rlvr", "trainer.lora.rank=-1")
    with pytest.raises(ValueError, match=r"trainer.lora.dropout=0.1 in an RL stage"):
        compose_config("+recipe=rlvr", "trainer.lora.rank=8", "trainer.lora.dropout=0.1")
    compose_config("+recipe=sft", "trainer.lora.rank=8", "trainer.lora.dropout=0.1")  # SFT may use it
    with pytest.raises(ValueError, match=r"trainer.lora.dropout=0.1 in an RL stage"):  # a later RL stage
        compose_config("+recipe=pipeline", "trainer.lora.rank=8", "trainer.lora.dropout=0.1")
    config = compose_config(
        "+recipe=sft",
        f"model.path={tiny_models['dense']}",
        "trainer.lora.rank=8",
        "trainer.lora.target_modules=[qv_proj]",
    )
    with pytest.raises(InputError, match=r"trainer.lora \(rank 8\).*qv_proj"):
        check_inputs(config)
    config = compose_config(
        "+recipe=sft", f"model.path={tiny_models['moe']}", "trainer.lora.rank=8", "trainer.lora.dropout=0.1"
    )
    with pytest.raises(InputError, match=r"trainer\.lora\.experts=false"):
        check_inputs(config)
    check_inputs(compose_config(  # without the experts, a MoE model's attention may use dropout
        "+recipe=sft", f"model.path={tiny_models['moe']}", "trainer.lora.rank=8", "trainer.lora.dropout=0.1",
        "trainer.lora.experts=false",
    ))  # fmt: skip


def test_the_readme_sft_command_with_lora_passes_a_dry_run_and_says_what_it_trains(tmp_path: Path) -> None:
    _, command = readme_commands("LoRA: adapters in the trainer, the merged policy in the engine")
    sft = command[: command.index("#")]  # without the comment
    assert sft == ["+recipe=sft", "trainer.lora.rank=16"]
    env = {**os.environ, "ICEPOP_CACHE": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "icepop.train", *sft, "run.dry_run=true"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    trained = "icepop: LoRA rank 16 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj: 155,648"
    assert trained in result.stdout and "every check passed; nothing was started" in result.stdout


def test_a_trainer_state_resumes_only_into_the_adapters_it_was_saved_with() -> None:
    check_same_adapters(None, None, "ckpt")  # full fine-tuning, as before LoRA existed
    check_same_adapters({"rank": 8}, {"rank": 8}, "ckpt")
    with pytest.raises(
        ValueError, match=r"ckpt was saved with trainer\.lora=off, this run has trainer\.lora="
    ):
        check_same_adapters(None, {"rank": 8}, "ckpt")  # would leave the adapters untrained silently
    with pytest.raises(ValueError, match=r"saved with trainer\.lora=\{'rank': 8\}"):
        check_same_adapters({"rank": 8}, {"rank": 16}, "ckpt")


# ---- slow: two DeepSpeed ranks ----------------------------------------------------------------------

LORA_RUNS = {
    "dense": {"zero_stage": 1},  # ZeRO-2 is the end-to-end runs' (tests/test_lora_e2e.py)
    "moe": {"zero_stage": 3, "ds_config_overrides": PARTITION_ALL},
}


def adapter_state(module: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def whole(module: Any, sharded: bool) -> Any:
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=sharded)


def _worker(rank: int, world_size: int, ports: list[int], models: dict[str, str], out: str) -> None:
    from icepop.trainer.deepspeed import DeepSpeedTrainer

    for (arch, config), port in zip(LORA_RUNS.items(), ports, strict=True):
        trainer = DeepSpeedTrainer(
            **trainer_args(models[arch], rank=rank, world_size=world_size, master_port=port, lora=LORA,
                           **TRAINER_ARGS, **config)
        )  # fmt: skip
        module = trainer.engine.module
        res: dict[str, Any] = {}
        with whole(module, arch == "moe"):
            res["initial"] = adapter_state(module)
        for kind, batch, options, shards in exact_steps():
            run_step(trainer, kind, batch, options, shards[rank])
        with whole(module, arch == "moe"):
            res["params"] = {n: p.detach().clone() for n, p in module.named_parameters()}
        moments = trainer.engine.optimizer.optimizer.state.values()  # this rank's ZeRO partition
        res["optimizer_numel"] = sum(t.numel() for s in moments for t in s.values() if t.dim() > 0)
        trainer.export_weights(f"{out}/{arch}.safetensors")
        probe = shard(rl_batch(0, 4), slice(2 * rank, 2 * rank + 2))
        res["logprobs"] = trainer.logprobs(probe.input_ids, probe.attention_mask, TEMPERATURE)
        trainer.save(f"{out}/{arch}_ckpt")
        trainer.save_state(f"{out}/{arch}_state")
        # Resume: a step, then back to the saved state and the same step again — the same weights.
        kind, batch, options, shards = exact_steps()[0]
        first = run_step(trainer, kind, batch, options, shards[rank])
        after_first = trainer.logprobs(probe.input_ids, probe.attention_mask, TEMPERATURE)
        trainer.load_state(f"{out}/{arch}_state")
        resumed = trainer.logprobs(probe.input_ids, probe.attention_mask, TEMPERATURE)
        again = run_step(trainer, kind, batch, options, shards[rank])
        res["resume"] = (
            first,
            again,
            after_first,
            trainer.logprobs(probe.input_ids, probe.attention_mask, TEMPERATURE),
        )
        res["resumed_logprobs"] = resumed
        trainer.close()
        torch.save(res, f"{out}/{arch}_rank{rank}.pt")


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora_runs")
    models = {arch: str(path) for arch, path in tiny_models.items()}
    ports = [free_port() for _ in LORA_RUNS]
    run_ranks(_worker, 2, ports, models, str(root), error_dir=root / "errors", timeout_s=300)
    ranks = {
        arch: [torch.load(root / f"{arch}_rank{r}.pt", weights_only=False) for r in range(2)]
        for arch in LORA_RUNS
    }
    return {"root": root, "models": tiny_models, "ranks": ranks}


@SPAWNS_RANKS
@pytest.mark.parametrize("arch", list(LORA_RUNS))
def test_only_adapters_change_and_training_equals_plain_torch_on_the_peft_model(
    lora_runs: dict[str, Any], arch: str
) -> None:
    rank0 = lora_runs["ranks"][arch][0]
    original = AutoModelForCausalLM.from_pretrained(
        lora_runs["models"][arch], dtype=torch.float32
    ).state_dict()
    trained = rank0["params"]
    # Adam's two moments, partitioned over the ranks, are the adapters' size (up to ZeRO's alignment).
    adapter_numel = sum(t.numel() for t in rank0["initial"].values())
    moments = sum(r["optimizer_numel"] for r in lora_runs["ranks"][arch])
    assert 2 * adapter_numel <= moments <= 2 * adapter_numel + 4096
    for name, tensor in trained.items():
        if ".lora_" in name:
            assert not torch.equal(tensor, rank0["initial"][name]), name  # every adapter moved
        else:
            assert torch.equal(tensor, original[hf_name(name)]), name  # base weights bit-identical
    # The same steps in one process: plain torch AdamW on a peft model with the trainer's first adapters.
    model = add_adapters(AutoModelForCausalLM.from_pretrained(lora_runs["models"][arch]), "policy", **LORA)
    model.load_state_dict(rank0["initial"], strict=False)
    reference, _ = reference_training(lora_runs["models"][arch], exact_steps(), model)
    assert reference.keys() == trained.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(trained[name], tensor, atol=2e-6, rtol=0)


@SPAWNS_RANKS
@pytest.mark.parametrize("arch", list(LORA_RUNS))
def test_exported_and_saved_weights_are_the_merged_policy_and_the_adapter_reloads_in_peft(
    lora_runs: dict[str, Any], arch: str
) -> None:
    from peft import PeftModel

    root, model_dir = lora_runs["root"], lora_runs["models"][arch]
    exported = load_file(root / f"{arch}.safetensors")
    checkpoint = root / f"{arch}_ckpt"
    assert load_file(checkpoint / "model.safetensors").keys() == exported.keys()
    assert all(torch.equal(t, exported[n]) for n, t in load_file(checkpoint / "model.safetensors").items())
    assert (checkpoint / "adapter" / "adapter_config.json").is_file()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), checkpoint / "adapter"
    )
    merged_folder = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    probe = rl_batch(0, 4)
    valid = probe.attention_mask[:, 1:].bool()
    with torch.no_grad():
        peft_logprobs = reference_logprobs(with_adapter.eval(), probe, TEMPERATURE)
        merged_logprobs = reference_logprobs(merged_folder, probe, TEMPERATURE)
    trainer_logprobs = torch.cat([r["logprobs"] for r in lora_runs["ranks"][arch]])
    torch.testing.assert_close(merged_logprobs[valid], peft_logprobs[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(trainer_logprobs[valid], merged_logprobs[valid], atol=1e-5, rtol=0)
    # The exported tensors are the saved adapter merged by peft itself (up to matmul rounding).
    merged = with_adapter.merge_and_unload().state_dict()
    for name, tensor in exported.items():
        if name in merged:
            torch.testing.assert_close(tensor, merged[name], atol=1e-6, rtol=0)


@SPAWNS_RANKS
@pytest.mark.parametrize("arch", list(LORA_RUNS))
def test_the_adapter_state_resumes_exactly(lora_runs: dict[str, Any], arch: str) -> None:
    for rank in lora_runs["ranks"][arch]:
        first, again, after_first, after_again = rank["resume"]
        assert torch.equal(rank["resumed_logprobs"], rank["logprobs"])  # the saved weights are back
        assert first == again  # the same step from the same state: the same loss, norm and lr
        assert torch.equal(after_first, after_again)  # ... and the same update (Adam moments restored)
    state = lora_runs["root"] / f"{arch}_state" / "trainer"
    model_files = sorted(state.glob("*model_states.pt"))
    saved = sum(f.stat().st_size for f in model_files)
    assert saved < 0.5 * (lora_runs["models"][arch] / "model.safetensors").stat().st_size  # no base weights


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.slow  # an in-process vLLM engine per architecture
@pytest.mark.parametrize("arch", list(LORA_RUNS))
def test_the_engine_holds_the_trainers_policy_after_a_sync_and_loads_the_merged_checkpoint(
    lora_runs: dict[str, Any], arch: str, tmp_path: Path
) -> None:
    from icepop.rollout.vllm import VllmEngine
    from icepop.trainer.export import write_weights_file

    model_dir = lora_runs["models"][arch]
    # Strongly moved adapters (not a few small steps), merged as a sync writes them.
    peft_model = perturbed(
        add_adapters(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), "policy", **LORA),
        2,
    )
    write_weights_file(
        peft_model.get_base_model(), merged_state(peft_model), str(tmp_path / "sync.safetensors")
    )
    probe = rl_batch(0, 4)
    sequences = [
        ids[: int(n)].tolist() for ids, n in zip(probe.input_ids, probe.attention_mask.sum(-1), strict=True)
    ]
    prompt_len = 3

    def engine_logprobs(engine: VllmEngine) -> list[torch.Tensor]:
        return [torch.tensor(row) for row in engine.score(sequences, prompt_len)]

    def expected(model: Any) -> list[torch.Tensor]:
        with torch.no_grad():
            logprobs = reference_logprobs(model.eval(), probe, 1.0)
        return [logprobs[i, prompt_len - 1 : len(ids) - 1] for i, ids in enumerate(sequences)]

    engine = VllmEngine(**engine_args(model_dir, max_model_len=64, kv_cache_bytes=32 * 2**20))
    try:
        before = engine_logprobs(engine)
        engine.load_weights(str(tmp_path / "sync.safetensors"))  # the weight sync's in-place reload
        after = engine_logprobs(engine)
    finally:
        engine.close()
    trainer_view = expected(peft_model)  # the peft model's own forward: base + (alpha/r)·B·A·x
    assert largest_difference(before, trainer_view) > 1e-2  # the sync matters
    assert largest_difference(after, trainer_view) < 1e-4  # the run's fp32 probe allows 1e-3

    # The checkpoint a LoRA run saved (merged folder) serves as a model of its own.
    ckpt = lora_runs["root"] / f"{arch}_ckpt"
    engine = VllmEngine(**engine_args(ckpt, max_model_len=64, kv_cache_bytes=32 * 2**20, cpu_threads=None))
    try:
        served = engine_logprobs(engine)
    finally:
        engine.close()
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, lora_runs["root"] / f"{arch}_ckpt" / "adapter")
    assert largest_difference(served, expected(with_adapter)) < 1e-4
