"""The tiny model family icepop builds itself, so that everything runs offline on a CPU.

A byte-level BPE tokenizer (Qwen2's pre-tokenizer, so digits split one by one; ChatML special
tokens and chat template) and
two random-initialised architectures that both transformers and vLLM serve natively: a Qwen2-style
dense model and a Qwen3-MoE model, ≈1M parameters each, head_dim 32 (vLLM's CPU attention needs
32, 64, 80, …). `build_tiny_model` writes a Hugging Face folder that `AutoModelForCausalLM`,
`AutoTokenizer` and `vllm.LLM` load directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# ChatML, as Qwen models use it. `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BASE_CORPUS = (
    "system user assistant You are a careful calculator. Answer with the number only.",
    "What is 12 + 34? Compute 7 * 8 - 5. The answer is 46. Use the numbers to reach the target.",
    "Using the numbers [3, 5, 7], make 22 with + - * and each number once. (3 + 5) * 7 - 34",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] , . ? : <answer> </answer> Answer: The final answer",
)
"""Text the tokenizer's merges are learned from; byte-level BPE still encodes any other text."""

ARCHITECTURES = ("dense", "moe")

# Qwen2's pre-tokenizer split. transformers 5.x loads a folder whose config says qwen2 with its own
# Qwen2 pre-tokenizer whatever tokenizer.json holds; using the same one keeps that substitution a
# no-op, so trainer, vLLM and this builder all encode identically.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501


def build_tokenizer(corpus: Iterable[str] = BASE_CORPUS, vocab_size: int = 512):  # -> PreTrainedTokenizerFast
    """Train a byte-level BPE tokenizer with individual digits and the ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    # \p{N} alone: digits one by one, which keeps arithmetic learnable for a small model.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus) * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def model_config(
    architecture: str, vocab_size: int, eos_token_id: int, pad_token_id: int
):  # -> PretrainedConfig
    """The transformers config of one tiny architecture ("dense" or "moe")."""
    from transformers import Qwen2Config, Qwen3MoeConfig

    common = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "eos_token_id": eos_token_id,
        "bos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": "float32",
    }
    if architecture == "dense":
        return Qwen2Config(intermediate_size=384, **common)
    elif architecture == "moe":
        return Qwen3MoeConfig(
            intermediate_size=384,
            moe_intermediate_size=96,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            **common,
        )
    raise ValueError(f"architecture={architecture!r} is not one of {', '.join(ARCHITECTURES)}")


def build_tiny_model(
    directory: str | Path, architecture: str = "dense", seed: int = 0, corpus: Iterable[str] = BASE_CORPUS
) -> Path:
    """Write tokenizer + randomly initialised model (safetensors, float32) to `directory`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    tokenizer = build_tokenizer(corpus)
    config = model_config(architecture, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
