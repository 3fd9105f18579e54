"""An agent written only against the `openai` client, trained with `+recipe=agent` (README, "Unmodified
agents"): the model may run a ```python print(...)``` block on a calculator before it answers."""

import ast
import operator
import re

SYSTEM = "Run Python with a ```python block to see its output. Then answer with the result only."
CODE = re.compile(r"```(?:python)?\n?(.*?)(?:```|$)", re.DOTALL)  # an unclosed block runs to the end
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(code: str) -> str:
    """The output of `print(<+ - * / on numbers>)`, or why it has none: the only program this tool runs."""

    def value(node: ast.expr) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("only + - * / on numbers")

    try:
        call = ast.parse(code.strip(), mode="eval").body
        assert isinstance(call, ast.Call) and getattr(call.func, "id", "") == "print" and len(call.args) == 1
        return str(value(call.args[0]))
    except Exception as error:  # the model's code is data: its error is the tool's answer
        return f"error: {error or 'expected print(<expression>)'}"


def agent(row: dict, client) -> float:
    """One episode: up to 3 model turns; a turn without code is the answer, 1.0 when right."""
    messages = [{"role": "system", "content": SYSTEM}, *[m for m in row["messages"] if m["role"] != "system"]]
    for _ in range(3):
        reply = client.chat.completions.create(model="policy", messages=messages).choices[0].message.content
        messages.append({"role": "assistant", "content": reply})
        if (code := CODE.search(reply)) is None:
            return float(reply.strip() == str(row["answer"]))
        messages.append({"role": "tool", "content": calculate(code.group(1))})
    return 0.0


# For icepop's tiny models only: their SFT warm-up learns this exchange from the Python tool's conversations.
from icepop.envs.python_tool import demonstration  # noqa: E402

agent.demonstration = demonstration  # type: ignore[attr-defined]
