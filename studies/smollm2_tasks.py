"""Which verifiable task suits RL on SmolLM2-135M-Instruct here: its held-out greedy accuracy before
any training, lenient (the reply's last number is the answer) and strict (the answer in the requested
<answer></answer> tags), on candidate reasoning-gym generators and icepop's built-in arithmetic.

    python studies/smollm2_tasks.py [--problems 128] [--max-new-tokens 128]

A task where the model starts between 10% and 50% lenient accuracy leaves RL room to show learning
that is not just the output format. Runs one vLLM engine in this process, no Ray.
"""

from __future__ import annotations

import argparse
import json
import time

from icepop.config import DataConfig
from icepop.data.prompts import load_prompts
from icepop.rewards.verifiers import lenient_correct, strict_correct, verify
from icepop.stages.setup import load_tokenizer, smollm2_model
from icepop.types import SamplingSettings

TWO_TERMS = {"min_terms": 2, "max_terms": 2}
CANDIDATES = {
    "arithmetic (built-in, 2 digits, +)": ("arithmetic", {"digits": 2, "operators": "+"}),
    "basic_arithmetic 2 terms, 2 digits, +-": (
        "reasoning_gym:basic_arithmetic",
        {**TWO_TERMS, "min_digits": 1, "max_digits": 2, "operators": ["+", "-"],
         "allow_parentheses": False, "allow_negation": False},
    ),
    "chain_sum 2-3 terms, 1-2 digits": (
        "reasoning_gym:chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}
    ),
    "leg_counting (1-3 animals)": ("reasoning_gym:leg_counting", {"min_animals": 1, "max_animals": 3}),
    "products 2 terms 1 digit": ("reasoning_gym:products", {**TWO_TERMS, "min_digits": 1, "max_digits": 1}),
    "gsm_symbolic": ("reasoning_gym:gsm_symbolic", {}),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", help="the engine's (bfloat16 is 4.4x slower on AVX2)")
    parser.add_argument("--only", nargs="*", help="names of CANDIDATES to run (default: all)")
    args = parser.parse_args()
    from icepop.config import Config
    from icepop.ray.engine_placement import engine_settings
    from icepop.rollout.vllm import VllmEngine

    model = str(smollm2_model())
    tokenizer = load_tokenizer(model, DataConfig())
    changes = {"dtype": args.dtype, "max_model_len": 1024, "kv_cache_bytes": 2**29, "cpu_threads": 2}
    engine = VllmEngine(**engine_settings(Config(stage="rlvr"), model) | changes)
    results = {}
    try:
        for label, (source, options) in CANDIDATES.items():
            if args.only and not any(o in label for o in args.only):
                continue
            start = time.perf_counter()
            held_out = load_prompts(source, tokenizer, 512, count=args.problems, seed=1_000_003, **options)
            prompts = held_out.prompts
            sampling = SamplingSettings(temperature=0.0, max_new_tokens=args.max_new_tokens, seed=0)
            replies = [group[0] for group in engine.generate([p.prompt_ids for p in prompts], 1, sampling)]
            texts = [c.text for c in replies]
            reward = [verify(p.task, t, p.answer) for p, t in zip(prompts, texts, strict=True)]
            lenient = [lenient_correct(p.task, t, p.answer) for p, t in zip(prompts, texts, strict=True)]
            strict = [strict_correct(p.task, t, p.answer) for p, t in zip(prompts, texts, strict=True)]
            n = len(prompts)
            results[label] = {
                "reward": sum(reward) / n,
                "lenient": sum(r >= 1 if x is None else x for x, r in zip(lenient, reward, strict=True)) / n,
                "strict": sum(r >= 1 if x is None else x for x, r in zip(strict, reward, strict=True)) / n,
                "mean_tokens": sum(len(c.token_ids) for c in replies) / n,
                "truncated": sum(c.finish_reason == "length" for c in replies) / n,
                "seconds": time.perf_counter() - start,
                "example": texts[0][:300],
            }
            print(json.dumps({label: results[label]}), flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
