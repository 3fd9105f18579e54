"""Mismatch injection for stress tests: seeded noise added to the weights on their way into an engine,
so that IcePop's correction can be exercised on a mismatch far larger than a real one."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch

Noise = tuple[float, int]
"""(level, seed) of a mismatch injection (`with_noise`)."""


def with_noise(
    tensors: Iterator[tuple[str, torch.Tensor]], noise: Noise | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Mismatch injection for stress tests: each floating-point tensor plus Gaussian noise of `level` ×
    its std, seeded by (seed, tensor name) so the noise does not depend on the order tensors arrive in.
    It goes in through the reload, so it reaches every weight — including those vLLM's CPU kernels keep
    only in packed form. None or level 0 passes the tensors through unchanged (bit-identical)."""
    level, seed = noise or (0.0, 0)
    for name, tensor in tensors:
        if level and tensor.is_floating_point() and tensor.numel() > 1:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            values = tensor.float().cpu()
            values += torch.randn(values.shape, generator=generator) * (level * float(values.std()))
            tensor = values.to(device=tensor.device, dtype=tensor.dtype)
        yield name, tensor
