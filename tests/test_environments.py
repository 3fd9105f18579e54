"""Multi-turn pieces that need no engine: the environment seam, observation tokens, the masks that keep
observations out of the loss, the by-turn metrics, and the built-in environments' replies (their code
runs in the real sandbox). The engine-backed episodes are tests/test_episodes.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_config import compose_config

from icepop.algo import PolicyLossOptions, mismatch_by_turn, pg_loss, turn_index
from icepop.data.prompts import chat_ids
from icepop.data.tasks import humaneval_problem, problem
from icepop.envs import Turn, demonstration_for, environment_factory
from icepop.envs.base import started
from icepop.envs.code_repair import CodeRepair
from icepop.envs.python_tool import SYSTEM, PythonTool, demonstration
from icepop.errors import InputError
from icepop.preflight import check_inputs
from icepop.rollout.episodes import observation_ids
from icepop.stages.batch import rl_batch
from icepop.stages.setup import check_environment_start
from icepop.types import Completion, Prompt


class Counter:
    """A custom environment (tests use it by dotted path, test_environments:Counter): "count" three
    times, rewarded on the third."""

    def start(self, prompt: Prompt) -> list[dict[str, str]]:
        self.turns = 0
        return [{"role": "user", "content": "count"}]

    def step(self, reply: str) -> Turn:
        self.turns += 1
        done = self.turns == 3
        return Turn([{"role": "user", "content": str(self.turns)}], reward=float(done), done=done)


class ToolEveryTurn(PythonTool):
    """The Python tool, but a turn without code gets a tool message too ("(no code)") instead of being
    scored (tests use it by dotted path, test_environments:ToolEveryTurn): every episode whose first turn
    ends on <|im_end|> goes on after a tool message, whatever the tiny model chose to write, so tests of
    multi-turn episodes see them on every CPU. It keeps the tool's `demonstration` for the warm-up."""

    def step(self, reply: str) -> Turn:
        if "```" in reply:
            return super().step(reply)
        return Turn([{"role": "tool", "content": "(no code)"}])


class NoStep:
    def start(self, prompt: Prompt) -> list[dict[str, str]]:
        return [{"role": "user", "content": "hi"}]


def test_environments_are_built_in_names_or_dotted_paths() -> None:
    assert environment_factory("python_tool") is PythonTool
    assert environment_factory("code_repair") is CodeRepair
    assert environment_factory("test_environments:Counter") is Counter
    with pytest.raises(ValueError, match="neither a built-in environment"):
        environment_factory("pyton_tool")
    with pytest.raises(ImportError, match=re.escape("environment 'no_such_pkg.envs:Make': cannot import")):
        environment_factory("no_such_pkg.envs:Make")


def test_an_environment_with_a_demonstration_writes_the_warm_ups_conversations() -> None:
    """The SFT warm-up asks the environment (icepop.stages.sft), not its name: python_tool and a subclass
    by dotted path write the tool's exchange; one without `demonstration` leaves the task's own."""
    item = problem("arithmetic", 0, 1, digits=2, operators="*")
    for name in ("python_tool", "test_environments:ToolEveryTurn"):
        written = demonstration_for(name)
        assert written is not None and written(item) == demonstration(item), name
    assert demonstration_for("code_repair") is None and demonstration_for("test_environments:Counter") is None
    assert compose_config("+recipe=rlvr-tools").rollout.environment == "python_tool"  # the recipe's own


def test_start_must_return_a_conversation_for_the_model_to_answer() -> None:
    class Bad:
        def __init__(self, messages: object) -> None:
            self.messages = messages

        def start(self, prompt: Prompt) -> object:
            return self.messages

    assert started(Counter(), Prompt([1])) == [{"role": "user", "content": "count"}]
    for messages in ([], "count", [{"role": "user"}], [{"role": "assistant", "content": "x"}]):
        with pytest.raises(ValueError, match=r"Bad.start\(\) returned"):
            started(Bad(messages), Prompt([1]))  # type: ignore[arg-type]


def test_preflight_names_a_broken_environment_before_anything_starts() -> None:
    base = ["+recipe=rlvr-tools", "model.sft_warmup=false"]
    check_inputs(compose_config(*base))
    with pytest.raises(
        InputError,
        match=re.escape("rollout.environment='test_environments:NoStep' made a NoStep without step"),
    ):
        check_inputs(compose_config(*base, "rollout.environment=test_environments:NoStep"))
    with pytest.raises(InputError, match=re.escape("rollout.environment='nope.envs:Make': environment")):
        check_inputs(compose_config(*base, "rollout.environment=nope.envs:Make"))
    with pytest.raises(InputError, match=re.escape("reward.model_path='/rm' would not be used")):
        check_inputs(compose_config(*base, "reward.model_path=/rm"))


def test_the_episode_budget_sets_the_context_and_the_loss_length() -> None:
    config = compose_config("+recipe=rlvr-tools", "rollout.max_episode_tokens=null")
    rollout = config.rollout
    assert rollout.response_tokens() == 2 * 3 * 32  # max_turns × max_new_tokens, twice: observations
    assert rollout.context_length(256) == 256 + 192
    assert compose_config("+recipe=rlvr-tools").rollout.context_length(256) == 256 + 96
    assert compose_config("+recipe=rlvr").rollout.response_tokens() == config.rollout.max_new_tokens


def test_observation_tokens_are_the_template_after_the_models_end_of_turn(tokenizer) -> None:
    """Prompt + the model's canonical tokens + observation_ids is exactly the chat template's rendering
    of the whole conversation, up to the opened next assistant turn."""
    messages = [{"role": "user", "content": "What is 7 * 8?"}]
    reply = "```python\nprint(7 * 8)\n```"
    tool = [{"role": "tool", "content": "56"}]
    prompt = chat_ids(tokenizer, messages, add_generation_prompt=True)
    model = [*tokenizer.encode(reply), tokenizer.eos_token_id]  # the engine stops on <|im_end|>
    whole = chat_ids(tokenizer, [*messages, {"role": "assistant", "content": reply}, *tool], True)
    assert prompt + model + observation_ids(tokenizer, tool) == whole
    assert (
        tokenizer.decode(observation_ids(tokenizer, tool))
        == "\n<|im_start|>tool\n56<|im_end|>\n<|im_start|>assistant\n"
    )


def episode_batch():
    """Two episodes of one prompt [5, 6]: model 2 tokens, observation 3, model 2; and model 3 tokens."""
    mask = [True, True, False, False, False, True, True]
    first = Completion(
        [11, 12, 90, 91, 92, 13, 14], [-0.1, -0.2, 0.0, 0.0, 0.0, -0.3, -0.4], "stop", "", mask
    )
    second = Completion([21, 22, 23], [-0.5, -0.6, -0.7], "stop", "", [True] * 3)
    return rl_batch([Prompt([5, 6])], [[first, second]], torch.tensor([1.0, -1.0]), pad_id=0)


def test_observations_are_context_not_response() -> None:
    batch = episode_batch()
    # Label positions 1..7 hold the episode's tokens (prompt length 2: position j predicts token j + 1).
    assert batch.response_mask[0].tolist() == [False, True, True, False, False, False, True, True]
    assert batch.advantages[0].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert batch.rollout_logprobs[0, 1:].tolist() == pytest.approx([-0.1, -0.2, 0, 0, 0, -0.3, -0.4])
    assert int(batch.response_mask.sum()) == 7  # the token-mean denominator: the model's tokens only
    assert turn_index(batch.response_mask).tolist() == [[0, 1, 1, 0, 0, 0, 2, 2], [0, 1, 1, 1, 0, 0, 0, 0]]


def test_observation_tokens_contribute_nothing_to_loss_or_gradient() -> None:
    """Whatever the trainer's and the engine's log-probs at the observation positions (here wild
    values, even ones IcePop would mask), the loss and every other position's gradient are those of
    the same episode with the observations taken out by hand, and the observations' gradient is 0."""
    batch = episode_batch()
    options = PolicyLossOptions()
    torch.manual_seed(0)
    base = batch.rollout_logprobs.double() + 0.05 * torch.rand(batch.response_mask.shape, dtype=torch.float64)
    observation = torch.zeros_like(batch.response_mask)
    observation[0, 3:6] = True
    results = []
    for noise in (0.0, 7.0):
        logprobs = (base + noise * observation).requires_grad_()
        rollout = batch.rollout_logprobs.double() - noise * observation
        loss = pg_loss(
            logprobs, base.detach(), rollout, batch.advantages.double(), batch.response_mask, options
        )
        loss.loss.backward()
        results.append((loss.loss.detach(), logprobs.grad))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])
    assert not results[0][1][observation].any()
    # By hand: the rows without the observation tokens at all, i.e. model tokens [11, 12, 13, 14].
    kept = batch.response_mask[0].nonzero().flatten()
    by_hand = base.detach()[0, kept].clone().requires_grad_()
    ratio = torch.exp(by_hand - batch.rollout_logprobs.double()[0, kept])  # IcePop's k, ℓ_old = ℓ_θ here
    first_row = -(ratio * 1.0).sum()
    other = batch.response_mask[1]
    second_row = -(torch.exp(base[1, other] - batch.rollout_logprobs.double()[1, other]) * -1.0).sum()
    assert torch.allclose(results[0][0], (first_row + second_row) / 7, atol=1e-12)  # k ≈ 1: all kept


def test_mismatch_by_turn_is_per_model_turn() -> None:
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    delta = torch.tensor([[0.1, -0.3, 9.0, 0.5], [0.2, 0.0, 0.0, 0.0]])
    keep = torch.tensor([[True, True, False, False], [True, False, False, False]])
    metrics = mismatch_by_turn(delta, keep, mask)
    assert float(metrics["turn_1/abs_log_ratio_mean"]) == pytest.approx((0.1 + 0.3 + 0.2) / 3)
    assert float(metrics["turn_2/abs_log_ratio_mean"]) == pytest.approx(0.5)
    assert float(metrics["turn_1/mask_frac"]) == 0.0 and float(metrics["turn_2/mask_frac"]) == 1.0
    assert float(metrics["turn_1/tokens"]) == 3 and "turn_3/tokens" not in metrics


def test_the_python_tool_runs_code_in_the_sandbox_then_scores_the_answer() -> None:
    prompt = Prompt(
        [1], 3078, "arithmetic", {"messages": problem("arithmetic", 0, 0, digits=2, operators="*").messages}
    )
    env = PythonTool()
    messages = env.start(prompt)
    assert messages[0]["content"].startswith("Run Python") and messages[-1]["content"] == "What is 57 * 54?"
    ran = env.step("```python\nprint(57 * 54)\n```")
    assert ran == Turn([{"role": "tool", "content": "3078"}], info={"tool_calls": 1, "tool_errors": False})
    failed = env.step("```python\nprint(1/0)\n```")
    assert (
        failed.observation[0]["content"] == "ZeroDivisionError: division by zero"
        and failed.info["tool_errors"]
    )
    assert env.step("3078") == Turn(reward=1.0, done=True)
    assert env.step("3077").reward == 0.0


def test_a_demonstration_is_the_exchange_the_tool_really_gives_or_the_direct_answer() -> None:
    kinds = []
    for task, options in (("arithmetic", {"digits": 2, "operators": "*"}), ("countdown", {})):
        for index in range(8):
            example = problem(task, 0, index, **options)
            conversation = demonstration(example)
            assert (
                conversation[0] == {"role": "system", "content": SYSTEM}
                and conversation[1] == example.messages[-1]
            )
            env = PythonTool()
            env.start(Prompt([1], example.answer, task, {"messages": example.messages}))
            if len(conversation) == 5:  # the tool's exchange
                code, tool = conversation[2:4]
                assert env.step(code["content"]).observation == [tool]
            else:
                assert len(conversation) == 3
            assert env.step(conversation[-1]["content"]) == Turn(reward=1.0, done=True)
            kinds.append(len(conversation))
    assert 4 <= kinds.count(5) <= 12  # about half call the tool


def test_code_repair_feeds_back_the_failing_test_then_rewards_passing() -> None:
    example = humaneval_problem(0)
    env = CodeRepair()
    assert env.start(Prompt([1], example.answer, "code", {"messages": example.messages})) == example.messages
    wrong = env.step("```python\ndef has_close_elements(numbers, threshold):\n    return False\n```")
    assert not wrong.done and wrong.reward == 0.0
    assert wrong.observation[0]["role"] == "tool" and "AssertionError" in wrong.observation[0]["content"]
    assert env.step(example.target_reply) == Turn(reward=1.0, done=True, info={"test_runs": 1})


def test_an_environments_first_conversation_must_fit_the_context(tokenizer) -> None:
    example = problem("arithmetic", 0, 0, digits=2, operators="*")
    prompt = Prompt(
        chat_ids(tokenizer, example.messages, True),
        example.answer,
        "arithmetic",
        {"messages": example.messages},
    )
    check_environment_start(compose_config("+recipe=rlvr-tools"), tokenizer, prompt)
    with pytest.raises(
        ValueError,
        match=r"first conversation has 80 tokens, no room for a reply in the engine's context of 70",
    ):
        check_environment_start(
            compose_config("+recipe=rlvr-tools", "rollout.max_model_len=70"), tokenizer, prompt
        )


def test_the_readme_environment_plays_its_game() -> None:
    """README's "Writing an environment" example, as printed there (at most 30 lines of code)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("```python\n# my_envs.py")[1].split("```\n")[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 30
    namespace: dict = {}
    exec("# my_envs.py" + code, namespace)
    env = namespace["Guess"]()
    assert started(env, Prompt([3, 4]))[-1] == {"role": "user", "content": "Your first guess?"}
    assert env.step("many") == Turn(
        [{"role": "user", "content": "A number, please."}], info={"bad_replies": 1}
    )
    low, high = 1, 100
    for _ in range(7):  # bisection finds it within 7 guesses
        guess = (low + high) // 2
        turn = env.step(str(guess))
        if turn.done:
            break
        low, high = (guess + 1, high) if "higher" in turn.observation[0]["content"] else (low, guess - 1)
    assert turn == Turn(reward=1.0, done=True) and guess == env.secret
