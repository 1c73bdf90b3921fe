"""A verl-agent fork's ray_trainer (verl 0.3 era) reduced to what touches advantages: an
AdvantageEstimator enum with ``gigpo`` and ``proxmo`` branches that run before anything else,
compute_advantage without ``config``, adjust_batch-style padding copies, _balance_batch
reordering, the invalid-action penalty applied before compute_advantage, and fit()'s order of
these steps (``fit_batch``)."""

from __future__ import annotations

from enum import Enum
from functools import partial
from typing import Any

import numpy as np
import torch

from verl import DataProto
from verl.trainer.ppo import core_algos, fork_estimators


class AdvantageEstimator(str, Enum):
    GRPO = "grpo"
    GiGPO = "gigpo"
    ProxMO = "proxmo"


def compute_response_mask(data: DataProto) -> torch.Tensor:
    length = data.batch["responses"].size(1)
    return data.batch["attention_mask"][:, -length:]


def apply_invalid_action_penalty(data: DataProto, coef: float) -> None:
    """Subtract coef from the last response token's score and from the step return."""
    invalid = torch.as_tensor(1.0 - data.non_tensor_batch["is_action_valid"].astype(np.float32))
    mask = data.batch["response_mask"]
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)
    scores = data.batch["token_level_scores"]
    scores[torch.arange(len(scores)), last] -= coef * invalid
    data.batch["step_rewards"] -= coef * invalid


def compute_advantage(data: DataProto, adv_estimator: Any, gamma: float = 1.0, lam: float = 1.0,
                      num_repeat: int = 1, multi_turn: bool = False,
                      norm_adv_by_std_in_grpo: bool = True, step_advantage_w: float = 1.0,
                      proxmo_mode: str = "mean_std_norm", proxmo_enable_similarity: bool = False,
                      proxmo_similarity_thresh: float = 0.95, gigpo_mode: str = "mean_std_norm",
                      gigpo_enable_similarity: bool = False,
                      gigpo_similarity_thresh: float = 0.95, return_components: bool = False,
                      **kwargs: Any) -> DataProto:
    if "response_mask" not in data.batch:
        data.batch["response_mask"] = compute_response_mask(data)
    data.meta_info["computed_by"] = "fork"  # which path ran: the service's wrapper never sets it
    if adv_estimator == AdvantageEstimator.GRPO:
        advantages, returns = core_algos.compute_grpo_outcome_advantage(
            data.batch["token_level_rewards"], data.batch["response_mask"],
            data.non_tensor_batch["uid"])
    elif adv_estimator in (AdvantageEstimator.GiGPO, AdvantageEstimator.ProxMO):
        proxmo = adv_estimator == AdvantageEstimator.ProxMO
        if (proxmo_enable_similarity if proxmo else gigpo_enable_similarity):
            raise NotImplementedError("similarity grouping")
        episode, step = fork_estimators.outcome_advantage(
            data.batch["token_level_rewards"], data.batch["step_rewards"],
            data.batch["response_mask"], data.non_tensor_batch["anchor_obs"],
            data.non_tensor_batch["uid"], step_advantage_w,
            proxmo_mode if proxmo else gigpo_mode,
            **({"enable_psc": kwargs.get("enable_psc", False),
                "psc_alpha": kwargs.get("psc_alpha", 5.0),
                "psc_beta": kwargs.get("psc_beta", 0.866)} if proxmo else {}))
        if return_components:
            data.batch["episode_advantages"], data.batch["step_advantages"] = episode, step
            return data
        advantages = returns = episode + step_advantage_w * step
    else:
        raise NotImplementedError
    data.batch["advantages"], data.batch["returns"] = advantages, returns
    return data


def adjust_batch(data: DataProto, divisor: int, seed: int = 0) -> DataProto:
    """Pad to a multiple of ``divisor`` with copies of random rows, appended (verl-agent)."""
    remainder = len(data) % divisor
    if remainder == 0:
        return data
    rng = np.random.default_rng(seed)
    copies = rng.choice(len(data), divisor - remainder, replace=False)
    return DataProto.concat([data, data.select_idxs(copies)])


class RayPPOTrainer:
    def __init__(self, config: Any) -> None:
        self.config = config

    def _balance_batch(self, batch: DataProto, metrics: dict[str, Any]) -> None:
        """Reorder rows by sequence length across 2 ranks (breaks the trajectory order)."""
        lengths = batch.batch["attention_mask"].sum(-1)
        order = torch.argsort(lengths, stable=True)
        batch.reorder(torch.cat([order[0::2], order[1::2]]))

    def fit_batch(self, batch: DataProto) -> DataProto:
        """One iteration of fit() from the rollout to the advantages, in the fork's order."""
        algorithm = self.config["algorithm"]
        actor = self.config["actor_rollout_ref"]["actor"]
        if algorithm["adv_estimator"] in (AdvantageEstimator.GiGPO, AdvantageEstimator.ProxMO):
            batch.batch["step_rewards"] = fork_estimators.discounted_returns(
                batch.non_tensor_batch["rewards"], batch.non_tensor_batch["traj_uid"],
                algorithm["gamma"])
        batch = adjust_batch(batch, self.config["trainer"]["size_divisor"])
        batch.batch["response_mask"] = compute_response_mask(batch)
        if self.config["trainer"]["balance_batch"]:
            self._balance_batch(batch, metrics={})
        batch.batch["token_level_scores"] = episode_scores(batch)
        if actor.get("use_invalid_action_penalty", True):
            apply_invalid_action_penalty(batch, actor["invalid_action_penalty_coef"])
        batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
        proxmo = algorithm.get("proxmo", {})
        gigpo = algorithm.get("gigpo", {})
        beta = proxmo.get("psc_target_range", 0.2) / (torch.sigmoid(torch.tensor(1.0)) - 0.5)
        compute_advantage_fn = partial(
            compute_advantage, adv_estimator=algorithm["adv_estimator"],
            gamma=algorithm["gamma"], lam=1.0, num_repeat=4,
            step_advantage_w=(proxmo or gigpo).get("step_advantage_w", 1.0),
            proxmo_mode=proxmo.get("mode", "mean_norm"), gigpo_mode=gigpo.get("mode", "mean_norm"),
            enable_psc=proxmo.get("enable_psc", False), psc_alpha=proxmo.get("psc_alpha", 5.0),
            psc_beta=beta.item())
        return compute_advantage_fn(data=batch)


def episode_scores(batch: DataProto) -> torch.Tensor:
    """Each row's episode reward on its last response token (EpisodeRewardManager)."""
    mask = batch.batch["response_mask"]
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)
    scores = torch.zeros(mask.shape, dtype=torch.float32)
    totals = batch.non_tensor_batch["episode_rewards"].astype(np.float32)
    scores[torch.arange(len(scores)), last] = torch.as_tensor(totals)
    return scores
