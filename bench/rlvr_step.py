"""Where an RLVR step spends its time, on the embedded default (or any overrides you pass).

Runs `python -m icepop.train +recipe=rlvr` for a few steps, then reads the run's metrics.jsonl and
prints the median seconds of each phase — generate, reward, old log-probs, train, sync — with its
share of the step (the ratio against the whole step, measured in the same run), and the rollout
throughput. The first step (start-up effects) is left out.

Then the rollout efficiency: raw vLLM (`vllm.LLM` in a process of its own) generates the same
batches — the run's model folder, its prompts in the order the run drew them, prompts_per_step ×
samples_per_prompt samples each, the same sampling (temperature, top-p/k, max_new_tokens, the
sampled token's log-prob, seeded like the run's engine) — with the engine arguments and thread count
of icepop's engine (icepop.rollout.vllm.VllmEngine, icepop.ray.engine_placement.engine_settings) and the
environment icepop gives its actors. Printed: icepop's median generate tok/s ÷ raw vLLM's (steps
2..N both). The gap is what icepop adds around the engine: Ray (task dispatch, result transfer),
Completion objects, the batch split across engines; both sides pay for the log-probs. `--no-raw-vllm`
skips it.

    python bench/rlvr_step.py                       # tiny dense model on countdown, CPU
    python bench/rlvr_step.py model=tiny-moe train.steps=8
    python bench/rlvr_step.py --no-raw-vllm model=smollm2-135m data=arithmetic
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from icepop.tracking import read_metrics

PHASES = ("generate", "reward", "old_logprobs", "train", "sync", "sync_push", "sync_probe")
"""timing/<phase>_seconds of each step; sync = sync_push (weights into every engine) + sync_probe."""
RAW_VLLM_FILE = "raw_vllm.json"


def raw_vllm(run_dir: Path) -> None:
    """Generate the run's batches with a bare vllm.LLM set up as icepop's engine is; write the tokens
    and seconds of each batch to run_dir/raw_vllm.json. Runs in its own process (one engine per
    process), started with the environment of icepop's actors (OMP_NUM_THREADS=1, in-process engine)."""
    import torch
    from omegaconf import OmegaConf

    from icepop.config import Config
    from icepop.ray.engine_placement import engine_settings
    from icepop.ray.staleness import batch_sampling
    from icepop.rollout.vllm import VllmEngine, _sampling_params
    from icepop.stages import setup, warmup

    loaded = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_dir / "config.yaml"))
    config = OmegaConf.to_object(loaded)
    assert isinstance(config, Config)
    steps = len(read_metrics(run_dir))
    model_path = warmup.policy_path(config, run_dir)  # cached by the run itself
    engine = engine_settings(config, model_path)
    # Built by icepop's own engine class, so the vllm.LLM has exactly its arguments and thread count;
    # only that bare LLM's generate is timed below, with icepop's sampling parameters.
    vllm_engine = VllmEngine(**engine)  # held: its finalizer shuts the LLM down
    llm = vllm_engine._llm
    batches, _ = setup.prompt_streams(config, setup.load_tokenizer(model_path, config.data))
    algo = config.algo
    results = []
    for step in range(1, steps + 1):
        prompts = batches.next_batch(algo.prompts_per_step)
        sampling = batch_sampling(config, step)  # the RL step's
        torch.manual_seed(sampling.seed)  # VllmEngine on CPU seeds torch's generator, not each request
        params = _sampling_params(sampling, algo.samples_per_prompt, seed=None)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p.prompt_ids} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for output in outputs for o in output.outputs)
        results.append({"step": step, "seconds": seconds, "tokens": tokens})
    settings = {k: v for k, v in engine.items() if k != "model_path"}
    info = {"batches": results, "threads": torch.get_num_threads(), "engine": settings}
    (run_dir / RAW_VLLM_FILE).write_text(json.dumps(info, indent=2))


def rollout_efficiency(run_dir: Path, icepop_tokens_per_second: float) -> None:
    """Run `raw_vllm` in a subprocess and print icepop's generate tok/s against it."""
    from icepop.ray.cluster import process_env

    env = {**os.environ, **process_env(on_gpu=False, local=True)}  # what icepop's engine actors get
    print("\nraw vLLM on the same model, batches and sampling:", flush=True)
    subprocess.run([sys.executable, __file__, "--raw-vllm-of", str(run_dir)], check=True, env=env)
    batches = json.loads((run_dir / RAW_VLLM_FILE).read_text())["batches"][1:]
    raw = statistics.median(b["tokens"] / b["seconds"] for b in batches)
    print(
        f"rollout efficiency: icepop {icepop_tokens_per_second:,.0f} generated tokens/s ÷ raw vLLM "
        f"{raw:,.0f} tokens/s = {icepop_tokens_per_second / raw:.1%} (medians of steps 2-{len(batches) + 1})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-raw-vllm", action="store_true", help="skip the rollout-efficiency comparison")
    parser.add_argument("--raw-vllm-of", type=Path, help=argparse.SUPPRESS)  # internal: the raw vLLM side
    parser.add_argument("overrides", nargs="*", help="icepop overrides, key=value")
    args = parser.parse_intermixed_args()
    if args.raw_vllm_of is not None:
        raw_vllm(args.raw_vllm_of)
        return
    overrides = args.overrides
    if not any(o.startswith("train.steps=") for o in overrides):
        overrides.append("train.steps=6")
    run_dir = Path(tempfile.mkdtemp(prefix="icepop-bench-")) / "run"
    command = [sys.executable, "-m", "icepop.train", "+recipe=rlvr", f"run.dir={run_dir}", *overrides]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    rows = read_metrics(run_dir)[1:]
    step = statistics.median(r["perf/step_seconds"] for r in rows)
    print(f"\nmedian over steps 2-{len(rows) + 1} of {' '.join(overrides)}")
    print(f"  {'phase':<14} {'seconds':>8} {'share':>7}")
    for phase in PHASES:
        seconds = statistics.median(r[f"timing/{phase}_seconds"] for r in rows)
        print(f"  {phase:<14} {seconds:>8.3f} {seconds / step:>7.1%}")
    print(f"  {'step':<14} {step:>8.3f} {1:>7.0%}")
    tokens = statistics.median(r["perf/rollout_tokens_per_second"] for r in rows)
    print(
        f"rollout: {tokens:,.0f} generated tokens/s; response length {rows[-1]['response_length/mean']:.1f}"
    )
    if not args.no_raw_vllm:
        rollout_efficiency(run_dir, tokens)


if __name__ == "__main__":
    main()
