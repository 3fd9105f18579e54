"""model.dtype=float16: the DeepSpeed config it builds (fp16 with dynamic loss scaling, DeepSpeed's own
defaults, never beside bf16), its refusal before Ray where DeepSpeed cannot train float16 on this CPU
(DeepSpeed's own accelerator test), and the accounting that keeps a loss-scale overflow — a float16 run's
first steps skip updates until the scale drops below 2^16 — from counting as a NaN step. No process group
starts here: a float16 engine step needs a GPU (or a CPU with oneDNN float16), so DeepSpeed's own side
runs only as far as its config parser and accelerator."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray
import torch
from hydra import compose, initialize_config_dir

from icepop.config import Config, checks
from icepop.config.checks import check_trainer_dtype, cpu_trains_float16
from icepop.errors import RunStopped
from icepop.stages.rl_run import count_nonfinite
from icepop.stages.step_metrics import mean_over_ranks
from icepop.train import CONF_DIR, prepare
from icepop.trainer.inputs import FP16_LOSS_SCALING, check_args, deepspeed_config, skipped_step

ADAMW = (1e-4, (0.9, 0.999), 1e-8)


def ds_config(dtype: str, overrides: dict | None = None) -> dict:
    return deepspeed_config(2, 1.0, 2, dtype, False, ADAMW, overrides)


def test_float16_gets_dynamic_loss_scaling_and_no_other_dtype_enables_fp16() -> None:
    half = ds_config("float16")
    assert half["fp16"] == {"enabled": True, **FP16_LOSS_SCALING} and half["fp16"]["loss_scale"] == 0
    assert half["bf16"] == {"enabled": False}
    assert ds_config("bfloat16")["fp16"] == {"enabled": False} and ds_config("bfloat16")["bf16"]["enabled"]
    assert ds_config("float32")["fp16"] == {"enabled": False} == ds_config("float32")["bf16"]
    # trainer.ds_config_overrides still win, key by key
    assert ds_config("float16", {"fp16": {"initial_scale_power": 12}})["fp16"]["initial_scale_power"] == 12
    assert ds_config("float16", {"fp16": {"initial_scale_power": 12}})["fp16"]["hysteresis"] == 2


DEEPSPEED_SIDE = """
import importlib, json, sys
importlib.import_module("torch._dynamo")  # before deepspeed, as the trainer does
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.precision_config import DeepSpeedFP16Config
from icepop.config.checks import cpu_trains_float16
from icepop.trainer.inputs import deepspeed_config

parsed = {}
for dtype in ("float16", "bfloat16", "float32"):
    config = DeepSpeedConfig(deepspeed_config(2, 1.0, 2, dtype, False, (1e-4, (0.9, 0.999), 1e-8), None))
    fp16 = config.float16_config
    parsed[dtype] = [fp16.enabled, config.bfloat16_config.enabled, fp16.loss_scale,
                     fp16.dynamic_loss_scale_args()]
print(json.dumps({
    "parsed": parsed,
    "defaults": DeepSpeedFP16Config(enabled=True).dynamic_loss_scale_args(),
    "accelerator": get_accelerator().device_name(),
    "same_test": bool(get_accelerator().is_fp16_supported()) == cpu_trains_float16(),
}))
"""


def test_deepspeed_reads_the_block_as_its_default_dynamic_scaling_and_tests_fp16_as_icepop_does() -> None:
    """DeepSpeed's own parser (no process group) reads the float16 config as dynamic loss scaling with
    exactly its default arguments; and its CPU accelerator's fp16 answer is icepop's refusal test's."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}  # as a CPU rank sets it
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_SIDE], capture_output=True, text=True, env=env,
                          timeout=120, cwd=Path(__file__).parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    enabled, bf16, loss_scale, arguments = found["parsed"]["float16"]
    assert enabled and not bf16 and loss_scale == 0.0 and arguments == found["defaults"]
    assert found["parsed"]["bfloat16"][:2] == [False, True] and found["parsed"]["float32"][:2] == [
        False,
        False,
    ]
    assert found["accelerator"] == "cpu" and found["same_test"]


def compose_config(*overrides: str, recipe: str = "rlvr") -> Config:
    """`python -m icepop.train +recipe=… …`'s config, or SystemExit with its one-line message."""
    given = [f"+recipe={recipe}", *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config, _ = prepare(compose(config_name="config", overrides=given), given)
    return config


def refusal(*overrides: str, recipe: str = "rlvr") -> str:
    with pytest.raises(SystemExit) as stopped:
        compose_config(*overrides, recipe=recipe)
    assert not ray.is_initialized(), "Ray was started"
    message = stopped.value.code
    assert isinstance(message, str) and message.startswith("icepop: invalid configuration: ")
    return message


def test_float16_on_cpu_ranks_is_refused_before_ray_where_deepspeed_cannot_train_it() -> None:
    if cpu_trains_float16():  # a CPU with oneDNN float16 (AVX512-FP16/AMX-FP16): DeepSpeed trains it
        assert compose_config("model.dtype=float16").model.dtype == "float16"
        return
    message = refusal("model.dtype=float16")
    for named in ("model.dtype=float16", "model.dtype=bfloat16 or float32", "float16 on GPUs (cluster=gpu)"):
        assert named in message, message
    assert refusal("model.dtype=float16", recipe="sft") == message  # every stage that trains
    with pytest.raises(ValueError, match=r"model\.dtype=float16 cannot train on this CPU"):
        check_args(1, "float16", 1, "constant", None, "policy")  # a rank built directly: the same check


def test_float16_is_accepted_with_gpu_ranks_or_where_no_trainer_runs() -> None:
    assert compose_config("model.dtype=float16", "cluster=gpu").model.dtype == "float16"
    evaluation = compose_config("model.dtype=float16", "model.sft_warmup=false", recipe="eval")
    assert evaluation.stage == "eval" and evaluation.model.dtype == "float16"  # only engines run


def test_the_refusal_follows_deepspeeds_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    for answer in (True, False):
        monkeypatch.setattr(checks, "cpu_trains_float16", lambda answer=answer: answer)
        check_trainer_dtype("float16", on_gpu=True)
        for dtype in ("float32", "bfloat16"):
            check_trainer_dtype(dtype, on_gpu=False)
        if answer:
            check_trainer_dtype("float16", on_gpu=False)
        else:
            with pytest.raises(ValueError, match=r"model\.dtype=float16"):
                check_trainer_dtype("float16", on_gpu=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU rank: no CPU test
    check_args(1, "float16", 1, "constant", None, "policy")


@pytest.mark.parametrize(
    ("skipped", "loss_scaling", "loss", "nonfinite", "overflow"),
    [
        (False, True, 1.5, 0.0, 0.0),  # applied
        (False, False, 1.5, 0.0, 0.0),
        (True, True, 1.5, 0.0, 1.0),  # float16: the gradient overflowed at this scale
        (True, True, math.nan, 1.0, 0.0),  # float16 too: a NaN loss is a failure whatever the scale
        (True, True, math.inf, 1.0, 0.0),
        (True, False, 1.5, 1.0, 0.0),  # float32/bfloat16: a NaN gradient at a finite loss
        (True, False, math.nan, 1.0, 0.0),
    ],
)
def test_a_skipped_step_is_an_overflow_only_under_loss_scaling_at_a_finite_loss(
    skipped: bool, loss_scaling: bool, loss: float, nonfinite: float, overflow: float
) -> None:
    assert skipped_step(skipped, loss_scaling, loss) == {
        "nonfinite_skipped": nonfinite,
        "overflow_skipped": overflow,
    }


def driver(max_nonfinite_steps: int) -> Any:
    """The parts of an RL run `count_nonfinite` touches."""
    return SimpleNamespace(
        config=SimpleNamespace(train=SimpleNamespace(max_nonfinite_steps=max_nonfinite_steps)),
        nonfinite_streak=0,
        telemetry=SimpleNamespace(event=lambda *args, **kwargs: None),
        tracker=SimpleNamespace(print=lambda *args: None),
        run_dir=Path("/nonexistent/run"),
    )


def step_metrics(skipped: bool, loss: float, ranks: int = 2) -> dict[str, float]:
    """What the RL stage reads of a float16 step: every rank's `_step` metrics, averaged over ranks."""
    per_rank = [{f"actor/{k}": v for k, v in skipped_step(skipped, True, loss).items()}] * ranks
    return mean_over_ranks(per_rank)


def test_a_float16_runs_first_overflow_skips_do_not_stop_it_but_nan_losses_still_do() -> None:
    """From 2^16 the scale may take many skipped steps to fit; train.max_nonfinite_steps=3 stops only
    steps whose loss was NaN (the RL stage's own call, icepop.stages.rl)."""
    run = driver(max_nonfinite_steps=3)
    for step in range(1, 12):  # ten overflow skips, then an applied step
        metrics = step_metrics(skipped=step <= 10, loss=0.7)
        assert metrics["actor/overflow_skipped"] == float(step <= 10)
        count_nonfinite(run, step, skipped=metrics["actor/nonfinite_skipped"] > 0)
    assert run.nonfinite_streak == 0
    with pytest.raises(RunStopped, match=r"train\.max_nonfinite_steps=3"):
        for step in range(12, 15):
            metrics = step_metrics(skipped=True, loss=math.nan)
            assert metrics["actor/overflow_skipped"] == 0.0
            count_nonfinite(run, step, skipped=metrics["actor/nonfinite_skipped"] > 0)
    assert run.nonfinite_streak == 3
