"""KL estimators between the current policy and a reference, per token (docs/algorithm.md §4).

With x = ℓ_θ − ℓ_ref on tokens sampled from the policy: k1 = x, k2 = ½x², k3 = e^{−x} + x − 1
(Schulman's low-variance estimator, always ≥ 0). k3 clamps x to [−20, 20] and the result to
[−10, 10], as verl's "low_var_kl" does, so a single wild token cannot dominate the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate, [B, T]; the gradient flows through `logprobs` only."""
    x = logprobs - ref_logprobs.detach()
    if estimator == "k1":
        return x
    elif estimator == "k2":
        return 0.5 * x.square()
    elif estimator == "k3":
        x = x.clamp(-20.0, 20.0)
        return (torch.exp(-x) + x - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"kl estimator={estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")
