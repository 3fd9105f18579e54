"""`python -m icepop.report` on two small run directories written the way a run writes them (config.yaml,
metrics.jsonl, histograms.jsonl and events.jsonl through icepop.telemetry): PNG plots and a Markdown
summary naming each run's correction and mismatch level, with the alerts it raised."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from test_config import compose_config

from icepop.telemetry import Telemetry

PNG = b"\x89PNG\r\n\x1a\n"


def record_run(run_dir: Path, correction: str, noise: float, drift: float) -> None:
    """A 12-step run whose mismatch grows by `drift` per step (a collapsing run when drift > 0)."""
    run_dir.mkdir(parents=True)
    config = compose_config(
        "+recipe=rlvr", f"algo.correction={correction}", f"rollout.mismatch_noise={noise}"
    )
    OmegaConf.save(OmegaConf.structured(config), run_dir / "config.yaml")
    telemetry = Telemetry(run_dir, threshold=0.05, window=6)
    g = torch.Generator().manual_seed(0)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step in range(1, 13):
            scale = 0.01 + drift * step
            metrics = {
                "step": step, "reward/mean": 0.1 + 0.02 * step - 0.5 * drift * step**2,
                "actor/grad_norm": 1 + drift * step**2,
                "mismatch/abs_logp_diff_mean": scale, "mismatch/abs_logp_diff_max": 10 * scale,
                "mismatch/rel_prob_diff_mean": scale, "mismatch/kl_k3": scale**2 / 2,
                "icepop/mask_frac": 0.02 - 0.15 * drift * step, "icepop/mask_frac_low": 0.01,
                "icepop/mask_frac_high": 0.01, "response_length/mean": 20.0 + step,
            }  # fmt: skip
            f.write(json.dumps(metrics) + "\n")
            delta = scale * torch.randn(4, 16, generator=g)
            telemetry.record(step, delta, torch.ones(4, 16, dtype=torch.bool), metrics)


def test_report_renders_plots_and_a_summary_of_two_runs(tmp_path: Path) -> None:
    record_run(tmp_path / "stable", "icepop", 0.0, drift=0.0)
    record_run(tmp_path / "collapsing", "none", 0.02, drift=0.01)
    (tmp_path / "stable" / "eval.jsonl").write_text(
        '{"step": 0, "eval/accuracy": 0.1, "eval/accuracy_lenient": 0.2}\n'
        '{"step": 12, "eval/accuracy": 0.3, "eval/accuracy_lenient": 0.5}\n'
    )
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "icepop.report", str(tmp_path / "stable"), str(tmp_path / "collapsing"),
         "--out", str(out)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in ("metrics.png", "histograms.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000, name  # a real figure, not an empty canvas
    text = (out / "report.md").read_text()
    assert "stable: icepop [0.5, 5.0], noise 0.0, float32 engine" in text
    assert "collapsing: none, noise 0.02, float32 engine" in text
    stable_row = next(line for line in text.splitlines() if line.startswith("| stable"))
    collapsing_row = next(line for line in text.splitlines() if line.startswith("| collapsing"))
    assert stable_row.endswith("| none |")  # silent on the stable run
    assert "| 0.200 → 0.500 |" in stable_row and "| — |" in collapsing_row  # held-out, lenient reading
    # mean |k − 1| = 0.01 + 0.01·step first exceeds 0.05 at step 5; the mask falls as KL rises from step 6
    assert "mismatch_above_threshold @ 5, mask_falls_while_kl_rises @ 6" in collapsing_row
    assert "![metrics](metrics.png)" in text


def test_report_refuses_a_directory_that_is_not_an_rl_run(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "icepop.report", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "has no config.yaml" in done.stderr


def test_the_metrics_figure_has_the_training_health_panels_on_whole_steps() -> None:
    from icepop.report import metrics_figure, pyplot

    rows = [{"step": step, "reward/mean": 0.1 * step, "actor/entropy": 1.0, "actor/kl": 1e-3 * step,
             "reward/zero_variance_group_frac": 0.25, "response_length/truncated_frac": 0.5}
            for step in (1, 2, 3)]  # fmt: skip
    fig = metrics_figure({"run": rows})
    titles = {ax.get_title(): ax for ax in fig.axes}
    for title in (
        "policy entropy (sampled tokens)",
        "KL to the reference policy (algo.kl_coef > 0)",
        "groups with one reward for all (train nothing)",
        "replies cut at rollout.max_new_tokens",
    ):
        assert len(titles[title].lines[0].get_xdata()) == 3, title  # fmt: skip
    ticks = titles["policy entropy (sampled tokens)"].get_xticks()
    assert len(ticks) > 1 and all(float(t).is_integer() for t in ticks)
    pyplot().close(fig)


def test_a_trust_region_run_is_labelled_with_its_threshold_and_anchor(tmp_path: Path) -> None:
    from icepop.report import run_label

    config = compose_config("+recipe=rlvr", "algo.correction=trm", "algo.anchor=old")
    (tmp_path / "trm").mkdir()
    OmegaConf.save(OmegaConf.structured(config), tmp_path / "trm" / "config.yaml")
    assert run_label(tmp_path / "trm") == "trm: trm δ=1.60944, anchor old, noise 0.0, float32 engine"
