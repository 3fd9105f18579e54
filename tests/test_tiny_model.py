"""The tiny model family: the saved folder loads in transformers with exactly the tokenizer built."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from icepop.models.tiny import build_tiny_model, build_tokenizer

TEXTS = [
    "What is 123 + 45?",
    "  two  spaces\n\n 3.14159 (7*8)-5 don't",
    "Ünïcode ✓ 日本語",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.mark.parametrize("architecture", ["dense", "moe"])
def test_saved_folder_loads_with_the_same_tokenizer_and_a_runnable_model(tmp_path, architecture: str) -> None:
    built = build_tokenizer()
    folder = build_tiny_model(tmp_path / architecture, architecture)
    loaded = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert loaded.encode(text) == built.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    # Digits are single tokens: "123" is three tokens.
    assert len(loaded.encode("123")) == 3
    messages = [{"role": "user", "content": "1+1"}]
    ids = loaded.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert loaded.decode(ids) == "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    assert model.config.head_dim == 32  # vLLM's CPU attention accepts 32, 64, 80, ...
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(loaded)) and torch.isfinite(logits).all()
    assert loaded.eos_token == "<|im_end|>" and model.config.eos_token_id == loaded.eos_token_id


def test_same_seed_same_weights(tmp_path) -> None:
    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "a", seed=3))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "b", seed=3))
    c = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "c", seed=4))
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_unknown_architecture_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="architecture='mamba'"):
        build_tiny_model(tmp_path, "mamba")
