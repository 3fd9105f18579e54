"""Chunked log-probs and entropy against the naive log_softmax + gather, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from icepop.algo import logprobs_and_entropy, logprobs_and_entropy_naive


def random_problem(shape: tuple[int, ...], vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    g_lp = torch.randn(shape, generator=g, dtype=torch.float64)
    g_h = torch.randn(shape, generator=g, dtype=torch.float64)
    return logits, labels, g_lp, g_h


def grads(fn, logits: torch.Tensor, labels: torch.Tensor, g_lp, g_h, **kwargs):
    leaf = logits.clone().requires_grad_(True)
    lp, h = fn(leaf, labels, **kwargs)
    (lp * g_lp.to(lp.dtype)).sum().add((h * g_h.to(h.dtype)).sum()).backward()
    return lp.detach(), h.detach(), leaf.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 3, None])
def test_matches_naive_in_float64(temperature: float, chunk_rows: int | None) -> None:
    # 2 × 5 = 10 rows: chunk 3 leaves a remainder chunk of 1.
    logits, labels, g_lp, g_h = random_problem((2, 5), 37, torch.float64)
    ours = grads(
        logprobs_and_entropy, logits, labels, g_lp, g_h, temperature=temperature, chunk_rows=chunk_rows
    )
    naive = grads(logprobs_and_entropy_naive, logits, labels, g_lp, g_h, temperature=temperature)
    for a, b in zip(ours, naive, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_float32_and_bfloat16_logits() -> None:
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)]:
        logits, labels, g_lp, g_h = random_problem((4, 6), 50, dtype, seed=1)
        lp, h, grad = grads(logprobs_and_entropy, logits, labels, g_lp, g_h, chunk_rows=5)
        # The exact answer for these (rounded) logits, in float64:
        lp64, h64, grad64 = grads(logprobs_and_entropy_naive, logits.double(), labels, g_lp, g_h)
        assert lp.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(lp.double(), lp64, atol=tol, rtol=0)
        torch.testing.assert_close(h.double(), h64, atol=tol, rtol=0)
        torch.testing.assert_close(
            grad.double(), grad64, atol=tol if dtype == torch.float32 else 2e-2, rtol=1e-2
        )


def test_only_one_output_used() -> None:
    logits, labels, g_lp, g_h = random_problem((7,), 11, torch.float64, seed=2)
    for output, upstream in [(0, g_lp), (1, g_h)]:  # only the log-probs, then only the entropy
        a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        (logprobs_and_entropy(a, labels, chunk_rows=2)[output] * upstream).sum().backward()
        (logprobs_and_entropy_naive(b, labels)[output] * upstream).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)


def test_entropy_of_uniform_and_certain_distributions() -> None:
    # Uniform over V = 8: entropy ln 8 = 2.07944154, every log-prob −ln 8.
    lp, h = logprobs_and_entropy(torch.zeros(3, 8), torch.tensor([0, 3, 7]))
    torch.testing.assert_close(h, torch.full((3,), math.log(8)))
    torch.testing.assert_close(lp, torch.full((3,), -math.log(8)))
    # One logit far above the rest: entropy → 0 and its log-prob → 0, without NaN.
    logits = torch.full((1, 8), -1e4)
    logits[0, 2] = 1e4
    lp, h = logprobs_and_entropy(logits, torch.tensor([2]))
    assert lp.item() == 0.0 and h.item() == 0.0


def test_inplace_backward_gives_the_same_gradient_in_the_logits_storage() -> None:
    logits, labels, g_lp, g_h = random_problem((3, 4), 29, torch.float32, seed=3)
    reference = grads(logprobs_and_entropy, logits, labels, g_lp, g_h)[2]
    hidden = torch.randn(12, 16, requires_grad=True)
    out = (hidden @ torch.randn(16, 29)).view(3, 4, 29)  # a non-leaf, as logits are in a model
    with torch.no_grad():
        out.copy_(logits)  # the reference problem's values (matmul saved its inputs, not `out`)
    storage = out.data_ptr()
    lp, h = logprobs_and_entropy(out, labels, inplace_backward=True, chunk_rows=5)
    captured = {}
    out.register_hook(lambda g: captured.setdefault("grad", g))
    ((lp * g_lp.float()).sum() + (h * g_h.float()).sum()).backward()
    assert captured["grad"].data_ptr() == storage
    torch.testing.assert_close(captured["grad"], reference, atol=1e-6, rtol=1e-6)
    assert hidden.grad is not None


def test_inplace_backward_refuses_to_clobber_logits_needed_elsewhere() -> None:
    logits = torch.randn(4, 9, requires_grad=True)
    scaled = logits * 2.0
    squared = scaled.pow(2).sum()  # pow saves `scaled` for its own backward
    lp, _ = logprobs_and_entropy(scaled, torch.zeros(4, dtype=torch.long), inplace_backward=True)
    # Our backward runs first (created last) and overwrites `scaled`; pow's backward must then refuse.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + squared).backward()


def test_no_grad_forward() -> None:
    logits, labels, _, _ = random_problem((2, 3), 13, torch.float32)
    with torch.no_grad():
        lp, h = logprobs_and_entropy(logits, labels, chunk_rows=2)
    naive_lp, naive_h = logprobs_and_entropy_naive(logits, labels)
    torch.testing.assert_close(lp, naive_lp)
    torch.testing.assert_close(h, naive_h)
    assert not lp.requires_grad


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(ValueError, match="labels must lie in"):
        logprobs_and_entropy(torch.zeros(2, 5), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="labels must have the shape"):
        logprobs_and_entropy(torch.zeros(2, 5), torch.tensor([0]))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(torch.zeros(2, 5), torch.tensor([0, 1]), temperature=0.0)
