"""Hugging Face models as the trainer side builds them: the policy (a causal LM) or a reward model (a
sequence classifier with one output, read at each row's last non-pad token).

Key design choice: under ZeRO-3 the model is built inside transformers' `HfDeepSpeedConfig`, so its
parameters are created already partitioned and each rank loads only its shard; the global is unset
right after, or any later single-rank `from_pretrained` in the process (a reference model, vLLM)
would deadlock (ENVIRONMENT.md).
"""

from __future__ import annotations

from typing import Any

from icepop.trainer.inputs import DTYPES, MODEL_KINDS
from icepop.trainer.lora import add_adapters


def load_model(
    model_path: str,
    kind: str,
    dtype: str,
    zero3_config: dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    lora: dict[str, Any] | None = None,
) -> Any:
    """The model of `kind` ("policy" or "reward") from `model_path` in `dtype` ("float32", "bfloat16"
    or "float16"), without a KV cache; zero3_config: the DeepSpeed config when ZeRO-3 partitions it.
    With `lora` (the keyword arguments of `add_adapters`) the model is peft's, adapters trainable."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {', '.join(MODEL_KINDS)}; got {kind!r}")
    torch_dtype = DTYPES[dtype]
    hf_config = HfDeepSpeedConfig(zero3_config) if zero3_config is not None else None
    try:
        if kind == "reward":  # a new score head on the checkpoint's body (or its own head)
            model = AutoModelForSequenceClassification.from_pretrained(
                model_path, dtype=torch_dtype, num_labels=1
            )
            if model.config.pad_token_id is None:  # the score is read at the last non-pad token
                model.config.pad_token_id = AutoTokenizer.from_pretrained(model_path).pad_token_id
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    finally:
        if hf_config is not None:
            unset_hf_deepspeed_config()
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return add_adapters(model, kind, **lora) if lora else model
