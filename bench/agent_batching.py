"""An agent's requests through icepop's OpenAI-compatible endpoint: batched into the engine, or one at a
time, against the same exchange as an environment's episodes.

The same episodes (two-digit multiplication; the model may write a ```python print(...)``` block and read
its value back before answering) run three ways through one in-process engine
(icepop.rollout.vllm.VllmEngine, 1 thread), on the rlvr-tools / agent SFT warm-up model:

  batched      icepop.rollout.agents.AgentRunner as a run uses it: the README's calculator agent
               (icepop.examples.calculator_agent, the official `openai` client over HTTP), every
               episode's agent at once, their requests batched into `generate` calls (a batch goes when
               every running agent waits on one, or 50 ms after its first request).
  one          the same runner with one request per `generate` call (max_batch=1): what an endpoint that
               forwards each request on its own would cost.
  environment  icepop.rollout.episodes.run_episodes with the built-in python_tool environment: the same
               exchange without HTTP or agent threads (its tool runs in the sandbox, a subprocess,
               where the agent's calculator is in-process Python).

Modes run interleaved, --repeats times each, after a warm-up run each; printed: the median seconds for
prompts × samples episodes, episodes/s, the ratio against `batched`, per-episode turns and model tokens,
and the engine's generate calls. Written to bench/results/agent_batching.json. Run it on an otherwise
idle machine.

    python bench/agent_batching.py                       # 8 prompts × 8 samples, 3 repeats
    python bench/agent_batching.py --prompts 2 --samples 2 --repeats 1      # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from multi_turn_batching import CONTEXT, LIMITS, MAX_NEW_TOKENS, find_model

from icepop.rollout.episodes import EpisodeSettings
from icepop.types import Completion, Prompt, SamplingSettings

RESULTS = Path(__file__).parent / "results" / "agent_batching.json"
AGENT = "icepop.examples.calculator_agent:agent"


class CountingEngine:
    """The engine, its `generate` calls and their prompts counted (everything else passed through)."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.calls, self.requests = engine, 0, 0

    def generate(self, prompt_ids: list[list[int]], samples: int, sampling: SamplingSettings) -> Any:
        self.calls += 1
        self.requests += len(prompt_ids)
        return self.engine.generate(prompt_ids, samples, sampling)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model folder (default: the newest SFT warm-up)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8, help="episodes per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from icepop.config import Config
    from icepop.data.prompts import load_prompts
    from icepop.envs import environment_factory
    from icepop.ray.engine_placement import engine_settings
    from icepop.rollout.agents import AgentRunner
    from icepop.rollout.episodes import run_episodes
    from icepop.rollout.vllm import VllmEngine

    model = args.model or find_model()
    tokenizer = AutoTokenizer.from_pretrained(model)
    loaded = load_prompts("arithmetic", tokenizer, 256, count=args.prompts, seed=5, digits=2, operators="*")
    prompts = loaded.prompts[: args.prompts]
    changes = {"dtype": "float32", "max_model_len": CONTEXT, "kv_cache_bytes": 64 * 2**20, "cpu_threads": 1}
    engine = CountingEngine(VllmEngine(**engine_settings(Config(stage="rlvr"), model) | changes))
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS)
    settings = EpisodeSettings(
        None, replace(LIMITS, step_timeout_seconds=120.0), model, None, (), CONTEXT, AGENT
    )
    batched, one = AgentRunner(settings), AgentRunner(settings, max_batch=1)
    python_tool = environment_factory("python_tool")

    def environment(group: list[Prompt], samples: int, seed: int) -> list[list[Completion]]:
        return run_episodes(
            engine, python_tool, tokenizer, group, samples, replace(sampling, seed=seed), LIMITS, CONTEXT
        )

    modes = {
        "batched": lambda group, samples, seed: batched.run(
            engine, group, samples, replace(sampling, seed=seed)
        ),
        "one": lambda group, samples, seed: one.run(engine, group, samples, replace(sampling, seed=seed)),
        "environment": environment,
    }
    total = args.prompts * args.samples
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    work: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for mode in modes.values():  # warm-up: first-call costs (sandbox, HTTP, prefix cache) stay out
        mode(prompts[:1], 2, 0)
    for repeat in range(args.repeats):
        for name, mode in modes.items():
            engine.calls = engine.requests = 0
            start = time.perf_counter()
            completions = [c for group in mode(prompts, args.samples, 1000 * (repeat + 1)) for c in group]
            elapsed = time.perf_counter() - start
            done = {
                "turns": statistics.mean(c.stats["turns"] for c in completions),
                "model_tokens": statistics.mean(sum(c.model_mask or []) for c in completions),
                "reward": statistics.mean(c.reward or 0.0 for c in completions),
                "errors": sum(c.stats["errors"] + c.stats["timeouts"] for c in completions),
                "generate_calls": engine.calls,
                "requests": engine.requests,
            }
            seconds[name].append(elapsed)
            work[name].append(done)
            print(
                f"repeat {repeat + 1} {name:12} {elapsed:7.2f} s for {len(completions)} episodes, "
                f"{done['turns']:.2f} turns/episode, {engine.requests} turns in {engine.calls} engine calls, "
                f"{done['errors']:.0f} errors or timeouts",
                flush=True,
            )
    engine.engine.close()

    base = statistics.median(seconds["batched"])
    results: dict[str, Any] = {
        "model": model,
        "episodes": total,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "modes": {},
    }
    print(f"\n{total} episodes, median of {args.repeats}")
    print(
        f"{'mode':12} {'seconds':>8} {'ep/s':>6} {'÷ batched':>9} {'turns':>6} {'tokens':>7} {'reward':>7} "
        f"{'calls':>6}"
    )
    for name in modes:
        median = statistics.median(seconds[name])
        mean = {k: statistics.mean(w[k] for w in work[name]) for k in work[name][0]}
        results["modes"][name] = {
            "seconds": median,
            "episodes_per_second": total / median,
            "ratio_to_batched": median / base,
            "all_seconds": seconds[name],
            **mean,
        }
        print(
            f"{name:12} {median:8.2f} {total / median:6.2f} {median / base:9.2f} {mean['turns']:6.2f} "
            f"{mean['model_tokens']:7.1f} {mean['reward']:7.2f} {mean['generate_calls']:6.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
