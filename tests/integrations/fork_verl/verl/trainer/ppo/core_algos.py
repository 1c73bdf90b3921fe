"""verl 0.3's core_algos as a fork has it: estimator functions, no ADV_ESTIMATOR_REGISTRY."""

from __future__ import annotations

import numpy as np
import torch


def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor,
                                   response_mask: torch.Tensor, index: np.ndarray,
                                   epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    scores = token_level_rewards.sum(-1)
    out = torch.zeros_like(scores)
    for group in np.unique(index):
        rows = torch.as_tensor(np.flatnonzero(index == group))
        values = scores[rows]
        std = values.std() if len(rows) > 1 else torch.tensor(1.0)
        mean = values.mean() if len(rows) > 1 else torch.tensor(0.0)
        out[rows] = (values - mean) / (std + epsilon)
    advantages = out.unsqueeze(-1) * response_mask
    return advantages, advantages
