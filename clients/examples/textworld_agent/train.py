"""One training run: rollouts in TextWorld, advantages from the proxmo service, PPO updates.

Per iteration: every game (task) is played ``rollouts`` times by the current policy; the
trajectories go to ComputeAdvantages (one group per game and iteration, one task id per game);
the per-step advantages weight the clipped PPO objective of the chosen commands.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from proxmo_client import ProxmoClient, ProxmoError

from .games import Game, Observation
from .policy import PairScorer, StepChoices, TextEmbedder, ppo_update


@dataclass(frozen=True)
class EstimatorSpec:
    """How one compared method asks the service: a preset plus config overrides."""

    name: str
    preset: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


ESTIMATORS: dict[str, EstimatorSpec] = {
    spec.name: spec
    for spec in (
        EstimatorSpec("proxmo-tfidf", "proxmo", {"similarity": "tfidf"}),
        EstimatorSpec("proxmo-encoder", "proxmo", {"similarity": "encoder", "tau": 0.05}),
        EstimatorSpec("proxmo-encoder-tau0.02", "proxmo", {"similarity": "encoder", "tau": 0.02}),
        EstimatorSpec("proxmo-encoder-tau0.1", "proxmo", {"similarity": "encoder", "tau": 0.1}),
        EstimatorSpec("paper", "paper"),
        EstimatorSpec("gigpo", "gigpo"),
        EstimatorSpec("grpo", "grpo"),
    )
}


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 20
    rollouts: int = 8  # N rollouts per task per iteration (the group size)
    max_steps: int = 15
    lr: float = 3e-3
    ppo_epochs: int = 4
    clip: float = 0.2
    entropy_coef: float = 0.01


@dataclass
class _Episode:
    states: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    won: bool = False


class _StepBuffer:
    """Decision points of one iteration, flattened for the policy (texts embedded at the end)."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.goals: list[str] = []
        self.commands: list[str] = []
        self.cand_step: list[int] = []
        self.chosen: list[int] = []
        self.old_log_probs: list[float] = []

    def to_batch(self, embedder: TextEmbedder) -> StepChoices:
        return StepChoices(
            state=embedder.embed(self.states),
            goal=embedder.embed(self.goals),
            command=embedder.embed(self.commands),
            cand_step=torch.tensor(self.cand_step, dtype=torch.int64),
            chosen=torch.tensor(self.chosen, dtype=torch.int64),
        )


def _act(
    policy: PairScorer, embedder: TextEmbedder, obs: Observation, rng: torch.Generator
) -> tuple[int, float]:
    """Sample a command index from pi(. | obs); returns (index, log-prob)."""
    n = len(obs.commands)
    choices = StepChoices(
        state=embedder.embed([obs.state]),
        goal=embedder.embed([obs.goal]),
        command=embedder.embed(obs.commands),
        cand_step=torch.zeros(n, dtype=torch.int64),
        chosen=torch.zeros(1, dtype=torch.int64),
    )
    with torch.no_grad():
        log_p = policy.log_softmax(choices)
    index = int(torch.multinomial(log_p.exp(), 1, generator=rng))
    return index, float(log_p[index])


def train_run(
    spec: EstimatorSpec,
    seed: int,
    game_paths: Sequence[Path],
    *,
    client: ProxmoClient,
    embedder: TextEmbedder,
    config: TrainConfig,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train a fresh policy (init and sampling seeded by ``seed``); one record per iteration.

    Task ids carry a unique run id, so runs sharing a server never share success histories.
    """
    torch.manual_seed(seed)
    policy = PairScorer()
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    rng = torch.Generator().manual_seed(seed)
    games = [Game(path) for path in game_paths]
    run_id = f"{spec.name}/seed{seed}/{time.time_ns()}"
    records: list[dict[str, Any]] = []
    env_steps = 0
    prefetch = spec.overrides.get("similarity") == "encoder"
    try:
        for iteration in range(config.iterations):
            started = time.perf_counter()
            buffer = _StepBuffer()
            trajectories: list[dict[str, Any]] = []
            wins: list[bool] = []
            for game in games:
                for r in range(config.rollouts):
                    episode = _Episode()
                    obs = game.reset()
                    for _ in range(config.max_steps):
                        index, log_p = _act(policy, embedder, obs, rng)
                        step = len(buffer.states)
                        buffer.states.append(obs.state)
                        buffer.goals.append(obs.goal)
                        buffer.chosen.append(len(buffer.commands) + index)
                        buffer.commands.extend(obs.commands)
                        buffer.cand_step.extend([step] * len(obs.commands))
                        buffer.old_log_probs.append(log_p)
                        episode.states.append(obs.state)
                        obs, reward = game.step(obs.commands[index])
                        episode.rewards.append(reward)
                        if game.done:
                            break
                    episode.won = game.won
                    wins.append(episode.won)
                    if prefetch:
                        # The server embeds these while the next rollouts run, so the
                        # iteration's ComputeAdvantages finds them cached. Only a hint.
                        try:
                            client.prefetch_states(episode.states)
                        except ProxmoError as error:
                            print(f"prefetch skipped: {error}")
                    trajectories.append({
                        "trajectory_id": f"{game.name}/r{r}",
                        "group_id": f"{run_id}/it{iteration}/{game.name}",
                        "task_id": f"{run_id}/{game.name}",
                        "states": episode.states,
                        "rewards": episode.rewards,
                        "success": episode.won,
                    })  # fmt: skip
            rollout_s = time.perf_counter() - started

            # The service call: one request per iteration, every step of every rollout.
            service_started = time.perf_counter()
            response = client.compute_advantages(trajectories, preset=spec.preset, **spec.overrides)
            service_s = time.perf_counter() - service_started
            by_id = {t.trajectory_id: list(t.advantages) for t in response.trajectories}
            advantages = torch.tensor(
                [a for t in trajectories for a in by_id[t["trajectory_id"]]], dtype=torch.float32
            )
            stats = ppo_update(
                policy, optimizer, buffer.to_batch(embedder),
                torch.tensor(buffer.old_log_probs), advantages,
                epochs=config.ppo_epochs, clip=config.clip, entropy_coef=config.entropy_coef,
            )  # fmt: skip
            iteration_steps = len(buffer.states)
            env_steps += iteration_steps
            record = {
                "estimator": spec.name,
                "seed": seed,
                "iteration": iteration,
                "env_steps": env_steps,
                "success_rate": float(np.mean(wins)),
                "mean_episode_length": iteration_steps / len(trajectories),
                "rows_advantaged": int(advantages.numel()),
                "adv_abs_mean": float(advantages.abs().mean()),
                "entropy": stats["entropy"],
                "clip_fraction": stats["clip_fraction"],
                "rollout_s": round(rollout_s, 4),
                "service_s": round(service_s, 4),
                "iteration_s": round(time.perf_counter() - started, 4),
            }
            records.append(record)
            if on_iteration is not None:
                on_iteration(record)
    finally:
        for game in games:
            game.close()
    return records
