"""The size of an engine's KV cache on CPU, from what a run will hold in it (rollout.kv_cache_gib=null).

vLLM's CPU backend takes a fixed number of bytes for its KV cache (it zero-fills them, so all of it is
resident) and serves whatever fits, queueing or preempting what does not. A run knows what it will
hold: every sequence of an engine's share of a batch at once, each at most its longest prompt plus a
reply (or an episode). This module turns that into bytes for a standard decoder (the key and value
of every layer's KV heads); a model whose config does not say those sizes gets `FALLBACK_BYTES`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

BLOCK_TOKENS = 128
"""vLLM's CPU block size (vllm/platforms/cpu.py: 128 unless the attention backend needs another)."""
FALLBACK_BYTES = 2**30
"""Where a model's config does not give the KV sizes (1 GiB, the schema's old fixed default)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def bytes_per_token(model_path: str, dtype: str) -> int | None:
    """Key and value bytes of one token over all layers, from the model folder's config.json (its
    text model's, for a multimodal one); None where it does not say them."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    if not layers or not heads or "hidden_size" not in config:
        return None
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 4)


def run_kv_cache_bytes(
    model_path: str, dtype: str, sequences: int, context_tokens: int, max_model_len: int
) -> int:
    """Bytes for `sequences` sequences of up to `context_tokens` tokens each, in whole blocks, and never
    less than one sequence at the engine's whole context `max_model_len` (vLLM refuses to start
    otherwise)."""
    per_token = bytes_per_token(model_path, dtype)
    if per_token is None:
        return FALLBACK_BYTES
    blocks = sequences * math.ceil(context_tokens / BLOCK_TOKENS)
    blocks = max(blocks, math.ceil(max_model_len / BLOCK_TOKENS))
    return blocks * BLOCK_TOKENS * per_token
