"""A model given by hub id, as `model.path=Qwen/Qwen3-1.7B` gives it, on a machine without the hub: the
tiny model placed in a private Hugging Face cache under an `org/name` id, with HF_HUB_OFFLINE=1.

`model.path` stays the hub id all the way to the trainer ranks and engines (each node loads it from its
own cache); a checkpoint takes the model's tokenizer files from the id's snapshot in that cache
(icepop.trainer.export.model_files). Checked on `write_checkpoint` alone, then through real SFT and
reward-model runs (`python -m icepop.train`, one trainer rank, two steps each) whose final checkpoints
transformers and vLLM load.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from e2e_helpers import icepop_train
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from icepop.models.tiny import build_tiny_model
from icepop.trainer.export import model_files, write_checkpoint

REPO_ID = "icepop-test/tiny-dense"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
QUICK = ["trainer.ranks=1", "data.max_prompt_tokens=128", "rollout.max_new_tokens=64"]
"""One rank, short conversations: a run of a few seconds once Ray is up."""
SFT = ["+recipe=sft", "run.dir=sft", "sft.steps=2", "sft.examples=64", "sft.eval_size=8", "sft.batch_size=8"]
RM = ["+recipe=rm", "run.dir=rm", "rm.steps=2", "rm.pairs=64", "rm.eval_size=8", "rm.batch_size=8"]


def place_in_hub_cache(folder: Path, hub_cache: Path, repo_id: str) -> Path:
    """`folder`'s files in `hub_cache` (an HF_HUB_CACHE) as `hf download repo_id` leaves them: blobs,
    refs/main naming a commit, and the commit's snapshot of links to the blobs. Returns the snapshot."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for file in files:
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / commit


@dataclass
class Hub:
    """The tiny model's own folder, the private Hugging Face home holding it under `REPO_ID`, and its
    snapshot there."""

    source: Path
    home: Path
    snapshot: Path | None = None

    @property
    def cache(self) -> Path:
        return self.home / "hub"

    def offline(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """This process (huggingface_hub reads its variables once, at import) and the runs it starts
        resolve hub ids in this cache only."""
        from huggingface_hub import constants

        for name, value in {"HF_HOME": self.home, "HF_HUB_CACHE": self.cache, "HF_HUB_OFFLINE": "1"}.items():
            monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Hub:
    source = build_tiny_model(tmp_path_factory.mktemp("tiny-dense"))
    hub = Hub(source, tmp_path_factory.mktemp("hf-home"))
    hub.snapshot = place_in_hub_cache(source, hub.cache, REPO_ID)
    return hub


def assert_has_tokenizer_of(checkpoint: Path, source: Path) -> None:
    """The checkpoint holds the model's own tokenizer files, as plain files (not links into a cache)."""
    for name in TOKENIZER_FILES:
        copied = checkpoint / name
        assert copied.is_file() and not copied.is_symlink(), name
        assert copied.read_bytes() == (source / name).read_bytes(), name


def test_a_checkpoint_of_a_hub_model_takes_its_tokenizer_from_the_hub_cache(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.offline(monkeypatch)
    assert AutoTokenizer.from_pretrained(REPO_ID, cache_dir=hub.cache).chat_template  # the cache is valid
    assert model_files(REPO_ID) == hub.snapshot
    assert model_files(str(hub.source)) == hub.source  # a folder is its own
    model = AutoModelForCausalLM.from_pretrained(hub.source, dtype=torch.float32)
    write_checkpoint(model, model.state_dict(), REPO_ID, str(tmp_path / "checkpoint"))
    assert_has_tokenizer_of(tmp_path / "checkpoint", hub.source)
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("*.safetensors")) == ["model.safetensors"]
    # The engine's check that a weight sync sends every tensor knows the hub model's tensors too.
    from safetensors import safe_open

    from icepop.rollout.checkpoint import checkpoint_names

    with safe_open(hub.source / "model.safetensors", framework="pt") as weights:
        assert checkpoint_names(REPO_ID) == checkpoint_names(str(hub.source)) == set(weights.keys())


@pytest.fixture(scope="module")
def runs(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The SFT and the reward-model stage, each from `REPO_ID` offline, in one folder."""
    tmp = tmp_path_factory.mktemp("hub-runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        hub.offline(monkeypatch)
        for stage in (SFT, RM):
            icepop_train(tmp, *stage, f"model.path={REPO_ID}", *QUICK)
        yield tmp


@pytest.mark.slow
@pytest.mark.ray("apart")  # two whole runs; nothing shared with the default group's fixtures
def test_sft_and_reward_model_checkpoints_of_a_hub_model_load_in_transformers_and_vllm(
    hub: Hub, runs: Path
) -> None:
    from backend_args import engine_args

    from icepop.rollout.vllm import VllmEngine
    from icepop.types import SamplingSettings

    policy, reward = runs / "sft" / "checkpoints" / "step-2", runs / "rm" / "checkpoints" / "step-2"
    for checkpoint in (policy, reward):
        assert_has_tokenizer_of(checkpoint, hub.source)
        assert AutoTokenizer.from_pretrained(checkpoint).chat_template
    base = AutoModelForCausalLM.from_pretrained(hub.source, dtype=torch.float32).state_dict()
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    assert any(not torch.equal(t, base[name]) for name, t in model.state_dict().items())  # it trained
    scorer = AutoModelForSequenceClassification.from_pretrained(reward, dtype=torch.float32)
    assert scorer.config.num_labels == 1

    tokenizer = AutoTokenizer.from_pretrained(policy)
    messages = [{"role": "user", "content": "What is 12 + 34?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    engine = VllmEngine(**engine_args(policy, max_model_len=256, kv_cache_bytes=64 * 2**20, cpu_threads=1))
    try:
        (completion,) = engine.generate([prompt], 1, SamplingSettings(max_new_tokens=6, seed=0))[0]
    finally:
        engine.close()
    # vLLM sampled from the trained weights: transformers gives its tokens the same log-probs (float32).
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    expected = logits.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None])[:, 0]
    assert completion.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
