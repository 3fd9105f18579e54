"""Bad input fails fast and clearly: each case below goes through what `python -m icepop.train` runs
before a stage starts anything (composition, the settings' checks, the model/tokenizer/reward
preflight, the stage's own data loading) and must end in one message that names the setting or row,
with no traceback and no Ray process started. A few cases also run as real command lines (exit code,
stderr). Then what users' data looks like: a multi-config dataset folder (GSM8K's layout) with a
held-out split, system prompts and chat-template options."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import ray
from data_helpers import write_jsonl
from hydra import compose, initialize_config_dir

from icepop.config import Config
from icepop.config.checks import cpu_flags, engine_dtype
from icepop.stages import setup
from icepop.train import CONF_DIR, execute, prepare

RAY_MARKS = ("raylet", "gcs_server", "ray::")


def ray_processes() -> set[int]:
    """Ray's processes (daemons, workers) of runs made by this test: they inherit its ICEPOP_CACHE."""
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(mark in " ".join(proc.info["cmdline"] or []) for mark in RAY_MARKS):
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("ICEPOP_CACHE") == os.environ["ICEPOP_CACHE"]:
                    found.add(proc.info["pid"])
    return found


def refusal(tmp_path: Path, *overrides: str, recipe: str = "rlvr") -> str:
    """The message a command line with these overrides stops with, in-process; fails if it did not stop
    or started Ray. (train.steps=1 bounds a case that wrongly got through.)"""
    before = ray_processes()
    given = [f"+recipe={recipe}", f"run.dir={tmp_path / 'run'}", "train.steps=1", *overrides]
    with (
        pytest.raises(SystemExit) as stopped,
        initialize_config_dir(config_dir=str(CONF_DIR), version_base=None),
    ):
        execute(*prepare(compose(config_name="config", overrides=given), given))
    assert not ray.is_initialized() and not ray_processes() - before, "Ray was started"
    message = stopped.value.code
    assert isinstance(message, str) and message.startswith("icepop: ") and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A dataset with other field names, a too-small one, rows naming an unknown task, a model folder
    without config.json and one whose tokenizer has no chat template."""
    root = tmp_path_factory.mktemp("inputs")
    rows = [
        {"question": f"What is {i} + 1?", "solution": str(i + 1), "kind": "arithmetic"} for i in range(40)
    ]
    tiny = setup.tiny_base_model("dense", seed=0)
    no_template = root / "no-template"
    shutil.copytree(tiny, no_template)
    tokenizer_config = json.loads((no_template / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    (root / "no-config").mkdir()
    return {
        "questions": write_jsonl(root / "questions.jsonl", rows),
        "few": write_jsonl(root / "few.jsonl", [{"prompt": "1 + 1?", "answer": "2"}] * 3),
        "odd_tasks": write_jsonl(root / "tasks.jsonl", [{**r, "kind": "algebra"} for r in rows]),
        "bad_answers": write_jsonl(root / "bad-answers.jsonl", [{**r, "kind": "countdown"} for r in rows]),
        "no_template": str(no_template),
        "no_config": str(root / "no-config"),
    }


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICEPOP_CACHE", str(tmp_path_factory.getbasetemp() / "icepop-cache"))


QUESTIONS = ["data.source={questions}", "data.prompt_field=question", "data.answer_field=solution",
             "data.task_field=kind"]  # fmt: skip
CASES = [
    # (overrides, what the message must name); "{name}" is filled from the `files` fixture.
    (["model.path=/nonexistent/model"], "model.path='/nonexistent/model'"),
    (["model.path={no_config}"], "has no config.json"),
    (["model.path={no_template}"], "has no chat template"),
    (["data.max_prompt_tokens=1000", "rollout.max_new_tokens=100"], "longer than the 1024 positions"),
    (["rollout.max_model_len=100"], "rollout.max_model_len=100 leaves no room"),
    (["data.source=countdwn"], "did you mean 'countdown'?"),
    (["data.source=/nonexistent/train.jsonl"], "does not exist"),
    (["data.source={questions}"], "no column 'prompt' (data.prompt_field)"),
    ([*QUESTIONS, "data.eval_source=/nonexistent/test.jsonl"], "does not exist"),
    (["data.source={few}", "data.eval_size=1"], "algo.prompts_per_step=16"),
    ([*QUESTIONS, "data.source={odd_tasks}", "data.eval_size=4"], "no built-in verifier: ['algebra']"),
    # The built-in verifier, scored in the driver on a held-out row: a countdown answer that is a number.
    ([*QUESTIONS, "data.source={bad_answers}", "data.eval_size=4"], 'countdown answer must be {"target"'),
    (["data.source={no_config}", "data.subset=main"], "could not be loaded"),
    (["reward.function=not_a_dotted_path"], "reward.function='not_a_dotted_path'"),
    (["reward.function=no_such_module:score"], "cannot import module 'no_such_module'"),
    (["reward.function=os:getcwd"], "it is called as fn(prompt, response_text)"),
    (["reward.function=e2e_rewards:broken"], ', in broken\n    return float(prompt.meta["no_such_column"])'),
    (["reward.function=e2e_rewards:broken"], "KeyError: 'no_such_column'"),
    (["reward.function=e2e_rewards:not_a_number"], "ValueError: reward function returned nan"),
    (["reward.task=maths"], "reward.task='maths' has no built-in verifier"),
    (["reward.rule_weight=0"], "has no reward"),
    (["reward.model_path=/nonexistent/rm"], "reward.model_path='/nonexistent/rm'"),
    (["trainer.grad_clip=-1"], "trainer.grad_clip must be >= 0"),
    (["trainer.warmup_steps=-5"], "trainer.warmup_steps must be >= 0"),
    (["trainer.weight_decay=-0.1"], "trainer.weight_decay must be >= 0"),
    (["trainer.lr_schedule=linear"], "trainer.lr_schedule='linear' is not one of constant, cosine"),
    (["algo.kl_coef=-0.01"], "algo.kl_coef must be >= 0"),
    (["algo.samples_per_prompt=1"], "algo.samples_per_prompt=1"),
    (["+trainer.lrr=1e-5"], "trainer.lrr=1e-05 is not a setting icepop reads; did you mean trainer.lr?"),
    (["+algo.kl_coeff=0.1"], "did you mean algo.kl_coef?"),
    (["rollout.gpus_per_engine=2"], "tensor parallelism is not supported"),
    (["rollout.enforce_eager=false"], "rollout.enforce_eager=false needs GPUs"),
    (["cluster.placement=colocated"], "rollout.engines must equal trainer.ranks (2); got rollout.engines=1"),
    (
        ["cluster.placement=colocated", "rollout.engines=2", "rollout.gpus_per_engine=1"],
        "rollout.gpus_per_engine must equal trainer.gpus_per_rank (0); got 1",
    ),
    (["cluster.placement=together"], "cluster.placement='together' is not one of disaggregated, colocated"),
    (["rollout.top_k=-1"], "rollout.top_k must be >= 0"),
    (["data.eval_size=100000"], "data.eval_size=100000 held-out problems of 'countdown' are more than"),
    (["trainer.backend=fsdp"], "trainer.backend='fsdp' is not one of deepspeed"),
    (["rollout.backend=sglang"], "rollout.backend='sglang' is not one of vllm"),
    (["rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization is the fraction"),
    (["algo.ratio_low=1.5"], "must hold 1 (trainer and engine agreeing)"),
    (["logger.wandb_mode=onlin"], "logger.wandb_mode='onlin' is not one of offline, online, disabled"),
    (["logger.alert_window=0"], "logger.alert_window must be > 0"),
    (["trainer.eps=0"], "trainer.eps must be > 0"),
]


@pytest.mark.parametrize(("overrides", "named"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_stops_before_anything_starts_and_names_it(
    tmp_path: Path, files: dict[str, str], overrides: list[str], named: str
) -> None:
    message = refusal(tmp_path, *(o.format(**files) for o in overrides))
    assert named in message, message


def test_an_rlhf_stage_without_a_reward_model_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, recipe="rlhf")
    assert "the rlhf stage has no reward: set reward.model_path" in message


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["+recipe=rlvr", "data.source=countdwn"], "did you mean 'countdown'?"),
        (["+recipe=rlvr", "+trainer.lrr=1e-5"], "did you mean trainer.lr?"),
        (["+recipe=rlvr", "trainer.lrr=1e-5"], "trainer.lrr=1e-05 is not a setting icepop reads; did you"),
        (["+recipe=sft", "data.source=/nonexistent/chats.jsonl"], "does not exist"),
        (["+recipe=rm", "rm.source=/nonexistent/pairs.jsonl"], "rm.source='/nonexistent/pairs.jsonl'"),
    ],
)
def test_the_command_line_exits_with_one_line(tmp_path: Path, overrides: list[str], named: str) -> None:
    env = dict(os.environ)  # the shared ICEPOP_CACHE: a Ray process of this run would carry it
    before = ray_processes()
    result = subprocess.run([sys.executable, "-m", "icepop.train", *overrides, "run.dir=run"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert named in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not ray_processes() - before
    assert not list((tmp_path / "run").glob("checkpoints/*"))  # nothing was trained or saved


def compose_config(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        given = ["+recipe=rlvr", *overrides]
        config, _ = prepare(compose(config_name="config", overrides=given), given)
    return config


def gsm8k_folder(root: Path) -> Path:
    """A local dataset in GSM8K's layout: subsets "main" (train and test splits) and "socratic"."""
    root.mkdir()
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train.jsonl\n"
        "  - split: test\n    path: main/test.jsonl\n- config_name: socratic\n  data_files:\n"
        "  - split: train\n    path: socratic/train.jsonl\n---\n"
    )
    for subset, split, count in (("main", "train", 30), ("main", "test", 12), ("socratic", "train", 8)):
        (root / subset).mkdir(exist_ok=True)
        rows = [{"question": f"{subset} {split} {i}: {i} + {i}?", "answer": f"{2 * i}\n#### {2 * i}"}
                for i in range(count)]  # fmt: skip
        write_jsonl(root / subset / f"{split}.jsonl", rows)
    return root


def test_a_small_file_keeps_nine_tenths_of_its_rows_for_training(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """data.eval_size (64) would take all 40 rows of a small file: the held-out part is at most a tenth
    of the rows, and the data line says so."""
    config = compose_config(*(o.format(**files) for o in QUESTIONS), "algo.prompts_per_step=4")
    tokenizer = setup.load_tokenizer(setup.resolve_model(config), config.data)
    batches, held_out = setup.prompt_streams(config, tokenizer)
    assert (len(held_out), len(batches.items)) == (4, 36)
    assert "4 held out from the last rows of the train split; data.eval_size=64 capped at a tenth" in (
        capsys.readouterr().out
    )


def test_a_multi_config_dataset_with_a_held_out_split_loads_like_gsm8k(tmp_path: Path) -> None:
    folder = gsm8k_folder(tmp_path / "gsm8k")
    preset = [f"data.source={folder}", "data=gsm8k", "data.eval_size=8", "algo.prompts_per_step=4",
              "model=tiny-dense"]  # fmt: skip
    config = compose_config(*preset)
    assert (config.data.subset, config.data.split, config.data.eval_split) == ("main", "train", "test")
    tokenizer = setup.load_tokenizer(setup.resolve_model(config), config.data)
    stream, held_out = setup.prompt_streams(config, tokenizer)
    assert len(stream.items) == 30  # the training split is whole: nothing held out of it
    texts = [tokenizer.decode(p.prompt_ids) for p in held_out]
    assert len(held_out) == 8 and all("main test" in t for t in texts)
    assert all("main train" in tokenizer.decode(p.prompt_ids) for p in stream.items)
    assert held_out[0].answer.endswith("#### " + str(2 * int(texts[0].split("main test ")[1].split(":")[0])))
    socratic = compose_config(*preset, "data.subset=socratic", "data.eval_split=null", "data.eval_size=2")
    stream, held_out = setup.prompt_streams(socratic, tokenizer)
    assert (len(stream.items), len(held_out)) == (7, 1)  # no held-out split: a tenth of train, at most
    with pytest.raises(ValueError, match=r"has several subsets; name one with data\.subset"):
        setup.prompt_streams(compose_config(*preset, "data.subset=null"), tokenizer)


def test_system_prompt_and_chat_template_options_reach_every_prompt(tmp_path: Path) -> None:
    rows = write_jsonl(
        tmp_path / "q.jsonl", [{"prompt": f"{i} + 1?", "answer": str(i + 1)} for i in range(24)]
    )
    config = compose_config(f"data.source={rows}", "data.system_prompt=Be brief.", "data.eval_size=4",
                            "model=tiny-dense", "algo.prompts_per_step=4")  # fmt: skip
    tokenizer = setup.load_tokenizer(setup.resolve_model(config), config.data)
    stream, held_out = setup.prompt_streams(config, tokenizer)
    for prompt in [*stream.items, *held_out]:
        text = tokenizer.decode(prompt.prompt_ids)
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"), text
    # A conversation with its own system message keeps it.
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(own, tokenize=False).startswith("<|im_start|>system\nMine.")
    # Extra template arguments reach the template (Qwen3's enable_thinking; the tiny one ignores x).
    calls = []
    tokenizer.tokenizer.apply_chat_template = lambda messages, **kwargs: calls.append(kwargs) or [1]
    tokenizer.template_kwargs = {"enable_thinking": False}
    tokenizer.apply_chat_template(own, add_generation_prompt=True)
    assert calls == [{"enable_thinking": False, "add_generation_prompt": True}]


def test_a_users_own_model_gets_the_real_model_defaults_and_says_where_each_comes_from(
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = setup.tiny_base_model("dense", seed=0)
    config = compose_config(f"model.path={folder}")
    # Not the tiny preset's lr 1e-4 and 32 tokens: model=custom was chosen for it; its engine dtype
    # follows this machine (rollout.dtype=auto) and the plan says why.
    dtype, why = engine_dtype(0, cpu_flags())
    assert config.trainer.lr == 2e-6 and config.rollout.dtype == dtype
    assert config.rollout.max_new_tokens == 512 and config.model.sft_warmup is False
    printed = capsys.readouterr().out
    assert "trainer.lr              2e-06  (default)" in printed
    assert f"rollout.dtype           {dtype}  (auto: {why})" in printed
    assert f"model.path              {folder}  (command line)" in printed
    assert "rollout.max_model_len   1024  (data.max_prompt_tokens + rollout.max_new_tokens)" in printed
    tiny = compose_config("model=tiny-moe")
    assert (tiny.trainer.lr, tiny.rollout.dtype, tiny.rollout.max_new_tokens) == (1e-4, "float32", 32)
    assert "trainer.lr              0.0001  (model=tiny-moe)" in capsys.readouterr().out


def readme_commands(section: str) -> list[list[str]]:
    """The `python -m icepop.train` command lines of a README section's code block, as argument lists."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = body.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [line.split()[3:] for line in block.splitlines() if line.startswith("python -m icepop.train")]


def in_hub_cache(hub: Path, kind: str, repo: str, folder: Path) -> None:
    """Put `folder` into a Hugging Face hub cache as repo `repo` (what `hf download` leaves behind)."""
    root = hub / f"{kind}s--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / ("0" * 40))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)


def test_the_readme_commands_for_your_own_model_and_data_pass_a_dry_run(tmp_path: Path) -> None:
    local, hub = readme_commands("Your own model and data")
    tiny = setup.tiny_base_model("dense", seed=0)
    # The local command's files, in the directory it runs in.
    shutil.copytree(tiny, tmp_path / "my-model")
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(300)]
    write_jsonl(tmp_path / "train.jsonl", rows[:250])
    write_jsonl(tmp_path / "test.jsonl", rows[250:])
    # No network here: the hub command gets stand-ins (the tiny model, a GSM8K-shaped folder) under its
    # names in a Hugging Face cache of its own, read offline.
    in_hub_cache(tmp_path / "hf" / "hub", "model", "HuggingFaceTB/SmolLM2-135M-Instruct", tiny)
    in_hub_cache(tmp_path / "hf" / "hub", "dataset", "openai/gsm8k", gsm8k_folder(tmp_path / "gsm8k"))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for command in (local, hub):
        small = ["run.dry_run=true", "data.eval_size=8", "algo.prompts_per_step=4"]  # the files are small
        argv = [sys.executable, "-m", "icepop.train", *command, *small]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "every check passed; nothing was started" in result.stdout
        assert "trainer.lr              2e-06  (default)" in result.stdout  # the real-model defaults
        # Every setting the command line changed is in the plan, and one prompt as the engine sees it.
        assert re.search(r"\n  algo.prompts_per_step +4  \(command line\)\n", result.stdout), result.stdout
        assert "a held-out prompt as the engine sees it:\n<|im_start|>" in result.stdout
        assert "scored by the built-in verifier for task 'math'" in result.stdout
    assert "held out from openai/gsm8k (test split)" in result.stdout
