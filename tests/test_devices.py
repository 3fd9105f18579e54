"""Which devices a run's actors get, decided before anything reaches a GPU: capacity from the GPUs Ray
finds (never from what the run asked for), GPUs hidden from every actor that reserves none, the
reference policy's share of trainer rank 0's GPU, the refusal of a CPU run on a GPU cluster; and
`python -m icepop.smoke`, the first thing a GPU user runs (here on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from e2e_helpers import Run
from hydra import compose, initialize_config_dir

from icepop import smoke
from icepop.config import Config
from icepop.ray.bundles import REFERENCE_GPU_SHARE, check_capacity, describe_devices, gpu_requests
from icepop.ray.cluster import process_env
from icepop.train import CONF_DIR, prepare


def checked_config(*overrides: str) -> Config:
    """The config of `python -m icepop.train *overrides`, its inputs checked (reward importable, ...)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config, _ = prepare(compose(config_name="config", overrides=list(overrides)), list(overrides))
    return config


def rlvr(*overrides: str) -> Config:
    return checked_config("+recipe=rlvr", *overrides)


def test_a_run_without_gpus_on_a_cluster_with_gpus_is_refused_naming_cluster_gpu() -> None:
    cpu, gpu = rlvr(), rlvr("cluster=gpu")
    with pytest.raises(
        RuntimeError, match=r"the cluster has 8 GPUs but this run reserves none .* cluster=gpu"
    ):
        check_capacity(cpu, {"CPU": 64.0, "GPU": 8.0})
    with pytest.raises(RuntimeError, match=r"CUDA_VISIBLE_DEVICES= python -m icepop\.train"):
        check_capacity(cpu, [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}])
    check_capacity(cpu, {"CPU": 64.0})
    check_capacity(gpu, {"CPU": 64.0, "GPU": 8.0})
    with pytest.raises(RuntimeError, match="3 GPUs needed in all, 1 in the cluster"):  # the Dockerfile's CMD
        check_capacity(gpu, {"CPU": 64.0, "GPU": 1.0})


def test_the_reference_policy_reserves_a_share_of_trainer_rank_0s_gpu() -> None:
    rank, reference = gpu_requests(rlvr("cluster=gpu", "algo.kl_coef=0.01"))
    assert 0 < reference < rank < 1 and rank + reference == 1.0  # one bundle GPU, shared
    assert gpu_requests(rlvr("algo.kl_coef=0.01")) == (0.0, 0.0)
    assert "reference policy: 0.1 of trainer rank 0's GPU" in describe_devices(
        rlvr("cluster=gpu", "algo.kl_coef=0.01")
    )


def test_the_devices_line_says_where_each_role_runs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")  # a reward model folder, as preflight checks it
    assert describe_devices(rlvr()) == "rollout engines: CPU; trainer ranks: CPU"
    assert describe_devices(rlvr("cluster=gpu", f"reward.model_path={tmp_path}")) == (
        "rollout engines: 1 GPU each; trainer ranks: 1 GPU each; reward model workers: CPU"
    )
    colocated = rlvr("cluster=gpu", "cluster.placement=colocated", "rollout.engines=2", "algo.kl_coef=0.01")
    assert describe_devices(colocated) == (
        "rollout engines: inside the trainer ranks, on their devices; trainer ranks: 1 GPU each; "
        f"reference policy: {REFERENCE_GPU_SHARE:g} of trainer rank 0's GPU"
    )
    assert describe_devices(rlvr("cluster=gpu"), rollout=False) == "trainer ranks: 1 GPU each"  # SFT, RM


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cluster=gpu", "trainer.gpus_per_rank=2"], r"trainer.gpus_per_rank must be 0 \(CPU\) or 1"),
        (["reward.gpus_per_model_worker=2"], r"reward.gpus_per_model_worker must be 0 \(CPU\) or 1"),
        (["rollout.gpus_per_engine=1"], "rollout.weight_sync=broadcast needs the engines and the trainer"),
        (["cluster=gpu", "trainer.gpus_per_rank=0"], "same kind of device"),
    ],
)
def test_a_gpu_setting_that_could_not_work_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        rlvr(*overrides)


def test_engines_and_ranks_on_different_devices_may_share_weights_by_file() -> None:
    config = rlvr("rollout.gpus_per_engine=1", "rollout.weight_sync=file")
    assert describe_devices(config) == "rollout engines: 1 GPU each; trainer ranks: CPU"


DEVICES_SCRIPT = """
import json, os, ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from icepop.ray import cluster
from icepop.ray.bundles import gpu_requests
from icepop.train import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
    gpu = OmegaConf.to_object(compose(config_name="config", overrides=["+recipe=rlvr", "cluster=gpu",
                                                                       "algo.kl_coef=0.01"]))
found = {}
cluster.start(gpu)  # the run needs 3 GPUs; Ray counts this machine's: none
found["gpus"] = ray.cluster_resources().get("GPU", 0)
try:
    cluster.reserve(gpu)
except RuntimeError as error:
    found["refused"] = str(error)
visible = ray.remote(num_cpus=0)(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
found["cpu actor sees"] = ray.get(visible.remote())
cluster.shutdown()

# Told it has one GPU (only a test may: icepop never tells Ray a GPU count), Ray hands a trainer rank
# and the reference policy beside it, alive together on one trainer bundle, the same device.
ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, num_gpus=1, include_dashboard=False)
pg = ray.util.placement_group([{"CPU": 1.0, "GPU": 1.0}])
ray.get(pg.ready())
strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)


@ray.remote
class Probe:
    def visible(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES")


rank_gpus, reference_gpus = gpu_requests(gpu)
rank = Probe.options(num_cpus=1, num_gpus=rank_gpus, scheduling_strategy=strategy).remote()
reference = Probe.options(num_cpus=0, num_gpus=reference_gpus, scheduling_strategy=strategy).remote()
devices = ray.get([rank.visible.remote(), reference.visible.remote()], timeout=60)
found["rank and reference see"] = devices
ray.shutdown()
print(json.dumps(found))
"""


@pytest.mark.slow
@pytest.mark.ray("apart")  # shares no session run with the default group
def test_ray_counts_the_gpus_itself_and_hides_them_from_actors_that_reserve_none(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DEVICES_SCRIPT)], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["gpus"] == 0  # before: Ray took the run's 3 as given, and the engines died in vLLM
    assert (
        "the cluster is too small" in found["refused"]
        and "3 GPUs needed in all, 0 in the cluster" in found["refused"]
    )
    assert found["cpu actor sees"] == ""  # by default Ray leaves CUDA_VISIBLE_DEVICES unset: every GPU
    assert found["rank and reference see"] == ["0", "0"]
    assert process_env(on_gpu=True, local=False)["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"


def test_smoke_runs_compose_on_gpus_and_on_cpu_and_skip_what_the_machine_lacks(tmp_path: Path) -> None:
    for case in smoke.CASES:
        for gpu in (True, False):
            command = smoke.command(case, gpu, tmp_path / case.key)
            config = checked_config(*command[3:])
            assert (config.trainer.gpus_per_rank == 1) is gpu and config.train.steps == smoke.STEPS
            assert config.rollout.dtype == case.engine_dtype and not config.model.sft_warmup
    zero3 = next(case for case in smoke.CASES if case.key == "zero3")
    skipped = smoke.run_case(zero3, gpu=True, gpus=2, base=tmp_path)
    assert skipped.result == "skipped: needs 3 GPUs, 2 here"
    assert not (tmp_path / zero3.key).exists()


def test_a_failed_smoke_run_shows_its_error_line(tmp_path: Path) -> None:
    bad = smoke.Case("bad", "bad learning rate", 0, ("trainer.lr=-1",))
    row = smoke.run_case(bad, gpu=False, gpus=0, base=tmp_path)
    assert row.result.startswith("FAIL: ") and "trainer.lr must be > 0" in row.result
    assert "bad learning rate" in smoke.table([row], "title")


@pytest.mark.slow
@pytest.mark.ray
def test_the_smoke_table_reads_a_real_run(tiny_default_run: Run) -> None:
    case = smoke.CASES[0]
    row = smoke.outcome(case, 0, tiny_default_run.stdout, tiny_default_run.dir)
    rows = [json.loads(line) for line in (tiny_default_run.dir / "metrics.jsonl").read_text().splitlines()]
    assert row.result == "pass" and float(row.ready.removesuffix(" s")) > 0
    assert row.sync == "weights by broadcast from trainer rank 0 to 2 engine(s) over gloo"
    assert float(row.probe) == pytest.approx(max(r["sync/probe_abs_logp_diff"] for r in rows), rel=0.06)
    assert float(row.step_seconds) == pytest.approx(rows[-1]["perf/step_seconds"], abs=0.01)
    assert smoke.outcome(
        case, 0, tiny_default_run.stdout, tiny_default_run.dir / "missing"
    ).result.startswith("FAIL")


@pytest.mark.slow
@pytest.mark.ray("apart")  # shares no session run with the default group
def test_the_smoke_passes_on_cpu(tmp_path: Path, shared_cache: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "icepop.smoke", "--cpu", "--only", "colocated", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "ICEPOP_CACHE": str(shared_cache)},  # the tiny model, built once
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    title, header, row = done.stdout.strip().splitlines()[-3:]
    assert title.startswith("icepop smoke on CPU") and header.split()[:2] == ["run", "result"]
    assert row.startswith("colocated, 1 rank") and " pass " in row
    assert "weights in-process from each trainer rank to its own engine (1 engine(s))" in row
    metrics = [
        json.loads(line) for line in (tmp_path / "colocated" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(metrics) == smoke.STEPS and all(m["actor/grad_norm"] > 0 for m in metrics)  # real updates
