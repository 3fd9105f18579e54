"""Trainer backends: log-probs, RL and SFT updates, weight export, checkpoints."""
