"""A one-minute demonstration of the loss library on a toy RL problem with a simulated mismatch.

`python -m icepop.demo` trains a tabular "policy" — independent logits for each of 8 token positions
over a 16-token vocabulary, one table per prompt — to emit each prompt's target sequence, with a
verifiable reward (fraction of positions right) and GRPO advantages over 16 samples per prompt.

The inference engine is simulated: it samples from logits the trainer does not see exactly (small
Gaussian noise on every logit, like low-precision kernels, plus rare large jumps, like an MoE routing
flip) and records the sampled tokens' log-probs, as vLLM does. The trainer recomputes ℓ_old from its
own logits, and `policy_loss` corrects the update with each correction in turn. This stands in for the
real RLVR loop on vLLM and DeepSpeed, which `python -m icepop.train +recipe=rlvr` will run.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from icepop.algo import grpo_advantages, policy_loss, to_tokens

POSITIONS, VOCAB, PROMPTS, SAMPLES = 8, 16, 4, 16


def engine_logits(logits: torch.Tensor, noise: float, jump_prob: float, g: torch.Generator) -> torch.Tensor:
    """What the simulated inference engine computes for the same weights: noisy, with rare jumps."""
    jitter = noise * torch.randn(logits.shape, generator=g)
    jumps = (
        (torch.rand(logits.shape[:-1], generator=g) < jump_prob)[..., None]
        * 3
        * torch.randn(logits.shape, generator=g)
    )
    return logits + jitter + jumps


def trainer_logprobs(weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The trainer's log-probs of the sampled tokens [P, S, T], flattened to [P·S, T]."""
    table = torch.log_softmax(weights, dim=-1)[:, None].expand(PROMPTS, SAMPLES, POSITIONS, VOCAB)
    return table.gather(-1, tokens[..., None]).squeeze(-1).reshape(PROMPTS * SAMPLES, POSITIONS)


def train(correction: str, steps: int, noise: float, jump_prob: float, seed: int) -> dict[str, float]:
    """GRPO on the toy problem with the given correction; returns the metrics of the last steps."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, VOCAB, (PROMPTS, POSITIONS), generator=g)
    weights = torch.zeros(PROMPTS, POSITIONS, VOCAB, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=0.05)
    history: list[dict[str, float]] = []
    for _ in range(steps):
        with torch.no_grad():  # rollout: the engine samples and records its own log-probs
            engine = torch.log_softmax(engine_logits(weights, noise, jump_prob, g), dim=-1)
            engine = engine[:, None].expand(PROMPTS, SAMPLES, POSITIONS, VOCAB)
            tokens = torch.multinomial(engine.exp().reshape(-1, VOCAB), 1, generator=g).view(
                engine.shape[:-1]
            )
            rollout_logprobs = engine.gather(-1, tokens[..., None]).squeeze(-1)
            rewards = (tokens == targets[:, None]).float().mean(-1)  # verifiable: fraction right
            group_ids = torch.arange(PROMPTS)[:, None].expand(PROMPTS, SAMPLES)
            advantages = grpo_advantages(rewards.flatten(), group_ids.flatten())

        with torch.no_grad():
            old_logprobs = trainer_logprobs(weights, tokens)
        mask = torch.ones(PROMPTS * SAMPLES, POSITIONS, dtype=torch.bool)
        for _ in range(2):  # two PPO epochs per batch: the mask stays fixed, the ratio r moves
            loss, metrics = policy_loss(
                trainer_logprobs(weights, tokens),
                old_logprobs,
                rollout_logprobs.reshape_as(old_logprobs),
                to_tokens(advantages, mask),
                mask,
                correction=correction,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append({"reward": rewards.mean().item(), **{k: v.item() for k, v in metrics.items()}})
    tail = history[-max(1, steps // 5) :]
    return {key: sum(h[key] for h in tail) / len(tail) for key in tail[0]} | {
        "reward_first": history[0]["reward"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="IcePop loss library demonstration on a toy problem.")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--noise", type=float, default=0.3, help="std of the engine's logit noise")
    parser.add_argument("--jump-prob", type=float, default=0.05, help="chance a position's logits jump")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    console = Console()
    console.print(
        f"[bold]icepop demo[/]: {PROMPTS} prompts × {SAMPLES} samples, {POSITIONS} tokens each, "
        f"engine noise σ={args.noise}, jump probability {args.jump_prob}, {args.steps} steps"
    )
    table = Table(title="Means over the last 20% of steps; reward of the first step → of the last ones")
    for column in ("correction", "reward", "masked", "low", "high", "max k", "KL k3"):
        table.add_column(column, justify="right")
    for correction in ("none", "tis", "icepop", "kpop"):
        m = train(correction, args.steps, args.noise, args.jump_prob, args.seed)
        table.add_row(
            correction,
            f"{m['reward_first']:.2f} → {m['reward']:.2f}",
            *(f"{m[f'icepop/mask_frac{side}']:.3f}" for side in ("", "_low", "_high")),
            f"{m['icepop/ratio_max']:.1f}",
            f"{m['mismatch/kl_k3']:.3f}",
        )
    console.print(table)
    console.print(
        "masked/low/high: fractions of tokens the correction dropped; max k: largest π_train/π_infer; "
        "KL k3: KL(π_infer ‖ π_train) estimate. Next: the real loop on vLLM + DeepSpeed, "
        "`python -m icepop.train +recipe=rlvr` (README.md)."
    )


if __name__ == "__main__":
    main()
