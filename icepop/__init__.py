"""icepop: RL post-training for LLMs with IcePop (arXiv 2510.18855).

GRPO whose per-token update is masked when the trainer/inference probability ratio at the rollout
weights leaves [α, β]; kept tokens are weighted by that ratio. The loss library is `icepop.algo`.
"""

__version__ = "0.1.0"
