"""Padding-free packed micro-batches (trainer.packing, icepop.trainer.packing): the log-probs, entropies,
losses and gradients of a packed micro-batch are the padded one's (float32, 1e-6) for the RL, SFT and
reward-model forwards of the dense and MoE tiny models; rows never see each other; packed micro-batches
fill the token budget with real tokens; a model whose attention cannot keep rows apart is refused
before anything starts. One spawned 1-rank DeepSpeed run checks the trainer end to end (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from backend_args import trainer_args
from dist_helpers import free_port, run_ranks
from test_config import compose_config

from icepop.algo import PolicyLossOptions, bradley_terry_loss, pg_loss
from icepop.errors import InputError
from icepop.models.tiny import build_tiny_model
from icepop.preflight import check_inputs
from icepop.trainer.inputs import micro_batch_rows
from icepop.trainer.models import load_model
from icepop.trainer.packing import micro_batch_items, packing_problem, refuse_unpackable, row_scores
from icepop.trainer.packing import token_logprobs as forward
from icepop.types import PreferenceBatch, RLBatch, SFTBatch

ATOL = 1e-6
TEMPERATURE, PROMPT_LEN = 0.7, 3
LENGTHS = (17, 1, 9, 2, 14, 5)  # a one-token row (no label), a two-token row, the longest first
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packing_models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("dense", "moe")}


def rows(seed: int, lengths: tuple[int, ...], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random token rows (ids ≥ 3: never the pad token 0) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    valid = torch.arange(width) < torch.tensor(lengths)[:, None]
    ids = torch.where(valid, torch.randint(3, vocab, (len(lengths), width), generator=g), 0)
    return ids, valid.long()


def rl_batch(seed: int, vocab: int) -> RLBatch:
    ids, mask = rows(seed, LENGTHS, vocab)
    g = torch.Generator().manual_seed(seed + 1)
    response = (torch.arange(1, ids.shape[1]) >= PROMPT_LEN) & mask[:, 1:].bool()
    shape = response.shape
    rollout = -6.0 + torch.randn(shape, generator=g)  # ≈ the model's ℓ ± 1 nat: IcePop masks some tokens
    advantages = torch.randn(len(LENGTHS), 1, generator=g).expand(shape).clone()
    return RLBatch(ids, mask, response, rollout, advantages)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 0.0) -> None:
    """|a − b| ≤ 1e-6 (+ rtol·|b|: an entropy of ≈ 6 nats is a difference of cancelling sums)."""
    torch.testing.assert_close(a, b, atol=ATOL, rtol=rtol)


def rl_step(model: Any, batch: RLBatch, packed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ℓ, entropy, loss) of one RL micro-batch, as train_rl computes them, with its backward."""
    logprobs, entropy = forward(model, batch.input_ids, batch.attention_mask, TEMPERATURE, True, packed)
    counts = {"global_token_count": int(batch.response_mask.sum()), "global_seq_count": len(LENGTHS)}
    loss, _, _ = pg_loss(
        logprobs, logprobs.detach(), batch.rollout_logprobs, batch.advantages, batch.response_mask,
        PolicyLossOptions(), **counts,
    )  # fmt: skip
    (loss - 0.01 * torch.where(batch.response_mask, entropy, 0.0).sum()).backward()  # entropy's path too
    return logprobs.detach(), entropy.detach(), loss.detach()


@pytest.mark.parametrize("arch,attention", [("dense", "sdpa"), ("dense", "eager"), ("moe", "sdpa")])
def test_packed_rl_logprobs_loss_and_gradients_are_the_padded_ones(
    tiny_models: dict[str, Path], arch: str, attention: str
) -> None:
    model = load_model(str(tiny_models[arch]), "policy", "float32")
    model.set_attn_implementation(attention)
    batch = rl_batch(0, model.config.vocab_size)
    padded, packed = rl_step(model, batch, False), gradients(model)
    packed_step, packed_grads = rl_step(model, batch, True), gradients(model)
    labels = batch.attention_mask[:, 1:].bool()  # the positions with a real label
    assert_close(packed_step[0][labels], padded[0][labels])  # ℓ
    assert_close(packed_step[1][labels], padded[1][labels], rtol=1e-6)  # entropy
    fed = torch.arange(labels.shape[1]) < (torch.tensor(LENGTHS) - 1).clamp(min=1)[:, None]
    assert bool((packed_step[0][~fed] == 0).all()) and bool(fed[1, 0])  # a one-token row feeds its token
    assert_close(packed_step[2], padded[2])  # loss
    assert packed_grads.keys() == packed.keys() and len(packed) == len(list(model.parameters()))
    for name, grad in packed.items():
        assert_close(packed_grads[name], grad)


def test_packed_sft_loss_and_gradients_are_the_padded_ones(tiny_models: dict[str, Path]) -> None:
    model = load_model(str(tiny_models["moe"]), "policy", "float32")
    rl = rl_batch(1, model.config.vocab_size)
    batch = SFTBatch(rl.input_ids, rl.attention_mask, rl.response_mask)
    results = []
    for packed in (False, True):
        logprobs, _ = forward(model, batch.input_ids, batch.attention_mask, 1.0, True, packed)
        loss = torch.where(batch.loss_mask, -logprobs, 0.0).sum() / int(batch.loss_mask.sum())
        loss.backward()
        results.append((loss.detach(), gradients(model)))
    (padded_loss, padded), (packed_loss, packed) = results
    assert_close(packed_loss, padded_loss)
    for name, grad in padded.items():
        assert_close(packed[name], grad)


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_packed_reward_scores_loss_and_gradients_are_the_padded_ones(
    tiny_models: dict[str, Path], arch: str
) -> None:
    model = load_model(str(tiny_models[arch]), "reward", "float32")
    ids, mask = rows(2, (6, 11, 3, 9, 1, 11), model.config.vocab_size)
    ids[1, 10] = model.config.pad_token_id  # a row ending in the pad token: scored where padded rows are
    batch = PreferenceBatch(ids, mask)
    everything = torch.arange(len(ids))
    results = []
    for packed in (False, True):
        scores = row_scores(model, batch.input_ids, batch.attention_mask, everything, CPU, packed)
        loss, _ = bradley_terry_loss(*scores.view(2, -1))
        loss.backward()
        results.append((scores.detach(), loss.detach(), gradients(model)))
    (padded_scores, padded_loss, padded), (packed_scores, packed_loss, packed) = results
    assert_close(packed_scores, padded_scores)
    assert_close(packed_loss, padded_loss)
    assert "score.weight" in padded
    for name, grad in padded.items():
        assert_close(packed[name], grad)
    dummy = row_scores(model, ids, mask, None, CPU, True)  # the padding micro-batch: two one-token rows
    assert_close(dummy, row_scores(model, ids, mask, None, CPU, False))


def test_packed_rows_never_see_each_other(tiny_models: dict[str, Path]) -> None:
    """Changing every token of the first row leaves the others' ℓ exactly as they were; the same
    concatenation without restarting positions (one long sequence) would not."""
    model = load_model(str(tiny_models["dense"]), "policy", "float32")
    batch = rl_batch(3, model.config.vocab_size)
    other = batch.input_ids.clone()
    other[0, : LENGTHS[0]] = (other[0, : LENGTHS[0]] + 1 - 3) % (model.config.vocab_size - 3) + 3
    with torch.no_grad():
        before = forward(model, batch.input_ids, batch.attention_mask, 1.0, False, True)[0]
        after = forward(model, other, batch.attention_mask, 1.0, False, True)[0]
        assert bool((before[1:] == after[1:]).all()) and not torch.equal(before[0], after[0])
        one_sequence = model(input_ids=batch.input_ids[batch.attention_mask.bool()][None]).logits
    assert one_sequence.shape[1] == sum(LENGTHS)  # (the negative control runs the same tokens)
    second = torch.log_softmax(one_sequence[0, LENGTHS[0] : LENGTHS[0] + 1], -1)  # row 1 seeing row 0
    alone = torch.log_softmax(model(input_ids=batch.input_ids[1:2, :1]).logits[0], -1)
    assert (second - alone).abs().max() > 1e-3


def test_packed_micro_batches_fill_the_budget_with_real_tokens() -> None:
    lengths = [30, 5, 12, 7, 29, 3, 18, 40, 9, 1]
    for budget in (40, 64, 100):
        groups = micro_batch_rows(lengths, 1, budget, packed=True)
        assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))  # every row once
        assert all(sum(lengths[r] for r in g.tolist()) <= budget for g in groups)
        padded = micro_batch_rows(lengths, 1, budget)
        assert len(groups) < len(padded)  # padding no longer counts against the budget
    assert [g.tolist() for g in micro_batch_rows([50, 10], 1, 40, packed=True)] == [[0], [1]]  # too long
    assert micro_batch_rows(lengths, 4, 0, packed=True)[0].tolist() == [0, 1, 2, 3]  # rows, no budget
    pairs = torch.tensor([[10, 4, 30], [2, 12, 5]])  # chosen, rejected lengths of 3 pairs
    assert [g.tolist() for g in micro_batch_items(pairs, 1, 36, packed=True)] == [[2], [1, 0]]  # 35; 16 + 12
    assert [g.tolist() for g in micro_batch_items(pairs, 1, 36, packed=False)] == [
        [2],
        [1],
        [0],
    ]  # 2 × 12 > 18


def test_attention_that_cannot_keep_rows_apart_is_refused(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    config = load_model(str(tiny_models["dense"]), "policy", "float32").config
    assert packing_problem(config) is None and config._attn_implementation == "sdpa"
    for attention in ("eager", "flash_attention_2", "flex_attention"):
        config._attn_implementation = attention
        assert packing_problem(config) is None
    config._attn_implementation = "paged|sdpa"
    assert "'paged|sdpa' cannot keep packed rows apart" in str(packing_problem(config))
    config._attn_implementation, config.layer_types = "sdpa", ["full_attention", "linear_attention"]
    assert "linear_attention layers" in str(packing_problem(config))
    model = load_model(str(tiny_models["dense"]), "policy", "float32")
    refuse_unpackable(model)  # sdpa: accepted
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match=r"packing=True cannot train Qwen2ForCausalLM.*paged\|sdpa"):
        refuse_unpackable(model)
    # Before Ray: a model folder whose config.json asks for an attention that mixes rows.
    folder = Path(shutil.copytree(tiny_models["dense"], tmp_path / "paged"))
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "attn_implementation": "paged|sdpa"}))
    for recipe in ("rlvr", "sft", "rm"):
        given = (f"+recipe={recipe}", f"model.path={folder}")
        check_inputs(compose_config(*given))  # without packing the model is fine
        with pytest.raises(InputError, match=r"trainer\.packing=true .*model\.path='.*paged'.*'paged\|sdpa'"):
            check_inputs(compose_config(*given, "trainer.packing=true"))
    check_inputs(compose_config("+recipe=rlvr", f"model.path={tiny_models['moe']}", "trainer.packing=true"))


# ---- one spawned 1-rank DeepSpeed run: the trainer padded, then packed --------------------------


TRAINER = {"lr": 1e-3, "eps": 1e-3, "warmup_steps": 0, "temperature": TEMPERATURE, "micro_batch_tokens": 30}
# eps 1e-3: Adam's first step moves small gradient elements linearly in g (tests/test_trainer_deepspeed.py)
PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
RUNS = (("rl", "dense", 3), ("rm", "moe", 2))
"""(stage, tiny model, ZeRO stage) of the trainers built padded, then packed, in one spawned process."""


def _run(trainer: Any, stage: str, vocab: int) -> dict[str, Any]:
    if stage == "rm":
        ids, mask = rows(5, (6, 11, 3, 9, 1, 12, 4, 8), vocab)
        return {
            "scores": trainer.scores(ids, mask),
            "metrics": trainer.train_rm(PreferenceBatch(ids, mask), 4),
        }
    batch = rl_batch(0, vocab)
    res = {"logprobs": trainer.logprobs(batch.input_ids, batch.attention_mask, TEMPERATURE)}
    res["metrics"] = trainer.train_rl(
        batch, PolicyLossOptions(), int(batch.response_mask.sum()), len(LENGTHS)
    )
    res["old"] = trainer.last_old_logprobs()
    sft = SFTBatch(batch.input_ids, batch.attention_mask, batch.response_mask)
    res["metrics"] |= trainer.train_sft(sft, int(sft.loss_mask.sum()))
    return res


def _trainer_part(rank: int, world_size: int, port: int, models: dict[str, str], out: str) -> None:
    import deepspeed

    from icepop.trainer.deepspeed import DeepSpeedTrainer

    res: dict[str, Any] = {}
    for packing in (False, True):
        for stage, arch, zero in RUNS:
            args = trainer_args(models[arch], rank=rank, world_size=world_size, master_port=port, stage=stage)
            overrides = {"zero_stage": zero, "ds_config_overrides": PARTITION_ALL, "packing": packing}
            trainer = DeepSpeedTrainer(**{**args, **TRAINER, **overrides})
            port += 1
            key = (stage, packing)
            res[key] = _run(trainer, stage, trainer.engine.module.config.vocab_size)
            module = trainer.engine.module
            with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=zero == 3):
                res[key]["params"] = {n: p.detach().clone() for n, p in module.named_parameters()}
            trainer.close()
    torch.save(res, f"{out}/packing.pt")


@pytest.fixture(scope="module")
def trained(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Any]:
    root = tmp_path_factory.mktemp("packing_run")
    models = {arch: str(path) for arch, path in tiny_models.items()}
    run_ranks(_trainer_part, 1, free_port(), models, str(root), error_dir=root / "errors", timeout_s=300)
    return torch.load(root / "packing.pt", weights_only=False)


@pytest.mark.slow  # DeepSpeed engines in a spawned process group
def test_the_packed_trainer_steps_as_the_padded_one(trained: dict[Any, Any]) -> None:
    """ZeRO-3 policy (logprobs, train_rl, train_sft) and ZeRO-2 MoE reward model (scores, train_rm) under
    a 30-token budget: the same ℓ, scores, losses, gradient norms and updated weights."""
    (rl, packed_rl), (rm, packed_rm) = [(trained[stage, False], trained[stage, True]) for stage, *_ in RUNS]
    batch = rl_batch(0, 10**6)
    labels = batch.attention_mask[:, 1:].bool()
    assert_close(packed_rl["logprobs"][labels], rl["logprobs"][labels])
    # ℓ_old of the training forward: the replies' positions (padded, the output head skips the prompts').
    assert_close(packed_rl["old"][batch.response_mask], rl["old"][batch.response_mask])
    assert_close(packed_rm["scores"], rm["scores"])
    names = ("actor/loss", "actor/pg_loss", "actor/grad_norm", "sft/loss", "sft/grad_norm")
    for padded, packed, keys in ((rl, packed_rl, names), (rm, packed_rm, ("rm/loss", "rm/grad_norm"))):
        for name in keys:
            rel = 1e-6 if name.endswith("grad_norm") else None  # a norm of ≈ 20: float32's own 1e-7
            assert packed["metrics"][name] == pytest.approx(padded["metrics"][name], rel=rel, abs=ATOL), name
        assert packed["params"].keys() == padded["params"].keys()
        for name, value in padded["params"].items():
            assert_close(packed["params"][name], value)
    assert packed_rl["metrics"]["actor/entropy"] == pytest.approx(rl["metrics"]["actor/entropy"], rel=1e-6)
    assert packed_rm["metrics"]["rm/accuracy"] == rm["metrics"]["rm/accuracy"]
    # Fewer forwards: a packed micro-batch holds ≤ 30 real tokens, a padded one ≤ 30 with its padding.
    assert packed_rl["metrics"]["actor/micro_batches"] == 2 < rl["metrics"]["actor/micro_batches"] == 3
