"""Batch layout for the trainer, rank shards, the weight-sync probe check, and placement messages."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from test_config import compose_config

from icepop.config import RolloutConfig
from icepop.ray.bundles import check_capacity, needed_resources
from icepop.ray.cluster import process_env
from icepop.ray.engine_placement import engine_settings, kv_cache_bytes
from icepop.stages.batch import rl_batch, sequence_count, split_rows
from icepop.trainer.inputs import micro_batch_rows, place_rows, rows_of
from icepop.types import Completion, Prompt
from icepop.weights import (
    ProbeDifference,
    WeightSyncError,
    check_probe,
    probe_sequences,
    probe_shares,
    shm_dir,
)

PAD = 0


def example_batch():
    prompts = [Prompt([5, 6, 7]), Prompt([8, 9])]
    groups = [
        [Completion([11, 12], [-0.1, -0.2], "stop"), Completion([13], [-0.3], "length")],
        [Completion([14, 15, 16], [-0.4, -0.5, -0.6], "stop"), Completion([17], [-0.7], "stop")],
    ]
    return rl_batch(prompts, groups, torch.tensor([1.0, -1.0, 0.5, -0.5]), PAD)


def test_rl_batch_is_right_padded_and_label_aligned() -> None:
    batch = example_batch()
    # Row 0: prompt [5, 6, 7] + response [11, 12] → length 5; the longest row is 2 + 3 = 5.
    assert batch.input_ids.tolist() == [
        [5, 6, 7, 11, 12],
        [5, 6, 7, 13, PAD],
        [8, 9, 14, 15, 16],
        [8, 9, 17, PAD, PAD],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
    ]
    # Label position j predicts token j+1: row 0's response tokens 11, 12 sit at positions 2 and 3.
    assert batch.response_mask.tolist() == [
        [False, False, True, True],
        [False, False, True, False],
        [False, True, True, True],
        [False, True, False, False],
    ]
    assert batch.rollout_logprobs[0, 2:4].tolist() == pytest.approx([-0.1, -0.2])
    assert batch.rollout_logprobs[2, 1:4].tolist() == pytest.approx([-0.4, -0.5, -0.6])
    assert batch.advantages[1].tolist() == [0.0, 0.0, -1.0, 0.0]  # advantage only on response tokens
    labels = batch.input_ids[:, 1:][batch.response_mask].tolist()
    assert labels == [11, 12, 13, 14, 15, 16, 17]


def test_split_rows_trims_each_shard_and_keeps_every_token() -> None:
    batch = example_batch()
    first, second = split_rows(batch, 2)
    assert first.input_ids.shape == (2, 5) and second.input_ids.shape == (2, 5)
    last = split_rows(batch, 4)[3]
    assert last.input_ids.tolist() == [[8, 9, 17]] and last.response_mask.tolist() == [[False, True]]
    total = sum(int(s.response_mask.sum()) for s in split_rows(batch, 4))
    assert total == int(batch.response_mask.sum()) == 7
    assert sequence_count(batch.response_mask) == 4
    with pytest.raises(ValueError, match="do not split"):
        split_rows(batch, 3)


def test_token_budget_micro_batches_pack_sorted_rows_and_come_back_in_batch_order() -> None:
    lengths = [5, 12, 3, 12, 7, 4, 30]
    assert [g.tolist() for g in micro_batch_rows(lengths, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    groups = micro_batch_rows(lengths, 3, token_budget=24)
    # Longest first; a micro-batch grows while rows × its longest ≤ 24; the 30-token row goes alone.
    assert [g.tolist() for g in groups] == [[6], [1, 3], [4, 0, 5], [2]]
    assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
    assert all(len(g) * max(lengths[i] for i in g.tolist()) <= 24 for g in groups[1:])

    batch = example_batch()  # row lengths 5, 4, 5, 3
    order = micro_batch_rows(batch.attention_mask.sum(-1).tolist(), 2, token_budget=9)
    assert [g.tolist() for g in order] == [[0], [2], [1, 3]]  # 2 rows × 4 ≤ 9
    parts = []
    for rows in order:
        mb = rows_of(batch, rows, torch.device("cpu"))
        width = int(batch.attention_mask[rows].sum(-1).max())  # trimmed to its own longest row
        assert mb["input_ids"].shape == (len(rows), width)
        assert mb["rollout_logprobs"].shape == (len(rows), width - 1)
        parts.append((rows, mb["rollout_logprobs"]))
    assert torch.equal(place_rows(parts, *batch.rollout_logprobs.shape), batch.rollout_logprobs)
    dummy = rows_of(batch, None, torch.device("cpu"))
    assert dummy["input_ids"].shape == (1, 2) and not dummy["response_mask"].any()


def test_a_token_budget_takes_any_row_count_and_says_so() -> None:
    config = compose_config("+recipe=rlvr", "trainer.micro_batch_size=7", "trainer.micro_batch_tokens=512")
    derived = config.derived()
    assert derived.micro_batches_per_update is None and derived.sft_micro_batches is None
    description = derived.describe(config.algo, config.trainer, config.rollout, config.cluster)
    assert "micro-batches of ≤ 512 tokens" in description
    with pytest.raises(ValueError, match=r"trainer\.micro_batch_tokens must be >= 0"):
        compose_config("+recipe=rlvr", "trainer.micro_batch_tokens=-1")


def test_rl_batch_refuses_advantages_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="one per completion"):
        rl_batch([Prompt([1, 2])], [[Completion([3], [-1.0], "stop")]], torch.tensor([1.0, 2.0]), PAD)


def test_probe_check_raises_beyond_the_dtype_noise() -> None:
    fp32, bf16 = RolloutConfig(dtype="float32"), RolloutConfig(dtype="bfloat16")
    check_probe(ProbeDifference(max=5e-7, mean=1e-7), fp32, "float32", step=1)
    # bf16: one token far off (an MoE routing flip) is noise; the mean over the probe tokens decides.
    check_probe(ProbeDifference(max=2.2, mean=0.03), bf16, "float32", step=1)
    # The less precise side sets the tolerance: a float32 engine against a bfloat16 trainer (README's
    # GPU preset before it set both dtypes stopped at step 1 on exactly this).
    check_probe(ProbeDifference(max=0.4, mean=0.03), fp32, "bfloat16", step=1)
    for bad, rollout, trainer in [
        (ProbeDifference(max=0.01, mean=1e-4), fp32, "float32"),
        (ProbeDifference(max=float("nan"), mean=float("nan")), fp32, "float32"),
        (ProbeDifference(max=6.2, mean=2.4), bf16, "float32"),  # stale weights
        (ProbeDifference(max=6.2, mean=2.4), fp32, "bfloat16"),
        (ProbeDifference(max=float("nan"), mean=float("nan")), bf16, "bfloat16"),
    ]:
        with pytest.raises(WeightSyncError, match="stale or corrupted"):
            check_probe(bad, rollout, trainer, step=3)
    with pytest.raises(WeightSyncError):
        check_probe(
            ProbeDifference(max=2e-4, mean=1e-4),
            RolloutConfig(dtype="float32", probe_tolerance=1e-4),
            "float32",
            step=3,
        )


def test_a_too_small_cluster_is_explained_in_one_message() -> None:
    config = compose_config(
        "+recipe=rlvr", "cluster=gpu", "rollout.engines=8", "trainer.ranks=8", "algo.prompts_per_step=32"
    )
    assert needed_resources(config) == {"CPU": 16, "GPU": 16}
    with pytest.raises(
        RuntimeError, match="rollout needs 8 CPUs/8 GPUs, trainer 8 CPUs/8 GPUs, cluster has 16 CPUs/12 GPUs"
    ):
        check_capacity(config, {"CPU": 16.0, "GPU": 12.0})
    check_capacity(config, {"CPU": 16.0, "GPU": 16.0})


def test_process_env_keeps_the_users_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    env = process_env(on_gpu=False, local=True)
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG" and env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["DS_ACCELERATOR"] == "cpu" and "DS_ACCELERATOR" not in process_env(on_gpu=True, local=True)
    assert env["GLOO_SOCKET_IFNAME"] == "lo"  # a local cluster binds loopback only
    assert "GLOO_SOCKET_IFNAME" not in process_env(on_gpu=False, local=False)  # a cluster's own choice


def test_reference_policy_scores_like_transformers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from icepop.models.tiny import build_tiny_model
    from icepop.trainer.reference import ReferencePolicy

    folder = build_tiny_model(tmp_path / "m", "dense")
    ids = torch.tensor([[1, 30, 40, 50, 60], [1, 31, 41, 0, 0], [1, 32, 42, 52, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [3], [4]])).long()
    got = ReferencePolicy(str(folder), micro_batch_size=2).logprobs(ids, mask)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].bool()
    assert got.shape == (3, 4)
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


def test_the_engines_get_the_configured_context_and_eager_mode() -> None:
    config = compose_config("+recipe=rlvr", "data.max_prompt_tokens=100", "rollout.max_new_tokens=28")
    settings = engine_settings(config, "/model")
    assert settings["max_model_len"] == 128 and settings["enforce_eager"] is True
    assert (
        engine_settings(compose_config("+recipe=rlvr", "rollout.max_model_len=300"), "/model")[
            "max_model_len"
        ]
        == 300
    )
    gpu = compose_config("+recipe=rlvr", "cluster=gpu")  # CUDA graphs on where there are GPUs
    assert engine_settings(gpu, "/model")["enforce_eager"] is False


def test_colocated_engines_live_in_the_trainer_ranks_bundles_and_share_their_devices() -> None:
    apart = compose_config("+recipe=rlvr", "rollout.engines=2", "rollout.cpus_per_engine=3")
    together = compose_config(
        "+recipe=rlvr", "cluster.placement=colocated", "rollout.engines=2", "rollout.cpus_per_engine=3"
    )
    assert needed_resources(apart) == {"CPU": 8, "GPU": 0}  # 2 engines × 3 + 2 ranks × 1
    assert needed_resources(together) == {"CPU": 2, "GPU": 0}  # the ranks' bundles alone
    assert needed_resources(together, rollout=False) == needed_resources(apart, rollout=False)
    # On CPU: the rank's threads, no sleep mode; on GPUs: the rank's GPU, asleep while it trains.
    assert (
        engine_settings(apart, "/m")["cpu_threads"] == 3
        and not engine_settings(apart, "/m")["enable_sleep_mode"]
    )
    assert engine_settings(together, "/m")["cpu_threads"] == 1
    assert not engine_settings(together, "/m")["enable_sleep_mode"]
    gpu = compose_config("+recipe=rlvr", "cluster=gpu", "cluster.placement=colocated", "rollout.engines=2")
    assert (
        engine_settings(gpu, "/m")["enable_sleep_mode"] and engine_settings(gpu, "/m")["cpu_threads"] is None
    )
    assert needed_resources(gpu) == {"CPU": 2, "GPU": 2}
    assert together.describe_batches().endswith(
        "placement colocated: 2 trainer rank(s) × 1 CPU/0 GPU, each hosting one engine"
    )
    assert "placement disaggregated: 2 engine(s) × 3 CPU/0 GPU, 2 trainer rank(s)" in apart.describe_batches()


def test_every_engine_scores_its_own_share_of_the_probe_and_at_least_one_sequence() -> None:
    assert probe_shares(8, 1) == [list(range(8))]
    assert probe_shares(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert probe_shares(8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 0]]
    assert probe_shares(2, 4) == [[0], [1], [0], [1]]  # more engines than sequences: each is checked
    float32, bfloat16 = RolloutConfig(dtype="float32", max_new_tokens=8), RolloutConfig(dtype="bfloat16")
    prompts = [Prompt(list(range(i, i + 30))) for i in range(3)]
    first = list(range(30)) + list(range(23, 31))
    assert probe_sequences(prompts, float32, "float32") == [first]  # 1 in float32, 8 tokens added
    assert (
        len(probe_sequences(prompts, float32, "bfloat16"))
        == len(probe_sequences(prompts, bfloat16, "float32"))
        == 8
    )


def test_free_ports_avoid_the_ephemeral_range_that_outgoing_connections_take() -> None:
    import socket

    from icepop.ray.hosts import FREE_PORTS, free_port

    ports = {free_port() for _ in range(20)}
    assert ports <= set(FREE_PORTS) and len(ports) > 1  # random, not one fixed sequence
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))  # and free


def test_weight_files_travel_through_icepop_shm_dir_when_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.delenv("ICEPOP_SHM_DIR", raising=False)
    assert shm_dir() in ("/dev/shm", tempfile.gettempdir())
    monkeypatch.setenv("ICEPOP_SHM_DIR", str(tmp_path))
    assert shm_dir() == str(tmp_path)


def test_the_smollm2_preset_colocates_its_engine_on_cpu_but_not_on_gpus() -> None:
    """One rank, one engine on a CPU: the engine in the rank's process (the sync a third of a broadcast's);
    on GPUs engines of their own (colocated sleep/wake is untested there); stale rollouts are refused."""
    cpu = compose_config("+recipe=rlvr", "model=smollm2-135m")
    assert (cpu.cluster.placement, cpu.rollout.engines, cpu.trainer.ranks) == ("colocated", 1, 1)
    assert engine_settings(cpu, "/m")["cpu_threads"] == cpu.trainer.cpus_per_rank == 2
    gpu = compose_config("+recipe=rlvr", "model=smollm2-135m", "cluster=gpu")
    assert gpu.cluster.placement == "disaggregated"
    with pytest.raises(ValueError, match=r"use cluster\.placement=disaggregated"):
        compose_config("+recipe=rlvr", "model=smollm2-135m", "rollout.max_staleness=1")
    apart = compose_config(
        "+recipe=rlvr", "model=smollm2-135m", "rollout.max_staleness=1", "cluster.placement=disaggregated"
    )
    assert apart.rollout.max_staleness == 1


def test_the_kv_cache_is_sized_to_what_the_run_holds_at_once(tmp_path: Path) -> None:
    """rollout.kv_cache_gib=null (the default): an engine's share of a step's samples, each at the longest
    prompt plus the reply budget, in whole 128-token blocks, at least one sequence at the whole context;
    a fixed size where one is given; 1 GiB where the model's config does not give the KV sizes."""
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
    }))  # fmt: skip
    per_token = 2 * 30 * 3 * 64 * 4  # key and value, 30 layers, 3 KV heads of 64, float32
    w1 = compose_config(
        "+recipe=rlvr", "model=smollm2-135m", "algo.prompts_per_step=8", "algo.samples_per_prompt=4",
        "rollout.max_new_tokens=32", "data.eval_size=8",
    )  # fmt: skip
    assert w1.rollout.kv_cache_gib is None and w1.rollout.dtype == "float32"
    assert kv_cache_bytes(w1, str(tmp_path), prompt_tokens=62) == 32 * 128 * per_token  # 94 tokens: a block
    assert kv_cache_bytes(w1, str(tmp_path), prompt_tokens=100) == 32 * 2 * 128 * per_token
    assert kv_cache_bytes(w1, str(tmp_path)) == 32 * 3 * 128 * per_token  # data.max_prompt_tokens=256
    assert engine_settings(w1, str(tmp_path), True, 62)["kv_cache_bytes"] == 32 * 128 * per_token
    two = compose_config("+recipe=rlvr", "rollout.engines=2", "data.eval_size=300")  # 128 samples, 2 engines
    assert kv_cache_bytes(two, str(tmp_path), prompt_tokens=10) == 150 * 128 * per_token  # 300 held out / 2
    one = compose_config("+recipe=rlvr", "algo.prompts_per_step=1", "algo.samples_per_prompt=2",
                         "data.eval_size=1", "rollout.max_model_len=1000")  # fmt: skip
    assert kv_cache_bytes(one, str(tmp_path), prompt_tokens=10) == 8 * 128 * per_token  # a 1000-token one
    fixed = compose_config("+recipe=rlvr", "rollout.kv_cache_gib=0.5")
    assert kv_cache_bytes(fixed, str(tmp_path)) == 2**29
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert kv_cache_bytes(w1, str(tmp_path), prompt_tokens=62) == 2**30
