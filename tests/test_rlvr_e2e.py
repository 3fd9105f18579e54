"""End to end on the real stack: `python -m icepop.train` with Ray, vLLM and DeepSpeed ZeRO-2 on 2 ranks.

The tiny default's RLVR: its SFT warm-up runs first (and is cached: a second run starts from it at
once), then a few RL steps. Asserts the
run directory's contents, that every required metric is present and finite each step, that the
weights changed, that engine and trainer agreed after every sync, that the final checkpoint loads in
transformers and in vLLM with identical log-probs, and that colocated engines give the same run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from backend_args import engine_args
from e2e_helpers import TINY_DEFAULT, Run, assert_same_steps, icepop_train
from safetensors.torch import load_file

from icepop.telemetry import read_histograms

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # whole runs of python -m icepop.train

REQUIRED = [
    "step",
    "reward/mean",
    "response_length/mean",
    "icepop/mask_frac",
    "icepop/mask_frac_low",
    "icepop/mask_frac_high",
    "mismatch/kl_k3",
    "mismatch/abs_logp_diff_mean",
    "actor/grad_norm",
    "actor/entropy",
    "sync/probe_abs_logp_diff",
    "perf/step_seconds",
    "perf/rollout_tokens_per_second",
]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tiny_default_run: Run, shared_cache: Path) -> dict[str, Any]:
    """The tiny default's RLVR (conftest.tiny_default_run): its SFT warm-up, then 3 RL steps from it."""
    (cached,) = (shared_cache / "sft").glob("*/icepop-cache.json")  # complete, written last
    rl = tiny_default_run.dir
    return {"first": tiny_default_run, "sft": rl / "sft-warmup", "rl": rl, "start": cached.parent}


def test_sft_run_directory(runs: dict[str, Any]) -> None:
    sft = rows(runs["sft"] / "metrics.jsonl")
    assert [r["step"] for r in sft] == [1, 2, 3, 4]
    assert all(math.isfinite(r["sft/loss"]) for r in sft)
    assert yaml.safe_load((runs["sft"] / "config.yaml").read_text())["stage"] == "sft"


def test_a_log_file_says_where_the_run_writes_and_shows_a_line_per_step(runs: dict[str, Any]) -> None:
    """Outside a terminal (here: captured, as under SLURM or nohup): the run directory first, one plain
    line per step, the final checkpoint last; the workers' own output goes to logs/ in the run."""
    out, rl = runs["first"].stdout, runs["rl"].resolve()
    assert f"icepop: run directory {rl} " in out and "\x1b[" not in out  # no colour codes in a file
    steps = [line for line in out.splitlines() if line.startswith("rlvr step ")]
    assert [line.split()[2] for line in steps] == ["1/3", "2/3", "3/3"]
    assert all(f" {key} " in line for line in steps for key in ("reward", "mismatch", "masked", "kl", "grad"))
    assert all(
        line.endswith(("s/step  ETA 0:00:00", "s/step  ETA 0:00:01")) or "ETA 0:" in line for line in steps
    )
    assert f"final checkpoint: {rl}/checkpoints/step-3" in out
    assert "EngineHost pid=" not in out and "TrainerHost pid=" not in out
    engine_logs = list((rl / "logs").glob("EngineHost-*.log"))
    assert engine_logs and len(list((rl / "logs").glob("TrainerHost-*.log"))) >= 2  # warm-up's ranks too
    assert "vllm" in engine_logs[0].read_text().lower()  # vLLM's own warnings landed there


def test_rl_metrics_present_and_finite_every_step(runs: dict[str, Any]) -> None:
    metrics = rows(runs["rl"] / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        missing = [k for k in REQUIRED if k not in m]
        assert not missing, f"step {m['step']} lacks {missing}"
        assert all(m[k] is not None and math.isfinite(m[k]) for k in REQUIRED), m
        assert 0.0 <= m["icepop/mask_frac"] <= 1.0 and m["actor/grad_norm"] > 0
        # fp32 engine and fp32 trainer on the same weights: agreement to float noise after each sync.
        assert m["sync/probe_abs_logp_diff"] < 1e-3
        assert m["mismatch/abs_logp_diff_mean"] < 1e-3
    # Step 1 trains the starting policy itself: its KL to the reference is 0 — at the sampling temperature
    # (scored at temperature 1, the reference would differ by the temperature alone, ≈ 0.1 here).
    assert metrics[0]["actor/kl"] < 1e-6 < metrics[-1]["actor/kl"]
    config = yaml.safe_load((runs["rl"] / "config.yaml").read_text())
    assert config["stage"] == "rlvr" and config["train"]["steps"] == 3
    evaluations = rows(runs["rl"] / "eval.jsonl")
    assert [e["step"] for e in evaluations] == [0, 3]
    # Mismatch telemetry: a log k histogram per step, the weights' ESS, masked-token entropy, the
    # staleness/mismatch split; no alert on an fp32 run (events.jsonl exists and stays empty).
    edges, histograms = read_histograms(runs["rl"])
    assert [h["step"] for h in histograms] == [1, 2, 3] and len(histograms[0]["counts"]) == len(edges) - 1
    tokens = [sum(h["counts"]) for h in histograms]
    assert all(t > 0 for t in tokens)
    for key in ("icepop/ess_frac", "icepop/masked_tokens_per_seq", "actor/entropy_masked",
                "staleness/update_drift_abs_log_ratio_mean",
                "staleness/rollout_gap_abs_log_ratio_mean"):  # fmt: skip
        assert all(math.isfinite(m[key]) for m in metrics), key
    assert all(m["icepop/ess_frac"] > 0.99 for m in metrics)  # fp32: k ≈ 1, nothing masked
    assert (runs["rl"] / "events.jsonl").read_text() == ""
    offline_runs = list((runs["rl"] / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].glob("*.wandb"))


def test_weights_changed_and_checkpoint_loads_in_transformers_and_vllm(runs: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icepop.rollout.vllm import VllmEngine

    final = runs["rl"] / "checkpoints" / "step-3"
    before, after = load_file(runs["start"] / "model.safetensors"), load_file(final / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True, return_dict=False
    ) + tokenizer.encode("42")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    expected = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    engine = VllmEngine(**engine_args(final, max_model_len=1024, cpu_threads=None))
    try:
        scored = torch.tensor(engine.score([ids], 1)[0], dtype=torch.float64)
    finally:
        engine.close()
    assert (scored - expected).abs().max() < 1e-4


def test_the_report_renders_from_the_recorded_run(runs: dict[str, Any], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "icepop.report", str(runs["rl"]), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "metrics.png").stat().st_size > 20_000 and (tmp_path / "histograms.png").is_file()
    assert "rl: icepop [0.5, 5.0], noise 0.0, float32 engine | 3 |" in (tmp_path / "report.md").read_text()


def test_the_tiny_default_runs_its_sft_warm_up_once_and_caches_it(
    runs: dict[str, Any], reference_run: Run
) -> None:
    assert "has no SFT checkpoint for countdown yet; running +recipe=sft first" in runs["first"].stdout
    assert (runs["start"] / "model.safetensors").is_file()
    # A later run with the same warm-up settings (the faults' reference, in the same cache) starts at once.
    assert (
        "running +recipe=sft first" not in reference_run.stdout and str(runs["start"]) in reference_run.stdout
    )
    assert json.loads((reference_run.dir / "summary.json").read_text())["stage"] == "rlvr"


def test_colocated_engines_give_the_same_run_with_weights_moved_in_process(
    runs: dict[str, Any], shared_cache: Path, tmp_path: Path
) -> None:
    """cluster.placement=colocated: each trainer rank's process hosts one of the two engines and hands it
    the new weights directly. Same seed, same steps as the disaggregated tiny default (engines of their
    own, weights broadcast): the same samples, rewards, losses and gradients."""
    result = icepop_train(
        tmp_path, *TINY_DEFAULT, "cluster.placement=colocated", "run.dir=rl", cache=shared_cache
    )
    assert "placement colocated: 2 trainer rank(s) × 1 CPU/0 GPU, each hosting one engine" in result.stdout
    placed = next(line for line in result.stdout.splitlines() if line.startswith("icepop placement:"))
    assert placed.startswith("icepop placement: trainer ranks 0, 1 on node") and "rollout" not in placed
    together, apart = rows(tmp_path / "rl" / "metrics.jsonl"), rows(runs["rl"] / "metrics.jsonl")
    assert_same_steps(together, apart, range(1, 4))
    for row in together:  # the in-process push is exact, and it was timed
        assert row["sync/probe_abs_logp_diff"] < 1e-5 and row["timing/sync_push_seconds"] > 0
    summaries = [json.loads((run / "summary.json").read_text()) for run in (tmp_path / "rl", runs["rl"])]
    assert summaries[0]["after"] == summaries[1]["after"]
