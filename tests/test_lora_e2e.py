"""LoRA end to end through `python -m icepop.train` on the real stack (Ray, vLLM, DeepSpeed ZeRO-2 on 2
ranks): an RLVR run whose every weight sync passes the float32 probe, whose checkpoints hold the merged
model and the adapter, and which, cut back to an earlier checkpoint (as a crash leaves it), resumes to
the same metrics; then SFT → reward model → RLHF with adapters, each stage's checkpoint loading.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from e2e_helpers import QUICK_SFT, SMALL, assert_same_steps, icepop_train
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from icepop.stages import checkpoint
from icepop.tracking import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray("apart")]

LORA_RL = [
    "+recipe=rlvr", *QUICK_SFT, *SMALL, "reward.function=e2e_rewards:longer", "trainer.lora.rank=8",
    "trainer.lr=2e-3", "train.steps=4", "train.checkpoint_every=2", "train.keep_last=2", "train.eval_every=0",
]  # fmt: skip
"""From the tiny default's cached SFT warm-up (shared with the other runs of QUICK_SFT and SMALL), a
float32 engine (the probe's strict tolerance), a reward that varies within every group."""


@pytest.fixture(scope="module")
def lora_rl(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> dict:
    tmp = tmp_path_factory.mktemp("lora_rl")
    first = icepop_train(tmp, *LORA_RL, "run.dir=whole", cache=shared_cache)
    # A crash after step 3: the step-4 checkpoint was never written. The rerun continues from step 2.
    shutil.copytree(tmp / "whole", tmp / "cut")
    shutil.rmtree(checkpoint.latest(tmp / "cut")[1])
    resumed = icepop_train(tmp, *LORA_RL, "run.dir=cut", cache=shared_cache)
    return {"root": tmp, "first": first, "resumed": resumed}


def test_a_lora_run_syncs_the_exact_policy_and_resumes_to_the_same_metrics(lora_rl: dict) -> None:
    root = lora_rl["root"]
    assert "icepop: LoRA rank 8 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in (
        lora_rl["first"].stdout
    )
    whole = [r for r in read_metrics(root / "whole") if "actor/loss" in r]
    assert [r["step"] for r in whole] == [1, 2, 3, 4]
    # Every sync: the engine scores the probe as the trainer does (float32 on both sides).
    assert all(r["sync/probe_abs_logp_diff"] < 1e-3 for r in whole)
    assert any(r["actor/grad_norm"] > 0 for r in whole)
    assert "resumed from" in lora_rl["resumed"].stdout and "(step 2 of 4)" in lora_rl["resumed"].stdout
    cut = [r for r in read_metrics(root / "cut") if "actor/loss" in r]
    assert_same_steps(cut, whole, range(1, 5))

    final = checkpoint.latest(root / "whole")[1]
    assert_adapter_equals_merged(final, AutoModelForCausalLM, {})


def assert_adapter_equals_merged(folder: Path, auto: type, options: dict) -> None:
    """The checkpoint's merged model computes what its adapter on the base it names (peft) computes."""
    from peft import PeftModel

    merged = auto.from_pretrained(folder, dtype=torch.float32, **options)
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    base = auto.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32, **options)
    ids = torch.tensor([[5, 17, 33, 101, 7, 9, 64, 12]])
    with torch.no_grad():
        before = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, folder / "adapter")  # wraps `base` in place
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=0)
        assert not torch.allclose(before, merged(ids).logits, atol=1e-4)  # the adapter did something


LORA_STAGES = [
    "+recipe=pipeline", "run.dir=pipe", *SMALL, "trainer.lora.rank=8", "pipeline.stages=[sft,rm,rlhf]",
    "rm.pairs=200", "rm.eval_size=32", "rm.batch_size=8", "sft.eval_size=32", "sft.eval_every=0",
    'pipeline.overrides={sft:["sft.steps=4"],rm:["rm.steps=3"],rlhf:["train.steps=2"]}',
]  # fmt: skip


def test_sft_reward_model_and_rlhf_train_adapters_and_save_loadable_checkpoints(tmp_path: Path) -> None:
    result = icepop_train(tmp_path, *LORA_STAGES)
    for stage in ("sft", "rm", "rlhf"):
        assert f"| {stage} |" in result.stdout
    saved = (tmp_path / "pipe").glob("*/checkpoints/*/model.safetensors")
    folders = {path.parents[2].name: path.parent for path in saved}
    assert sorted(folders) == ["1-sft", "2-rm", "3-rlhf"], sorted(folders)
    for name, folder in folders.items():
        if name == "2-rm":
            assert_adapter_equals_merged(folder, AutoModelForSequenceClassification, {"num_labels": 1})
        else:
            assert_adapter_equals_merged(folder, AutoModelForCausalLM, {})
