"""Rollout engines: generate responses with per-token log-probs, load new weights, sleep and wake."""
