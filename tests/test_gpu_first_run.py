"""What a first run on a GPU host needs, decided by functions this CPU machine can run: the refusal of a
driver older than torch's CUDA (preflight and the smoke), `smoke --cpu` hiding the GPUs from its runs,
exact attention for float32 engines on GPUs (and the smoke's float32 row), the reference policy handing
back its cached GPU memory, and colocated ZeRO-3 leaving torch.nn.functional.linear alone for vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from dist_helpers import free_port
from test_devices import checked_config, rlvr

from icepop import smoke
from icepop.preflight import GpuFacts, check_driver, check_install, driver_problem, host_gpu_facts, nvml_gpus
from icepop.ray.engine_placement import Colocated, Disaggregated, engine_placement
from icepop.ray.workers import rank_settings
from icepop.rollout.precision import precision_env
from icepop.trainer.reference import release_cached_memory
from icepop.weights import TOLERANCE, probe_precision

OLD_DRIVER = GpuFacts("2.13.0+cu130", "13.0", 8, "570.133.20", torch_can_use_them=False)
"""A host with the CUDA 13.0 wheels and an R570 driver: NVML (and Ray) count 8 GPUs, CUDA refuses them."""


# ---- the driver ------------------------------------------------------------------------------------


def test_a_driver_older_than_torchs_cuda_is_refused_in_one_line_naming_the_driver_needed() -> None:
    line = driver_problem(OLD_DRIVER)
    assert line is not None and "\n" not in line
    assert "CUDA 13.x needs NVIDIA driver 580 or newer" in line and "570.133.20" in line
    assert "none of the 8 GPU(s)" in line
    cuda12 = driver_problem(
        OLD_DRIVER._replace(torch_version="2.9.0+cu128", torch_cuda="12.8", driver="520.61.05")
    )
    assert cuda12 is not None and "CUDA 12.x needs NVIDIA driver 525 or newer" in cuda12


def test_torch_refusing_gpus_a_new_enough_driver_shows_is_refused_too_without_blaming_the_driver() -> None:
    line = driver_problem(OLD_DRIVER._replace(driver="580.65.06"))
    assert line is not None and "needs NVIDIA driver" not in line
    assert "driver 580.65.06" in line and "torch.cuda.init()" in line


def test_a_sound_gpu_host_a_cpu_torch_and_a_host_without_gpus_pass() -> None:
    assert driver_problem(OLD_DRIVER._replace(driver="580.65.06", torch_can_use_them=True)) is None
    assert driver_problem(OLD_DRIVER._replace(torch_version="2.13.0+cpu", torch_cuda=None)) is None
    assert driver_problem(OLD_DRIVER._replace(nvml_gpus=0, driver=None)) is None  # or all hidden


def test_on_this_cpu_machine_the_driver_check_says_nothing() -> None:
    assert nvml_gpus() == (0, None)  # no NVML library: Ray counts no GPU either
    facts = host_gpu_facts()
    assert facts.torch_cuda == torch.version.cuda and facts.nvml_gpus == 0
    assert check_driver() is None and check_install() is None  # preflight runs the driver check


def test_the_smoke_refuses_a_driver_mismatch_before_any_run_but_not_with_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    refusal = driver_problem(OLD_DRIVER)
    ran: list[tuple[str, bool]] = []

    def run_case(case: smoke.Case, gpu: bool, gpus: int, base: Path) -> smoke.Outcome:
        ran.append((case.key, gpu))
        return smoke.Outcome(case.name, "pass")

    monkeypatch.setattr("icepop.preflight.check_driver", lambda: refusal)
    monkeypatch.setattr(smoke, "run_case", run_case)
    assert smoke.main(["--only", "disaggregated", "--dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == refusal and ran == []
    assert smoke.main(["--cpu", "--only", "disaggregated", "--dir", str(tmp_path)]) == 0
    assert ran == [("disaggregated", False)]


# ---- smoke --cpu -----------------------------------------------------------------------------------


def test_smoke_cpu_runs_see_no_gpu_and_gpu_runs_see_the_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert smoke.child_env(gpu=False)["CUDA_VISIBLE_DEVICES"] == ""
    assert smoke.child_env(gpu=True)["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert smoke.child_env(gpu=False)["PATH"] == os.environ["PATH"]  # the rest is the caller's


def test_a_cpu_smoke_run_is_started_with_the_gpus_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[dict[str, str]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        started.append(kwargs["env"])  # type: ignore[arg-type]
        return subprocess.CompletedProcess(command, 1, "", "the run's last line")

    monkeypatch.setattr(smoke.subprocess, "run", run)
    row = smoke.run_case(smoke.CASES[0], gpu=False, gpus=0, base=tmp_path)
    assert row.result == "FAIL: the run's last line"
    assert started[0]["CUDA_VISIBLE_DEVICES"] == ""


# ---- float32 engines on GPUs -----------------------------------------------------------------------


def test_only_a_float32_engine_on_a_gpu_asks_triton_for_exact_dot_products() -> None:
    assert precision_env("float32", on_gpu=True) == {"TRITON_F32_DEFAULT": "ieee"}
    assert precision_env("bfloat16", on_gpu=True) == {}  # 16-bit inputs: Triton's float32 default is moot
    assert precision_env("float32", on_gpu=False) == {}  # vLLM's CPU backend runs no Triton kernel
    precision_env("float32", on_gpu=True)["TRITON_F32_DEFAULT"] = "tf32"  # a copy: the default stays
    assert precision_env("float32", on_gpu=True) == {"TRITON_F32_DEFAULT": "ieee"}


def test_the_smoke_has_a_float32_row_held_to_the_float32_probe_limit(tmp_path: Path) -> None:
    (case,) = [c for c in smoke.CASES if c.engine_dtype == "float32"]
    assert case.gpus == 2
    config = checked_config(*smoke.command(case, True, tmp_path / case.key)[3:])
    assert config.rollout.dtype == "float32" and config.trainer.gpus_per_rank == 1
    assert TOLERANCE[probe_precision(config.rollout.dtype, config.model.dtype)] == 1e-3


# ---- the reference policy --------------------------------------------------------------------------


def test_the_reference_policy_hands_back_cached_memory_on_gpus_only() -> None:
    assert release_cached_memory(torch.device("cpu")) is False
    # On a CPU build torch.cuda.empty_cache() does nothing (CUDA never started): the decision is what runs.
    assert release_cached_memory(torch.device("cuda", 0)) is True


# ---- colocated ZeRO-3 ------------------------------------------------------------------------------

COLOCATED_ZERO3 = ("cluster.placement=colocated", "rollout.engines=2", "trainer.zero_stage=3")
NO_MEMORY_EFFICIENT_LINEAR = {"zero_optimization": {"memory_efficient_linear": False}}


def test_colocated_zero3_ranks_turn_memory_efficient_linear_off() -> None:
    colocated = rlvr(*COLOCATED_ZERO3)
    assert engine_placement(colocated) is Colocated
    assert Colocated.deepspeed_overrides(colocated) == NO_MEMORY_EFFICIENT_LINEAR
    assert Colocated.deepspeed_overrides(rlvr(*COLOCATED_ZERO3[:2])) == {}  # ZeRO-2: no zero.Init
    assert Disaggregated.deepspeed_overrides(rlvr("trainer.zero_stage=3")) == {}
    assert rank_settings(colocated, "m", "rl")["ds_config_overrides"] == NO_MEMORY_EFFICIENT_LINEAR
    assert rank_settings(colocated, "m", "sft")["ds_config_overrides"] == {}  # no engine in an SFT stage
    assert rank_settings(rlvr("trainer.zero_stage=3"), "m", "rl")["ds_config_overrides"] == {}


def test_the_users_own_deepspeed_overrides_are_kept_and_win() -> None:
    mine = "+trainer.ds_config_overrides.zero_optimization.stage3_param_persistence_threshold=0"
    settings = rank_settings(rlvr(*COLOCATED_ZERO3, mine), "m", "rl")
    assert settings["ds_config_overrides"]["zero_optimization"] == {
        "memory_efficient_linear": False,
        "stage3_param_persistence_threshold": 0,
    }
    forced = "+trainer.ds_config_overrides.zero_optimization.memory_efficient_linear=true"
    settings = rank_settings(rlvr(*COLOCATED_ZERO3, forced), "m", "rl")
    assert settings["ds_config_overrides"]["zero_optimization"]["memory_efficient_linear"] is True


LINEAR_SCRIPT = """
import importlib, json, os, sys

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
os.environ["MASTER_PORT"] = sys.argv[1]
importlib.import_module("torch._dynamo")  # before deepspeed, as the trainer does
import deepspeed
import torch

from icepop.models.tiny import build_tiny_model
from icepop.trainer.inputs import deepspeed_config
from icepop.trainer.models import load_model

importlib.import_module("deepspeed.ops").__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
folder = str(build_tiny_model(sys.argv[2], "dense"))
original, patched = torch.nn.functional.linear, {}
for name, overrides in json.loads(sys.argv[3]).items():  # the patch stays: the unpatched case goes first
    config = deepspeed_config(1, 1.0, 3, "float32", False, (1e-4, (0.9, 0.999), 1e-8), overrides)
    load_model(folder, "policy", "float32", config)  # its layers built under zero.Init, as a rank's are
    patched[name] = torch.nn.functional.linear is not original
print(json.dumps(patched))
"""


def test_a_colocated_zero3_model_load_leaves_torch_linear_to_the_engine(tmp_path: Path) -> None:
    overrides = {
        placement: rank_settings(
            rlvr("trainer.zero_stage=3", "rollout.engines=2", f"cluster.placement={placement}"), "m", "rl"
        )["ds_config_overrides"]
        for placement in ("colocated", "disaggregated")
    }
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(LINEAR_SCRIPT),
            str(free_port()),
            str(tmp_path / "m"),
            json.dumps(overrides),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    patched = json.loads(done.stdout.strip().splitlines()[-1])
    assert patched == {"colocated": False, "disaggregated": True}  # DeepSpeed's default patches it
