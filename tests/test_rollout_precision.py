"""Rollout precisions: FP8 weight rounding (icepop.rollout.fp8) against a float64 reference, the weights
it touches, the config's refusals, the probe's precisions, and float16 / FP8-simulated vLLM engines on
CPU whose probe passes after a push and fails with stale weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from backend_args import engine_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from icepop.config import RolloutConfig
from icepop.models.tiny import build_tiny_model
from icepop.rollout.fp8 import FP8_MAX, fp8_engine_kwargs, fp8_layer, fp8_round, with_fp8_rounding
from icepop.rollout.vllm import VllmEngine
from icepop.weights import (
    TOLERANCE,
    ProbeDifference,
    WeightSyncError,
    check_probe,
    probe_difference,
    probe_precision,
)


def e4m3_reference(x: torch.Tensor) -> torch.Tensor:
    """x (float64, |x| ≤ 448) rounded to the nearest FP8 E4M3 value, ties to even, by hand: 3 mantissa
    bits above 2^-6, steps of 2^-9 below (subnormals)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-6)))
    step = torch.exp2(exponent - 3)
    return torch.round(x / step) * step  # torch.round rounds half to even


def test_fp8_round_matches_a_float64_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(48, 40, generator=generator) * 0.02, torch.randn(16, 40, generator=generator)]
    weights[0][3, 5] = 1e-9  # far below the smallest step: rounds to zero
    for dtype in (torch.bfloat16, torch.float16):
        rounded = fp8_round(weights, dtype)
        stored = [w.to(dtype).double() for w in weights]
        amax = max(float(w.abs().max()) for w in stored)
        scale = amax / FP8_MAX  # one scale for the layer: the larger part's amax sets it
        for w, r in zip(stored, rounded, strict=True):
            assert r.dtype == dtype and r.shape == w.shape
            reference = (e4m3_reference(w / scale) * scale).to(dtype).double()
            # vLLM multiplies by 1 / scale in float32: a value on a midpoint may round the other way.
            assert (r.double() == reference).float().mean() > 0.999
            # Round trip: within half an E4M3 step (relative 2^-4), plus the final 16-bit rounding.
            half_step = torch.exp2(torch.floor(torch.log2((w / scale).abs().clamp_min(2.0**-6))) - 4) * scale
            assert ((r.double() - w).abs() <= half_step + w.abs() * 2.0**-7 + 1e-12).all()
            assert len(torch.unique(r)) <= 255  # FP8 has 253 finite values and ±0
        assert float(rounded[1].double().abs().max()) == pytest.approx(amax, rel=2**-7)  # amax ↦ ±448 exactly
        assert rounded[0][3, 5] == 0
    assert fp8_round([torch.zeros(4, 4)], torch.bfloat16)[0].eq(0).all()  # an all-zero layer stays zero


def test_fused_layers_share_one_scale_and_arrive_whole() -> None:
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(8, 16, generator=generator) * s for s in (0.01, 0.5, 0.02))
    norm = torch.ones(16)
    stream = [("m.l.0.self_attn.q_proj.weight", q), ("m.l.0.input_layernorm.weight", norm),
              ("m.l.0.self_attn.k_proj.weight", k), ("m.l.0.self_attn.v_proj.weight", v)]  # fmt: skip
    out = list(with_fp8_rounding(iter(stream), torch.bfloat16))
    assert [name for name, _ in out] == [stream[1][0], stream[0][0], stream[2][0], stream[3][0]]
    shared = fp8_round([q, k, v], torch.bfloat16)
    assert all(torch.equal(t, s) for (_, t), s in zip(out[1:], shared, strict=True))
    assert not torch.equal(out[1][1], fp8_round([q], torch.bfloat16)[0])  # k's scale, not q's own
    assert out[0][1] is norm
    # Parts of a fused layer that never complete go out at the end, still rounded.
    (only,) = with_fp8_rounding(iter([("a.q_proj.weight", q)]), torch.bfloat16)
    assert torch.equal(only[1], fp8_round([q], torch.bfloat16)[0])


@pytest.mark.parametrize("architecture", ["dense", "moe"])
def test_rounding_touches_exactly_the_linear_weights(architecture: str, tmp_path: Path) -> None:
    state = load_file(build_tiny_model(tmp_path, architecture) / "model.safetensors")
    rounded = dict(with_fp8_rounding(iter(state.items()), torch.bfloat16))
    assert rounded.keys() == state.keys()
    changed = {name for name in state if not torch.equal(rounded[name], state[name])}
    linear = {name for name in state if name.endswith(("_proj.weight",))}
    assert changed == linear and len(linear) >= 7 * 4
    assert {fp8_layer(name) is not None for name in linear} == {True}
    untouched = set(state) - linear  # embeddings, norms, biases, the router: passed on as they came
    assert any(name.endswith("embed_tokens.weight") for name in untouched)
    assert all(rounded[name] is state[name] for name in untouched)
    if architecture == "moe":
        assert any(".experts." in name for name in changed)
        assert any(name.endswith("mlp.gate.weight") for name in untouched)
    assert all(len(torch.unique(rounded[name])) <= 255 for name in changed)


def test_the_gpu_path_is_vllms_online_per_tensor_fp8_without_routers() -> None:
    assert fp8_engine_kwargs(None, on_cpu=False) == {} and fp8_engine_kwargs("fp8", on_cpu=True) == {}
    kwargs = fp8_engine_kwargs("fp8", on_cpu=False)
    from vllm.config.quantization import _ONLINE_SHORTHANDS, resolve_quantization_config
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer

    # What vLLM's EngineArgs makes of them (engine/arg_utils.py): the per-tensor scheme, routers ignored.
    args = resolve_quantization_config(kwargs["quantization"], kwargs["quantization_config"])
    assert args.linear == _ONLINE_SHORTHANDS["fp8_per_tensor"].linear
    assert args.moe == _ONLINE_SHORTHANDS["fp8_per_tensor"].moe
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    layers = ("mlp.gate", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.experts", "mlp.down_proj")
    ignored = {name: should_ignore_layer(f"model.layers.0.{name}", args.ignore, fused, use_fnmatch=True)
               for name in layers}  # fmt: skip
    assert ignored == {"mlp.gate": True, "self_attn.qkv_proj": False, "mlp.gate_up_proj": False,
                       "mlp.experts": False, "mlp.down_proj": False}  # fmt: skip


def test_rollout_precisions_in_the_config() -> None:
    assert RolloutConfig(dtype="float16").dtype == "float16"
    assert RolloutConfig(dtype="bfloat16", quantization="fp8").quantization == "fp8"
    with pytest.raises(ValueError, match=r"rollout\.quantization=fp8 needs a 16-bit engine"):
        RolloutConfig(dtype="float32", quantization="fp8")
    with pytest.raises(ValueError, match=r"rollout\.quantization='int4' is not one of None, fp8"):
        RolloutConfig(quantization="int4")


def test_the_probe_allows_the_least_precise_side() -> None:
    assert probe_precision("float16", "float32") == "float16"
    assert probe_precision("float16", "bfloat16") == "bfloat16"
    assert probe_precision("bfloat16", "float32", "fp8") == "fp8"
    assert probe_precision("float32", "float32") == "float32"
    assert TOLERANCE["float32"] < TOLERANCE["float16"] < TOLERANCE["bfloat16"] < TOLERANCE["fp8"]


# ---- engines: float16 and FP8-simulated vLLM on CPU, one at a time (one engine per process) ----

PROBE_SEQUENCES = [[(7 * i + 13 * j) % 300 + 3 for j in range(28)] for i in range(8)]
"""Eight probe sequences of 28 tokens, scored after the first 4 (like the run's: prompt + reply)."""


@torch.no_grad()
def trainer_scores(model: torch.nn.Module) -> torch.Tensor:
    """The float32 trainer's side of the probe: log p of every token after the first."""
    ids = torch.tensor(PROBE_SEQUENCES)
    logprobs = model(ids).logits.double().log_softmax(-1)[:, :-1]
    return logprobs.gather(-1, ids[:, 1:, None])[..., 0]


def probe(engine: VllmEngine, model: torch.nn.Module) -> ProbeDifference:
    """The run's probe difference (icepop.weights) of the engine against the float32 model."""
    shares = [list(range(len(PROBE_SEQUENCES)))]
    return probe_difference(shares, [engine.score(PROBE_SEQUENCES, 1)], trainer_scores(model))


def fp8_rounded_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The float32 model with the weights an FP8 engine of `dtype` holds (a float32 forward)."""
    state = {name: t.clone() for name, t in model.state_dict().items()}
    rounded = {name: t.float() for name, t in with_fp8_rounding(iter(state.items()), dtype)}
    copy = type(model)(model.config).eval()
    copy.load_state_dict(rounded)
    return copy


CASES = {"dense-float16": ("dense", "float16", None), "dense-fp8": ("dense", "bfloat16", "fp8"),
         "moe-fp8": ("moe", "float16", "fp8")}  # fmt: skip
"""(architecture, rollout.dtype, rollout.quantization) of each engine: FP8 over both 16-bit dtypes."""


@pytest.fixture(scope="module", params=list(CASES.values()), ids=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    architecture, dtype, quantization = request.param
    folder = tmp_path_factory.mktemp(f"{architecture}-{dtype}-{quantization}")
    model_dir = build_tiny_model(folder / "model", architecture)
    engine = VllmEngine(**engine_args(model_dir, dtype=dtype, quantization=quantization, max_model_len=64,
                                      kv_cache_bytes=32 * 2**20, cpu_threads=1))  # fmt: skip
    yield engine, model_dir, folder, RolloutConfig(dtype=dtype, quantization=quantization, max_new_tokens=24)
    engine.close()


@pytest.mark.slow
def test_the_probe_passes_after_a_push_and_fails_with_stale_weights(case: tuple) -> None:
    engine, model_dir, folder, rollout = case
    precision = probe_precision(rollout.dtype, "float32", rollout.quantization)
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    synced_at_start = probe(engine, start)
    check_probe(synced_at_start, rollout, "float32", step=0)  # the start-up load, rounded too
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    trained.save_pretrained(folder / "trained")
    stale = probe(engine, trained)  # the engine never got the trainer's weights
    with pytest.raises(WeightSyncError, match="stale or corrupted"):
        check_probe(stale, rollout, "float32", step=1)
    weights = folder / "trained" / "model.safetensors"
    if rollout.dtype == "float16" and rollout.quantization:  # the colocated path: tensors handed over
        engine.load_tensors(iter(load_file(weights).items()))
    else:
        engine.load_weights(str(weights))
    synced = probe(engine, trained)
    check_probe(synced, rollout, "float32", step=1)
    if rollout.quantization == "fp8":  # the engine holds the rounded weights: it is closer to them
        rounded = probe(engine, fp8_rounded_copy(trained, getattr(torch, rollout.dtype)))
        print(f"mean |Δ log p| against FP8-rounded weights {rounded.mean:.2e}, unrounded {synced.mean:.2e}")
        assert rounded.mean < synced.mean / 2
    print(f"{rollout.dtype} engine, quantization {rollout.quantization}: mean |Δ log p| synced at start "
          f"{synced_at_start.mean:.2e}, after the push {synced.mean:.2e} (max {synced.max:.2e}), stale "
          f"{stale.mean:.2e}; tolerance {TOLERANCE[precision]}")  # fmt: skip
    assert stale.mean > 1.5 * TOLERANCE[precision] > 4.5 * synced.mean  # a margin either side
