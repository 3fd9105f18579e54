"""Per-token log-probs and entropy from logits, in chunks of rows.

The naive `log_softmax(logits.float()).gather(...)` materialises several [tokens × vocab] float32
tensors (log-softmax, its exp for the entropy, their product, and as many again in backward): with a
151,936-token vocabulary, 8k tokens cost 5 GB each, which is where trainers run out of memory.

Here the forward pass walks the rows in chunks of `CHUNK_BYTES` of float32 and keeps only
[N]-sized results (log-prob, entropy, log-sum-exp); the backward pass recomputes each chunk's softmax
and writes the chunk's gradient straight into the gradient buffer. With `inplace_backward=True` that
buffer is the logits' own storage (as flash-attn's cross-entropy does), so nothing of size
[N × V] is allocated at all; autograd's version counter makes any other user of those logits fail
loudly instead of reading the overwritten values.

Temperature is applied inside, chunk by chunk: log-probs must be those of the same processed
distribution the inference engine sampled from (docs/algorithm.md §1).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BYTES = {"cpu": 64 * 2**20, "accelerator": 256 * 2**20}
"""Target size of one float32 chunk of logits; at most two such buffers are alive at a time. CPUs
prefer chunks that stay near the caches; GPUs prefer fewer, larger kernels (launch overhead)."""


def _chunk_rows(logits: Tensor, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1 or None (automatic); got {chunk_rows}")
        return chunk_rows
    budget = CHUNK_BYTES["cpu" if logits.device.type == "cpu" else "accelerator"]
    return max(1, budget // (4 * logits.shape[-1]))


def _work_dtype(logits: Tensor) -> torch.dtype:
    """float32 for 16- and 32-bit logits; float64 logits keep float64 (exact references in tests)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _scaled_chunk(
    logits: Tensor, start: int, stop: int, temperature: float, out: Tensor | None = None
) -> Tensor:
    """Rows [start, stop) divided by the temperature, in the work dtype, written into `out` when it
    is given (a slice of the gradient buffer of the same dtype), else into a fresh buffer."""
    rows = logits[start:stop]
    if out is None:
        chunk = rows.to(_work_dtype(logits), copy=True)
    else:
        chunk = out if out.data_ptr() == rows.data_ptr() else out.copy_(rows)
    return chunk.div_(temperature) if temperature != 1.0 else chunk


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        labels: Tensor,
        temperature: float,
        chunk_rows: int,
        inplace_backward: bool,
    ) -> tuple[Tensor, Tensor]:
        rows = logits.shape[0]
        logprobs = torch.empty(rows, dtype=_work_dtype(logits), device=logits.device)
        entropy = torch.empty_like(logprobs)
        lse = torch.empty_like(logprobs)
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            plain = temperature == 1.0 and logits.dtype == logprobs.dtype
            z = logits[start:stop] if plain else _scaled_chunk(logits, start, stop, temperature)  # [n, V]
            lse[start:stop] = torch.logsumexp(z, dim=-1)
            logprobs[start:stop] = z.gather(-1, labels[start:stop, None]).squeeze(-1) - lse[start:stop]
            # H = lse − Σ_j p_j z_j with p = exp(z − lse), in one [n, V] buffer.
            pz = z.sub(lse[start:stop, None]).exp_().mul_(z)
            entropy[start:stop] = lse[start:stop] - pz.sum(dim=-1)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its terms
        ctx.temperature, ctx.chunk_rows, ctx.inplace_backward = temperature, chunk_rows, inplace_backward
        return logprobs, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None
    ) -> tuple[Tensor, None, None, None, None]:
        logits, labels, lse, entropy = ctx.saved_tensors  # type: ignore[attr-defined]
        temperature: float = ctx.temperature  # type: ignore[attr-defined]
        grad_logits = logits if ctx.inplace_backward else torch.empty_like(logits)  # type: ignore[attr-defined]
        # When the gradient has the work dtype, each chunk is computed inside its own slice of the
        # gradient buffer: one [n, V] temporary (p) per chunk, and none of size [N, V] when in place.
        in_buffer = grad_logits.dtype == lse.dtype
        rows, chunk_rows = logits.shape[0], ctx.chunk_rows  # type: ignore[attr-defined]
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            out = grad_logits[start:stop] if in_buffer else None
            grad = _scaled_chunk(logits, start, stop, temperature, out).sub_(lse[start:stop, None])  # log p
            p = torch.exp(grad)
            if grad_entropy is not None:  # ∂H/∂z_j = −p_j (log p_j + H)
                grad.add_(entropy[start:stop, None]).mul_(p).mul_(-grad_entropy[start:stop, None])
            else:
                grad.zero_()
            if grad_logprobs is not None:  # ∂ℓ_y/∂z_j = 1[j = y] − p_j
                g = grad_logprobs[start:stop, None]
                grad.sub_(p.mul_(g)).scatter_add_(-1, labels[start:stop, None], g)
            if temperature != 1.0:
                grad.div_(temperature)
            if not in_buffer:
                grad_logits[start:stop] = grad
        return grad_logits, None, None, None, None


def logprobs_and_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """log softmax(logits / T)[label] and the entropy of softmax(logits / T), per position.

    logits [..., V] (any float dtype; math in float32, or float64 for float64 logits), labels [...]
    integers in [0, V). Returns (logprobs [...], entropy [...]), differentiable w.r.t. logits.
    inplace_backward=True writes the gradient into the logits' storage: use it only when nothing
    else needs those logits after the backward pass (autograd raises if something does).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            "labels must have the shape of logits without the vocabulary dimension, "
            f"{tuple(logits.shape[:-1])}; got {tuple(labels.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor; got {logits.dtype}")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1).long()
    if flat_labels.numel() and (int(flat_labels.min()) < 0 or int(flat_labels.max()) >= vocab):
        raise ValueError(
            f"labels must lie in [0, {vocab}); got values in "
            f"[{int(flat_labels.min())}, {int(flat_labels.max())}] (mask padding with a valid id)"
        )
    rows = _chunk_rows(flat_logits, chunk_rows)
    logprobs, entropy = _LogprobEntropy.apply(flat_logits, flat_labels, temperature, rows, inplace_backward)
    return logprobs.view(labels.shape), entropy.view(labels.shape)


def logprobs_and_entropy_naive(
    logits: Tensor, labels: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The unchunked reference: log_softmax + gather, entropy from the full softmax. For tests and
    benchmarks; it materialises several [N × V] float32 tensors."""
    logp = torch.log_softmax(logits.to(_work_dtype(logits)) / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return logp.gather(-1, labels[..., None].long()).squeeze(-1), entropy
