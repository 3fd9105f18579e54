"""Where the start-up of a run goes: the tiny default (`python -m icepop.train +recipe=rlvr`, its SFT
warm-up cached) launched as a user launches it, each line of its output time-stamped as it arrives,
the time from launch to the first step's start split into phases by the lines that end them.

    python bench/startup.py                      # 3 launches on a fresh local Ray cluster each
    python bench/startup.py --reuse              # and 3 joining one `ray start` cluster (cluster.address)
    python bench/startup.py --runs 1 -- rollout.engines=2     # trailing icepop overrides

The phases (each from the end of the one before):
  config      launch → the run directory line: Python, imports, Hydra, every check of the config;
  data        → the data line: tokenizer, prompts, the held-out reward check;
  warm-up     → the model line: the SFT warm-up found in the cache (built when missing: run once first);
  ray         → the placement line: a local Ray cluster started (or joined) and the bundles reserved;
  workers     → the workers-ready line: engine and trainer actors started (vLLM, DeepSpeed), connected;
  first eval  → the step-0 accuracy line: the first weight sync and probe, the held-out evaluation.
The first step starts right after the last. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from icepop.ray.hosts import free_port

ROOT = Path(__file__).resolve().parent.parent
PHASES = {  # phase: the start of the line that ends it
    "config": "icepop: run directory",
    "data": "icepop data:",
    "warm-up": "icepop rlvr: model",
    "ray": "icepop placement:",
    "workers": "icepop rlvr: workers ready",
    "first eval": "step 0: held-out",
}
COMMAND = ["+recipe=rlvr", "train.steps=1", "train.checkpoint_every=0"]


def launch(overrides: list[str], run_dir: Path) -> dict[str, float]:
    """Seconds of each phase of one launch (stopped once the first step starts)."""
    command = [sys.executable, "-m", "icepop.train", *COMMAND, *overrides, f"run.dir={run_dir}"]
    started = time.perf_counter()
    ends: dict[str, float] = {}
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=os.environ | {"PYTHONUNBUFFERED": "1"}) as proc:  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            for phase, prefix in PHASES.items():
                if phase not in ends and line.startswith(prefix):
                    ends[phase] = time.perf_counter() - started
        code = proc.wait()
    missing = [p for p in PHASES if p not in ends]
    if code or missing:
        raise SystemExit(f"the run failed ({code}) or printed no line for {missing}: {' '.join(command)}")
    marks = [0.0, *ends.values()]
    return {phase: marks[i + 1] - marks[i] for i, phase in enumerate(PHASES)} | {"total": marks[-1]}


@contextlib.contextmanager
def running_cluster(work: Path) -> Iterator[str]:
    """A `ray start --head --block` node on 127.0.0.1 with its own temp dir (the way docs/cluster.md
    starts one) while inside; its address. SIGINT to `ray start --block` stops exactly its processes."""
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=5",
         "--include-dashboard=false", f"--temp-dir={work / 'ray'}", "--disable-usage-stats"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(10)  # up before the first launch joins it (not counted: the cluster is already running)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGINT)
        head.wait(timeout=60)


def launches(overrides: list[str], count: int, name: str, work: Path) -> None:
    runs = [launch(overrides, work / str(i)) for i in range(count)]
    print(f"\n{name}: median of {count} launches, seconds", flush=True)
    for phase in [*PHASES, "total"]:
        values = [r[phase] for r in runs]
        each = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {phase:<12} {statistics.median(values):6.1f}   ({each})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="also join one running cluster")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="icepop-startup-"))
    try:
        launch(args.overrides, work / "prepare")  # builds the SFT warm-up when the cache lacks it
        launches(args.overrides, args.runs, "fresh local cluster", work / "fresh")
        if args.reuse:
            with running_cluster(work) as address:
                joined = [*args.overrides, f"cluster.address={address}"]
                launches(joined, args.runs, f"joining a running cluster ({address})", work / "joined")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
