"""One TRL GRPOTrainer run of a workload that `bench/vs_trl.py` prepared; runs inside TRL's own venv.

Not meant to be run by hand: `bench/vs_trl.py` creates the venv (torch 2.13.0 CPU, trl 1.13.0 and the
project's transformers/accelerate/datasets versions), writes the workload file and starts

    <trl-venv>/bin/python bench/trl_grpo.py WORKLOAD.json RESULT.json

The workload file holds what icepop's run uses: the model folder, the chat prompts (in the order
icepop's sampler draws them, one block of `prompts_per_step` per step) with their token ids, the
reward function's dotted path, and the sampling and optimizer settings. The reward is icepop's own
function, imported from this repository (icepop.rewards.verifiers needs only the standard library,
torch and, for some answers, math-verify). Every prompt TRL tokenizes is checked against the token
ids icepop feeds its engine, so both systems sample from the same prompts token for token.

TRL's configuration (its best on this 2-core CPU, as far as we found): one process, both cores
(torch's default thread count), plain transformers `generate` (TRL's vLLM path needs CUDA builds of
vllm 0.19-0.28; transformers' continuous batching, `use_transformers_continuous_batching`, generated
2-8× slower in one trial here), float32, no gradient checkpointing (the model fits; checkpointing
only costs time), the whole batch in one micro-batch, one optimizer step per generation (no separate
old-log-prob pass, like icepop's), no KL (beta 0, no reference model), constant lr, no evaluation, no
saving.

The result file holds, per optimizer step: the wall-clock begin and end (TrainerCallback's
on_step_begin / on_step_end), the seconds spent in generation (TRL's `_generate_single_turn`, timed
here) and the completion tokens it produced (EOS included, as icepop counts them), the mean reward.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # icepop.rewards.verifiers: the same reward function icepop calls

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from icepop.rewards.verifiers import resolve_reward_fn  # noqa: E402
from icepop.types import Prompt  # noqa: E402


def reward_function(path: str) -> Any:
    """icepop's reward function `path` ("module:function", called as fn(prompt, text)) in TRL's calling
    convention: one float per completion, the dataset's extra columns as keyword lists."""
    score = resolve_reward_fn(path)

    def rewards(
        completions: list[Any],
        icepop_prompt_ids: list[list[int]],
        answer: list[str],
        task: list[str],
        **_: Any,
    ) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [
            float(score(Prompt(ids, json.loads(a), t), text))
            for ids, a, t, text in zip(icepop_prompt_ids, answer, task, texts, strict=True)
        ]

    rewards.__name__ = path.rsplit(":", 1)[-1]
    return rewards


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that times its generation calls, counts the tokens they produce and checks every
    prompt's token ids against the ones icepop uses."""

    def __init__(self, *args: Any, expected_prompt_ids: set[tuple[int, ...]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected_prompt_ids = expected_prompt_ids
        self.generations: list[tuple[float, int]] = []  # (seconds, completion tokens) per call

    def _tokenize_prompts(self, prompts: list) -> Any:
        prompt_ids, *rest = super()._tokenize_prompts(prompts)
        for ids in prompt_ids:
            if tuple(ids) not in self.expected_prompt_ids:
                raise RuntimeError(f"TRL tokenized a prompt differently from icepop: {list(ids)[:20]}...")
        return (prompt_ids, *rest)

    def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
        self.generations.append((time.perf_counter() - start, sum(len(c) for c in completion_ids)))
        return completion_ids, logprobs


class StepClock(TrainerCallback):
    """Wall-clock time (time.time(), comparable across processes) of each optimizer step's begin and
    end, and the reward TRL logged for it."""

    def __init__(self) -> None:
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.rewards: dict[int, float] = {}

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begins.append(time.time())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(time.time())

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "reward" in logs:
            self.rewards[state.global_step] = float(logs["reward"])


def training_args(workload: dict[str, Any], output_dir: str) -> GRPOConfig:
    """GRPOConfig for the workload: one generation of prompts × samples per optimizer step."""
    batch = workload["prompts_per_step"] * workload["samples_per_prompt"]
    return GRPOConfig(
        output_dir=output_dir,
        max_steps=workload["steps"],
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=workload["samples_per_prompt"],
        max_completion_length=workload["max_new_tokens"],
        temperature=workload["temperature"],
        top_p=workload["top_p"],
        top_k=workload["top_k"],
        learning_rate=workload["lr"],
        lr_scheduler_type="constant",
        weight_decay=workload["weight_decay"],
        adam_beta1=workload["betas"][0],
        adam_beta2=workload["betas"][1],
        max_grad_norm=workload["grad_clip"],
        beta=0.0,
        bf16=workload["dtype"] == "bfloat16",
        fp16=False,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": workload["dtype"]},
        use_vllm=False,
        shuffle_dataset=False,  # rows are in icepop's sampling order, one step's prompts after another
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=workload["seed"],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def main() -> None:
    workload_path, result_path = sys.argv[1:3]
    workload = json.loads(Path(workload_path).read_text())
    rows = workload["rows"]
    tokenizer = AutoTokenizer.from_pretrained(workload["model_path"])
    for row in rows:  # the chat template applied as TRL applies it must give icepop's prompt ids
        ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, return_dict=False)
        if list(ids) != row["prompt_ids"]:
            raise SystemExit(f"trl_grpo: TRL's chat template gives other token ids than icepop's: {row}")
    dataset = Dataset.from_list(
        [
            {
                "prompt": r["messages"],
                "icepop_prompt_ids": r["prompt_ids"],
                "answer": json.dumps(r["answer"]),
                "task": r["task"],
            }
            for r in rows
        ]
    )
    clock = StepClock()
    output_dir = Path(result_path).with_suffix(".trainer")
    trainer = TimedGRPOTrainer(
        model=workload["model_path"],
        reward_funcs=[reward_function(workload["reward_function"])],
        args=training_args(workload, str(output_dir)),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
        expected_prompt_ids={tuple(r["prompt_ids"]) for r in rows},
    )
    trainer.train()
    steps = [
        {
            "step": i + 1,
            "begin": begin,
            "end": end,
            "generate_seconds": seconds,
            "tokens": tokens,
            "reward_mean": clock.rewards.get(i + 1),
        }
        for i, (begin, end, (seconds, tokens)) in enumerate(
            zip(clock.begins, clock.ends, trainer.generations, strict=True)
        )
    ]
    import transformers
    import trl

    result = {
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
        },
        "torch_cuda": torch.version.cuda,
    }
    Path(result_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
