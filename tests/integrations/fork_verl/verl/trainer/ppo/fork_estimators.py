"""The released ProxMO-RL / verl-agent GiGPO estimators as their trainers run them in process,
re-derived from the published formulas (the oracle these tests compare the service with).

Like the released code: float32, one row per step, and every row counts, padding copies
included (group means and stds, p, exact anchor groups, TF-IDF and the softmax).
"""

from __future__ import annotations

import numpy as np
import torch


def discounted_returns(rewards: np.ndarray, traj_uid: np.ndarray, gamma: float) -> torch.Tensor:
    """G_t per row (rows of a trajectory in time order), float32."""
    out = np.zeros(len(rewards), dtype=np.float32)
    for tid in dict.fromkeys(traj_uid.tolist()):
        rows = np.flatnonzero(traj_uid == tid)
        running = np.float32(0.0)
        for r in rows[::-1]:
            running = np.float32(rewards[r]) + np.float32(gamma) * running
            out[r] = running
    return torch.as_tensor(out)


def _normalized(values: torch.Tensor, keys: list[object], use_std: bool,
                single: str) -> torch.Tensor:
    """x - mean (/ (std + 1e-6)) per key; a key with one row uses mean 0 / std 1 when
    ``single == "raw"`` (episode) and its own value (so 0) when ``single == "zero"`` (anchors)."""
    out = torch.zeros_like(values)
    members: dict[object, list[int]] = {}
    for r, key in enumerate(keys):
        members.setdefault(key, []).append(r)
    for rows in members.values():
        x = values[torch.as_tensor(rows)]
        if len(rows) == 1:
            mean, std = (torch.tensor(0.0), torch.tensor(1.0)) if single == "raw" else (x[0], 1.0)
        else:
            mean, std = x.mean(), x.std()
        out[torch.as_tensor(rows)] = (x - mean) / (std + 1e-6) if use_std else x - mean
    return out


def episode_term(scores: torch.Tensor, uid: np.ndarray, use_std: bool, psc: bool,
                 alpha: float, beta: float) -> torch.Tensor:
    """Row scores normalized within their group; PSC with p = clip(group row mean, 0, 1)."""
    out = _normalized(scores, uid.tolist(), use_std, "raw")
    if not psc:
        return out
    for group in dict.fromkeys(uid.tolist()):
        rows = torch.as_tensor(np.flatnonzero(uid == group))
        p = float(scores[rows].mean()) if len(rows) > 1 else 0.0
        p = min(1.0, max(0.0, p))
        w_plus = 1.0 + beta * (torch.sigmoid(torch.tensor((1.0 - p) ** alpha)) - 0.5)
        w_minus = 1.0 + beta * (torch.sigmoid(torch.tensor(-(p**alpha))) - 0.5)
        out[rows] *= torch.where(scores[rows] > 0.5, w_plus, w_minus)
    return out


def exact_step_term(step_returns: torch.Tensor, uid: np.ndarray, anchor_obs: np.ndarray,
                    use_std: bool) -> torch.Tensor:
    keys = list(zip(uid.tolist(), anchor_obs.tolist(), strict=True))
    return _normalized(step_returns, keys, use_std, "zero")


def soft_step_term(step_returns: torch.Tensor, uid: np.ndarray, anchor_obs: np.ndarray,
                   tau: float = 0.1) -> torch.Tensor:
    """G - softmax(cos / tau)-weighted G over the group (TF-IDF fit on the whole batch)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    x = torch.as_tensor(TfidfVectorizer(max_features=1024).fit_transform(
        [str(o) for o in anchor_obs]).toarray(), dtype=torch.float32)
    x = x / (x.norm(dim=1, keepdim=True) + 1e-8)
    groups = torch.as_tensor(np.unique(uid, return_inverse=True)[1])
    logits = (x @ x.T / tau).masked_fill(groups[:, None] != groups[None, :], float("-inf"))
    return step_returns - torch.softmax(logits, dim=1) @ step_returns


def outcome_advantage(token_level_rewards: torch.Tensor, step_rewards: torch.Tensor,
                      response_mask: torch.Tensor, anchor_obs: np.ndarray, index: np.ndarray,
                      step_advantage_w: float = 1.0, mode: str = "mean_norm",
                      enable_psc: bool = False, psc_alpha: float = 5.0,
                      psc_beta: float = 0.866) -> tuple[torch.Tensor, torch.Tensor]:
    """(episode, step) advantages on the response tokens, each (rows, response_length)."""
    if mode not in ("mean_norm", "mean_std_norm", "soft_grouping"):
        raise ValueError(f"Unknown mode: {mode}")
    scores = token_level_rewards.sum(-1)
    use_std = mode == "mean_std_norm"
    episode = episode_term(scores, index, use_std, enable_psc, psc_alpha, psc_beta)
    if mode == "soft_grouping":
        step = soft_step_term(step_rewards, index, anchor_obs)
    else:
        step = exact_step_term(step_rewards, index, anchor_obs, use_std)
    return episode.unsqueeze(-1) * response_mask, step.unsqueeze(-1) * response_mask
