"""Reward-model scoring for RLHF: a sequence-classification checkpoint (e.g. `+recipe=rm`'s output)
scores (prompt, response) conversations.

Key design choice: the reward model re-tokenizes each conversation from its chat messages with its
*own* tokenizer and chat template, so it need not share a vocabulary with the policy; responses go in
as text, exactly as a user-facing reward model would see them.
"""

from __future__ import annotations

from typing import Any

import torch

Messages = list[dict[str, str]]


class RewardModelScorer:
    """Scores conversations with a frozen reward model, `batch_size` at a time, without gradients."""

    def __init__(self, model_path: str, *, dtype: str = "float32", batch_size: int = 32) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch_dtype)
        if model.config.num_labels != 1:
            raise ValueError(
                f"reward.model_path={model_path!r} has {model.config.num_labels} output labels; a reward "
                "model has exactly one (train one with +recipe=rm)"
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size

    def _ids(self, messages: Messages, response: str) -> list[int]:
        conversation = [*messages, {"role": "assistant", "content": response}]
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=False, return_dict=False)
        return [int(i) for i in ids]

    @torch.no_grad()
    def score(self, conversations: list[Messages], responses: list[str]) -> list[float]:
        """One scalar per (prompt messages, response text), read at the conversation's last token."""
        scores: list[float] = []
        pad = self.model.config.pad_token_id
        pairs = list(zip(conversations, responses, strict=True))
        for start in range(0, len(pairs), self.batch_size):
            rows = [
                self._ids(messages, response) for messages, response in pairs[start : start + self.batch_size]
            ]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
            scores += self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return scores

    def close(self) -> None:
        del self.model


def prompt_messages(prompt: Any) -> Messages:
    """The chat messages of a Prompt (kept in its meta by icepop.data.prompts)."""
    messages = prompt.meta.get("messages")
    if not messages:
        raise ValueError("reward-model scoring needs each prompt's chat messages in Prompt.meta['messages']")
    return list(messages)
