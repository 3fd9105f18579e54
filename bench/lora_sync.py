"""How a LoRA-trained policy should reach the vLLM engine: merged full weights against vLLM's own LoRA.

The trainer side is a peft model (SmolLM2-135M-Instruct, float32, LoRA r=16, alpha=32 on every attention
and MLP projection); each sync gives its lora_B new seeded random values (normal, std 0.01), as a training
step would, and both options see the same sequence of adapters. Two engines, one after the other in this
process (vLLM allows one per process), with the same settings (icepop.rollout.vllm.VllmEngine's, 1 thread):

  vllm-lora  the engine is started with enable_lora=True, max_lora_rank=16, max_loras=1 (VllmEngine's
             own `LLM(...)` call, with those three kwargs added); a sync saves the peft adapter folder
             (`save_pretrained`: adapter_config.json + adapter_model.safetensors) and the next generate
             passes `LoRARequest(name, new id, folder)`, which makes vLLM load it. The load happens inside
             that generate, so it is timed with a 1-prompt, 1-token generate under the new request minus
             the same generate once the adapter is loaded (both after resetting the prefix cache);
             sync = save + that difference.
  merged     the engine has no LoRA: a sync computes W + B·A·scale for every adapted layer (peft's
             `get_delta_weight`, base parameter names), writes the full state dict as one safetensors
             file in /dev/shm with icepop's trainer writer (`icepop.trainer.export.write_weights_file`)
             and loads it with `VllmEngine.load_weights` (in-place reload, CPU kernels repacked): the
             path icepop's file weight sync takes. sync = merge + write + load.

Each option: one warm-up sync and generate, then --syncs timed syncs, each followed by one timed generate
of --prompts chat-templated arithmetic prompts × --new-tokens tokens (temperature 1, ignore_eos, the
sampled token's log-prob, seeded; the prefix cache is reset first, so every generate prefills its prompts).
Printed: the median sync seconds and generate tokens/s, and their ratio vllm-lora / merged. Correctness,
on the last sync's adapter: the sampled tokens' log-probs of each engine against the peft model's own
forward in transformers (the trainer's view), and vllm-lora's sampled tokens scored by the merged engine
(prompt_logprobs). If vLLM's LoRA fails, the error and the vLLM source line it comes from are reported
instead of its numbers. Written to bench/results/lora_sync.json. On a 2-core machine, run it with
nothing else busy (≈ 5 min here).

    python bench/lora_sync.py                      # 32 prompts × 64 tokens, 3 timed syncs per option
    python bench/lora_sync.py --prompts 4 --new-tokens 8 --syncs 1     # quick check
    python bench/lora_sync.py --model /path/to/hf/folder
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "lora_sync.json"
CONTEXT = 512
"""The engines' max_model_len (prompt + reply)."""
KV_CACHE_BYTES = 256 * 2**20


def build_policy(model_path: str, rank: int, alpha: int) -> Any:
    """The trainer's policy: the float32 base model with a fresh LoRA adapter on icepop's default targets
    (icepop.trainer.lora.add_adapters; lora_A seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from icepop.trainer.lora import add_adapters

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return add_adapters(base, "policy", rank=rank, alpha=alpha).eval()


def train_step(policy: Any, step: int, std: float) -> None:
    """Stand-in for an optimizer step: every lora_B weight gets new seeded normal(0, std) values."""
    import torch

    generator = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def merged_state(policy: Any) -> dict[str, Any]:
    """What icepop's trainer exports: the base names, W + ΔW (peft's delta) in every adapted layer."""
    import contextlib

    from icepop.trainer.export import TrainerWeights
    from icepop.trainer.lora import Adapters

    whole = lambda params: contextlib.nullcontext()  # noqa: E731  one process: nothing is sharded
    return TrainerWeights(policy, whole, True, Adapters(policy)).state()


def engine_args(model_path: str, threads: int) -> dict[str, Any]:
    """A float32 engine's arguments: the config schema's (icepop.ray.engine_placement) with this context."""
    from icepop.config import Config
    from icepop.ray.engine_placement import engine_settings

    changes = {
        "dtype": "float32",
        "max_model_len": CONTEXT,
        "kv_cache_bytes": KV_CACHE_BYTES,
        "cpu_threads": threads,
    }
    return engine_settings(Config(stage="rlvr"), model_path) | changes


def lora_engine(model_path: str, rank: int, threads: int) -> Any:
    """A VllmEngine whose `LLM(...)` call gets enable_lora=True, max_lora_rank, max_loras=1 on top of its
    own kwargs (so both engines differ in nothing else)."""
    import vllm

    from icepop.rollout.vllm import VllmEngine

    plain = vllm.LLM
    vllm.LLM = functools.partial(plain, enable_lora=True, max_lora_rank=rank, max_loras=1)
    try:
        return VllmEngine(**engine_args(model_path, threads))
    finally:
        vllm.LLM = plain


def generate(engine: Any, prompt_ids: list[list[int]], tokens: int, seed: int, lora: Any = None) -> Any:
    """One sample per prompt (VllmEngine.generate's CPU seeding, plus ignore_eos and the LoRA request):
    (seconds, token lists, sampled-token log-prob lists). The prefix cache is reset first."""
    import torch
    from vllm import SamplingParams

    llm = engine._llm
    llm.reset_prefix_cache()
    params = SamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=tokens, logprobs=0,
                            ignore_eos=True)  # fmt: skip
    torch.manual_seed(seed)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False,
                           lora_request=lora)  # fmt: skip
    seconds = time.perf_counter() - start
    samples = [out.outputs[0] for out in outputs]
    token_ids = [list(s.token_ids) for s in samples]
    logprobs = [[float(step[t].logprob) for t, step in zip(s.token_ids, s.logprobs, strict=True)]
                for s in samples]  # fmt: skip
    return seconds, token_ids, logprobs


def run_lora(args: argparse.Namespace, policy: Any, model_path: str, prompt_ids: list[list[int]],
             scratch: Path) -> dict[str, Any]:  # fmt: skip
    """vllm-lora: timed syncs and generates; the last generate's samples for the correctness check."""
    from vllm.lora.request import LoRARequest

    start = time.perf_counter()
    engine = lora_engine(model_path, args.rank, args.threads)
    result: dict[str, Any] = {"engine_start_seconds": time.perf_counter() - start, "syncs": []}
    try:
        for step in range(args.syncs + 1):  # step 0: warm-up
            train_step(policy, step, args.lora_std)
            folder = scratch / f"adapter-{step}"
            start = time.perf_counter()
            policy.save_pretrained(str(folder))
            write = time.perf_counter() - start
            request = LoRARequest(f"policy-{step}", step + 1, str(folder))
            first, *_ = generate(engine, prompt_ids[:1], 1, args.seed, request)  # loads the adapter
            loaded, *_ = generate(engine, prompt_ids[:1], 1, args.seed, request)
            seconds, token_ids, logprobs = generate(engine, prompt_ids, args.new_tokens, args.seed, request)
            sync = {"write": write, "load": first - loaded, "seconds": write + first - loaded,
                    "probe_first": first, "probe_loaded": loaded, "generate": seconds,
                    "bytes": sum(f.stat().st_size for f in folder.iterdir())}  # fmt: skip
            print(f"vllm-lora sync {step}{' (warm-up)' if step == 0 else ''}: save {write:.3f} s, "
                  f"load {first - loaded:.3f} s (probe {first:.3f} − {loaded:.3f}), generate {seconds:.2f} s",
                  flush=True)  # fmt: skip
            if step > 0:
                result["syncs"].append(sync)
        result["samples"] = (token_ids, logprobs)
    finally:
        engine.close()
    return result


def run_merged(args: argparse.Namespace, policy: Any, model_path: str, prompt_ids: list[list[int]],
               scratch: Path, score_these: list[list[int]] | None) -> dict[str, Any]:  # fmt: skip
    """merged: timed syncs and generates; scores `score_these` (full sequences) on the last weights."""
    from safetensors import safe_open

    from icepop.rollout.vllm import VllmEngine
    from icepop.trainer.export import write_weights_file

    start = time.perf_counter()
    engine = VllmEngine(**engine_args(model_path, args.threads))
    result: dict[str, Any] = {"engine_start_seconds": time.perf_counter() - start, "syncs": []}
    path = str(scratch / "weights.safetensors")
    try:
        for step in range(args.syncs + 1):
            train_step(policy, step, args.lora_std)
            start = time.perf_counter()
            state = merged_state(policy)
            merged = time.perf_counter()
            write_weights_file(policy.get_base_model(), state, path)
            written = time.perf_counter()
            if step == 0:  # load_weights refuses missing names; extra ones would be ignored: check both
                with safe_open(path, framework="pt") as f:
                    odd = set(f.keys()) ^ engine._checkpoint_names
                if odd:
                    raise RuntimeError(f"merged file and model differ in tensor names: {sorted(odd)[:5]}")
            engine.load_weights(path)
            loaded = time.perf_counter()
            del state
            seconds, token_ids, logprobs = generate(engine, prompt_ids, args.new_tokens, args.seed)
            sync = {"merge": merged - start, "write": written - merged, "load": loaded - written,
                    "seconds": loaded - start, "generate": seconds,
                    "bytes": os.path.getsize(path)}  # fmt: skip
            print(f"merged    sync {step}{' (warm-up)' if step == 0 else ''}: merge {sync['merge']:.3f} s, "
                  f"write {sync['write']:.3f} s, load {sync['load']:.3f} s, generate {seconds:.2f} s",
                  flush=True)  # fmt: skip
            if step > 0:
                result["syncs"].append(sync)
        result["samples"] = (token_ids, logprobs)
        if score_these:
            result["scores"] = engine.score(score_these, 1)
    finally:
        engine.close()
    return result


def where_in_vllm(error: BaseException) -> str:
    """The innermost traceback frame inside the vllm package: 'vllm/…/file.py:line in function'."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f"{os.sep}vllm{os.sep}" in f.filename]
    if not frames:
        return "(not inside vllm)"
    frame = frames[-1]
    return f"vllm{frame.filename.split(f'{os.sep}vllm', 1)[1]}:{frame.lineno} in {frame.name}"


def peft_logprobs(policy: Any, prompts: list[list[int]], replies: list[list[int]], batch: int) -> list[Any]:
    """The peft model's (transformers, float32) log-probs of each reply token given prompt + reply before
    it: right-padded batches (attention is causal, so padding cannot change a sequence's positions)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            rows = [p + r for p, r in zip(prompts[i : i + batch], replies[i : i + batch], strict=True)]
            width = max(map(len, rows))
            logits = policy(torch.tensor([row + [0] * (width - len(row)) for row in rows])).logits
            for row, prompt, logit in zip(rows, prompts[i : i + batch], logits, strict=True):
                step = logit[len(prompt) - 1 : len(row) - 1].double().log_softmax(-1)
                out.append(step.gather(-1, torch.tensor(row[len(prompt) :])[:, None])[:, 0])
    return out


def difference(a: list[list[float]], b: list[Any]) -> dict[str, float]:
    """max and mean |a − b| over every token of every sequence."""
    import torch

    every = torch.cat(
        [
            (torch.as_tensor(x, dtype=torch.float64) - torch.as_tensor(y)).abs()
            for x, y in zip(a, b, strict=True)
        ]
    )
    return {"max": float(every.max()), "mean": float(every.mean())}


def report(results: dict[str, Any]) -> None:
    """The table: median sync seconds, tokens/s, log-prob differences; ratios vllm-lora / merged."""
    print(
        f"\n{results['prompts']} prompts × {results['new_tokens']} tokens, median of {results['syncs']} syncs"
    )
    print(f"{'option':10} {'sync s':>8} {'tok/s':>8} {'max|Δ| vs peft':>15} {'sync parts (median s)'}")
    for name, option in results["options"].items():
        if "error" in option:
            print(f"{name:10} FAILED: {option['error']} (raised at {option['where']})")
            continue
        parts = ", ".join(f"{k} {v:.3f}" for k, v in option["sync_parts_median"].items())
        print(f"{name:10} {option['sync_seconds']:8.3f} {option['tokens_per_second']:8.1f} "
              f"{option['logprob_vs_peft']['max']:15.2e} {parts}")  # fmt: skip
    if "ratio_lora_to_merged" in results:
        ratio = results["ratio_lora_to_merged"]
        print(f"{'B/A':10} {ratio['sync_seconds']:8.2f} {ratio['tokens_per_second']:8.2f}")
    if "adapter_effect_vs_base" in results:
        effect = results["adapter_effect_vs_base"]
        print(f"adapter effect (peft vs its base on the sampled tokens), max |Δ log p|: {effect['max']:.2e}")
    if results.get("merged_vs_lora_on_lora_samples"):
        print(f"vllm-lora vs merged on vllm-lora's samples, max |Δ log p|: "
              f"{results['merged_vs_lora_on_lora_samples']['max']:.2e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--syncs", type=int, default=3, help="timed syncs per option, after one warm-up")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--lora-std", type=float, default=0.01, help="std of the random lora_B values")
    parser.add_argument("--threads", type=int, default=1, help="the engines' CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", nargs="+", default=["vllm-lora", "merged"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import peft
    import torch
    import vllm

    from icepop.data.prompts import load_prompts
    from icepop.stages.setup import load_tokenizer, smollm2_model
    from icepop.weights import shm_dir

    model_path = args.model or str(smollm2_model())
    tokenizer = load_tokenizer(model_path)
    prompts = load_prompts("arithmetic", tokenizer, 256, count=args.prompts, seed=5, digits=2).prompts
    prompt_ids = [p.prompt_ids for p in prompts[: args.prompts]]
    policy = build_policy(model_path, args.rank, args.alpha)
    trainable = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    targets = sorted(policy.peft_config["default"].target_modules)

    results: dict[str, Any] = {
        "model": model_path, "dtype": "float32", "vllm": vllm.__version__, "peft": peft.__version__,
        "lora": {"rank": args.rank, "alpha": args.alpha, "targets": targets, "parameters": trainable,
                 "lora_B_std": args.lora_std},
        "prompts": len(prompt_ids), "new_tokens": args.new_tokens, "syncs": args.syncs,
        "threads": args.threads, "cpus": os.cpu_count(), "options": {},
    }  # fmt: skip
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=shm_dir(), prefix="lora-sync-") as scratch:
        if "vllm-lora" in args.options:
            try:
                runs["vllm-lora"] = run_lora(args, policy, model_path, prompt_ids, Path(scratch))
            except Exception as error:  # reported instead of numbers
                traceback.print_exc()
                message = f"{type(error).__name__}: {error}".strip()
                runs["vllm-lora"] = {"error": message, "where": where_in_vllm(error)}
                print(f"vllm-lora FAILED: {message}\n  raised at {runs['vllm-lora']['where']}", flush=True)
        lora_samples = runs.get("vllm-lora", {}).get("samples")
        score_these = (
            [p + t for p, t in zip(prompt_ids, lora_samples[0], strict=True)] if lora_samples else None
        )
        if "merged" in args.options:
            runs["merged"] = run_merged(args, policy, model_path, prompt_ids, Path(scratch), score_these)

    # Correctness on the last sync's adapter (the policy still holds it), after both engines are closed.
    # The engines' thread count: with 2 threads after vLLM's CPU worker had bound this process's threads,
    # one such forward took 7 s instead of 0.4 s here.
    torch.set_num_threads(args.threads)
    tokens = len(prompt_ids) * args.new_tokens
    for name, run in runs.items():
        if "error" in run:
            results["options"][name] = {"error": run["error"], "where": run["where"]}
            continue
        token_ids, logprobs = run["samples"]
        start = time.perf_counter()
        trainer = peft_logprobs(policy, prompt_ids, token_ids, 8)
        print(f"peft forward on {name}'s samples: {time.perf_counter() - start:.1f} s", flush=True)
        syncs = run["syncs"]
        generate_seconds = statistics.median(s["generate"] for s in syncs)
        parts = [k for k in syncs[0] if k not in ("seconds", "generate", "bytes")]
        summary = {
            "sync_seconds": statistics.median(s["seconds"] for s in syncs),
            "tokens_per_second": tokens / generate_seconds,
            "generate_seconds": generate_seconds,
            "sync_parts_median": {k: statistics.median(s[k] for s in syncs) for k in parts},
            "sync_bytes": syncs[0]["bytes"],
            "engine_start_seconds": run["engine_start_seconds"],
            "all_syncs": syncs,
            "logprob_vs_peft": difference(logprobs, trainer),
        }
        if "adapter_effect_vs_base" not in results:
            with policy.disable_adapter():  # how far the adapter moves the base model: not a no-op
                base = peft_logprobs(policy, prompt_ids, token_ids, 8)
            results["adapter_effect_vs_base"] = difference(trainer, base)
        results["options"][name] = summary
    lora, merged = results["options"].get("vllm-lora", {}), results["options"].get("merged", {})
    if "sync_seconds" in lora and "sync_seconds" in merged:
        results["ratio_lora_to_merged"] = {
            "sync_seconds": lora["sync_seconds"] / merged["sync_seconds"],
            "tokens_per_second": lora["tokens_per_second"] / merged["tokens_per_second"],
        }
    if "scores" in runs.get("merged", {}):
        # vllm-lora's sampled tokens, scored by the merged engine (prompt_logprobs; the reply's positions).
        merged_scores = [scores[-args.new_tokens :] for scores in runs["merged"]["scores"]]
        results["merged_vs_lora_on_lora_samples"] = difference(runs["vllm-lora"]["samples"][1], merged_scores)
    report(results)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
