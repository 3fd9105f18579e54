"""The forward of one micro-batch, padded or padding-free (trainer.packing), and what packing needs of a
model.

Padded, a micro-batch is [rows, longest] with an attention mask. Packed, its rows are concatenated into
one sequence [1, Σ lengths] with position ids restarting at 0 per row and no attention mask, and
transformers keeps attention within each row from the position ids alone (5.19):
masking_utils._preprocess_mask_arguments runs find_packed_sequence_indices when attention_mask is None
and there is no cache, and create_causal_mask ANDs the causal mask with "same sequence" (a
block-diagonal causal mask for sdpa, eager and flex attention); flash attention gets no mask and
modeling_flash_attention_utils._flash_attention_forward calls the varlen kernel with cu_seqlens taken
from the position ids (_is_packed_sequence, prepare_fa_kwargs_from_position_ids). Any other attention
(a custom or hub kernel, paged attention, linear/recurrent layers) would let rows see each other:
`packing_problem` refuses it.

A causal LM's row of n tokens feeds its tokens 0…n−2 and is scored on labels 1…n−1, exactly the
positions of the padded forward that carry a real label; the packed results are scattered back to
[rows, L−1] (0 elsewhere), so masks, losses and metrics downstream are the padded path's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from icepop.algo import logprobs_and_entropy
from icepop.trainer.inputs import micro_batch_rows

ROW_SEPARATING_ATTENTION = (
    "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4",
)  # fmt: skip
"""config._attn_implementation values whose packed forward keeps rows apart (see the module docstring)."""
ROW_SEPARATING_LAYERS = ("full_attention", "sliding_attention", "chunked_attention")
"""config.layer_types whose masks honour packed position ids; linear attention, convolutions and
recurrent layers carry state from one row into the next."""


def packing_problem(model_config: Any) -> str | None:
    """None when a model with this transformers config keeps packed rows apart, else what does not
    (its attention implementation, or layers that are not attention). An unset implementation is
    transformers' default, sdpa (or eager), which does."""
    attention = getattr(model_config, "_attn_implementation", None) or "sdpa"
    if attention not in ROW_SEPARATING_ATTENTION:
        return (
            f"its attention implementation {attention!r} cannot keep packed rows apart (transformers "
            f"separates them for {', '.join(ROW_SEPARATING_ATTENTION)})"
        )
    layers = sorted(set(getattr(model_config, "layer_types", None) or ()) - set(ROW_SEPARATING_LAYERS))
    if layers:
        return f"its {', '.join(layers)} layers would carry one packed row's state into the next"
    return None


def check_packing(config: Any) -> None:
    """Before anything starts: trainer.packing=true needs a model.path whose attention keeps packed
    rows apart (`packing_problem`); InputError naming both settings otherwise."""
    from transformers import AutoConfig

    from icepop.errors import InputError
    from icepop.stages.setup import resolve_model

    if not config.trainer.packing:
        return
    problem = packing_problem(AutoConfig.from_pretrained(resolve_model(config)))
    if problem is not None:
        raise InputError(
            f"trainer.packing=true cannot train model.path={config.model.path!r}: {problem}; set "
            "trainer.packing=false (trainer.micro_batch_tokens alone still cuts most padding)"
        )


def refuse_unpackable(model: Any) -> None:
    """ValueError when the loaded model cannot keep packed rows apart (a trainer rank's own check)."""
    problem = packing_problem(model.config)
    if problem is not None:
        raise ValueError(f"packing=True cannot train {type(model).__name__}: {problem}")


def micro_batch_items(lengths: Tensor, size: int, token_budget: int, packed: bool) -> list[Tensor]:
    """`micro_batch_rows` of items with these token lengths: [items] rows, or [2, pairs] (a preference
    batch, a pair being one item). Padded, a pair counts its longer row against half the budget (both
    rows are padded to the micro-batch's longest); packed, its two rows' sum against the whole."""
    if lengths.dim() == 1:
        return micro_batch_rows(lengths.tolist(), size, token_budget, packed)
    if packed:
        return micro_batch_rows(lengths.sum(0).tolist(), size, token_budget, packed)
    return micro_batch_rows(lengths.amax(0).tolist(), size, token_budget // lengths.shape[0])


def packed_positions(keep: Tensor) -> Tensor:
    """[1, N] position ids of the True entries of `keep` [rows, L] (a prefix of each row), row by row:
    0, 1, … restarting at each row."""
    columns = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    return columns[keep][None]


def unpack(values: Tensor, keep: Tensor) -> Tensor:
    """[rows, L] with the packed `values` [1, N] at the True entries of `keep`, 0 elsewhere; the
    gradient flows back to `values`."""
    return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values[0])


def token_logprobs(
    model: Any, input_ids: Tensor, attention_mask: Tensor, temperature: float, inplace_backward: bool,
    packed: bool, from_label: int = 0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(ℓ, entropy) of the labels input_ids[:, 1:], [b, L-1], of right-padded rows. Padded: feeding
    input_ids[:, :-1] gives exactly logits[:, :-1] (causal: logits at j see tokens ≤ j), contiguous and
    without a [b, L-1, V] slice copy, so the in-place backward really writes into the logits' own
    storage; label positions before `from_label` are not needed (0 there): the output head runs on the
    rest only (transformers' logits_to_keep; an RL update needs the replies' positions alone). Packed:
    each row's max(n−1, 1) inputs concatenated (module docstring); 0 past them."""
    if not packed:
        kept = {"logits_to_keep": input_ids.shape[1] - 1 - from_label} if from_label else {}
        out = model(
            input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], use_cache=False, **kept
        )
        logprobs, entropy = logprobs_and_entropy(
            out.logits,
            input_ids[:, 1 + from_label :],
            temperature=temperature,
            inplace_backward=inplace_backward,
        )
        return torch.nn.functional.pad(logprobs, (from_label, 0)), torch.nn.functional.pad(
            entropy, (from_label, 0)
        )
    inputs = (attention_mask.sum(-1) - 1).clamp(min=1)
    keep = torch.arange(input_ids.shape[1] - 1, device=input_ids.device) < inputs[:, None]
    out = model(input_ids=input_ids[:, :-1][keep][None], position_ids=packed_positions(keep), use_cache=False)
    logprobs, entropy = logprobs_and_entropy(
        out.logits, input_ids[:, 1:][keep][None], temperature=temperature, inplace_backward=inplace_backward
    )
    return unpack(logprobs, keep), unpack(entropy, keep)


@contextlib.contextmanager
def _score_head_outputs(model: Any) -> Iterator[list[Tensor]]:
    """The outputs of the reward model's `score` head ([1, N, 1]: one score per token) while inside."""
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    head = next(m for name, m in module.named_modules() if name.rsplit(".", 1)[-1] == "score")
    outputs: list[Tensor] = []
    handle = head.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def row_scores(
    model: Any, input_ids: Tensor, attention_mask: Tensor, rows: Tensor | None, device: torch.device,
    packed: bool,
) -> Tensor:  # fmt: skip
    """Reward-model scores of the selected rows (an index tensor), trimmed to their longest; rows None
    scores two one-token dummy rows (the padding micro-batch still runs ZeRO-3's gathers). The score is
    read where the model's own pooling reads it: each row's rightmost token that is not the pad token
    (transformers' GenericForSequenceClassification), so packed scores are the padded ones."""
    if rows is None:
        ids, mask = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long)
    else:
        ids, mask = input_ids[rows], attention_mask[rows]
        width = int(mask.sum(-1).max())
        ids, mask = ids[:, :width], mask[:, :width]
    ids, mask = ids.to(device), mask.to(device)
    if not packed:
        return model(input_ids=ids, attention_mask=mask).logits[:, 0]
    columns = torch.arange(ids.shape[1], device=device)
    keep = columns < mask.sum(-1).clamp(min=1)[:, None]
    pad = getattr(getattr(model, "module", model).config, "pad_token_id", None)
    lengths = keep.sum(-1)
    last = lengths - 1 if pad is None else (columns * (keep & (ids != pad))).argmax(-1)  # 0 if all pad
    with _score_head_outputs(model) as outputs:
        model(input_ids=ids[keep][None], position_ids=packed_positions(keep))
    return outputs[0][0, lengths.cumsum(0) - lengths + last, 0]
