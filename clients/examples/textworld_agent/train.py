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
    # gamma of a return discounted on the client (r_t -> gamma^t r_t before the call), so an
    # outcome-only estimator (GRPO) also sees episode length; None sends the raw rewards.
    discount_return: float | None = None


ESTIMATORS: dict[str, EstimatorSpec] = {
    spec.name: spec
    for spec in (
        EstimatorSpec("proxmo-tfidf", "proxmo", {"similarity": "tfidf"}),
        EstimatorSpec("proxmo-encoder", "proxmo", {"similarity": "encoder", "tau": 0.05}),
        EstimatorSpec("proxmo-encoder-tau0.02", "proxmo", {"similarity": "encoder", "tau": 0.02}),
        EstimatorSpec("proxmo-encoder-tau0.1", "proxmo", {"similarity": "encoder", "tau": 0.1}),
        EstimatorSpec("paper", "paper"),
        EstimatorSpec("gigpo", "gigpo"),
        EstimatorSpec("hgpo", "hgpo"),
        EstimatorSpec("graphgpo", "graphgpo"),
        EstimatorSpec("grpo", "grpo"),
        # Issue 18's ablations (the default proxmo preset is proxmo-encoder above).
        EstimatorSpec("proxmo-encoder-tau0.2", "proxmo", {"similarity": "encoder", "tau": 0.2}),
        EstimatorSpec("proxmo-exact", "proxmo", {"similarity": "exact"}),
        EstimatorSpec("proxmo-tfidf-nopsc", "proxmo", {"similarity": "tfidf",
                                                       "psc_enabled": False}),
        EstimatorSpec("proxmo-tfidf-batch", "proxmo", {"similarity": "tfidf",
                                                       "success_rate_source": "batch"}),
        EstimatorSpec("gigpo-psc", "gigpo", {"psc_enabled": True,
                                             "success_rate_source": "history"}),
        EstimatorSpec("grpo-discounted", "grpo", discount_return=0.95),
    )
}  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 20
    rollouts: int = 8  # N rollouts per task per iteration (the group size)
    max_steps: int = 15
    lr: float = 3e-3
    ppo_epochs: int = 4
    minibatches: int = 1  # optimizer steps per epoch (rows shuffled by the run's generator)
    clip: float = 0.2
    entropy_coef: float = 0.01
    # The regimes' gentler settings (None keeps the original example's behaviour):
    target_kl: float | None = None  # stop an update's epochs early past this approximate KL
    entropy_final: float | None = None  # anneal entropy_coef linearly to this over the run
    env_step_budget: int | None = None  # stop at the first iteration reaching this many steps
    state_by_sentence: bool = False  # state features: mean of sentence embeddings (policy.py)


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

    def to_batch(self, embedder: TextEmbedder, by_sentence: bool) -> StepChoices:
        return StepChoices(
            state=embedder.embed_states(self.states, by_sentence),
            goal=embedder.embed(self.goals),
            command=embedder.embed(self.commands),
            cand_step=torch.tensor(self.cand_step, dtype=torch.int64),
            chosen=torch.tensor(self.chosen, dtype=torch.int64),
        )


def _log_pi(
    policy: PairScorer, embedder: TextEmbedder, obs: Observation, by_sentence: bool
) -> torch.Tensor:
    """log pi(. | obs) over obs.commands, without gradients."""
    n = len(obs.commands)
    choices = StepChoices(
        state=embedder.embed_states([obs.state], by_sentence),
        goal=embedder.embed([obs.goal]),
        command=embedder.embed(obs.commands),
        cand_step=torch.zeros(n, dtype=torch.int64),
        chosen=torch.zeros(1, dtype=torch.int64),
    )
    with torch.no_grad():
        return policy.log_softmax(choices)


def _act(
    policy: PairScorer, embedder: TextEmbedder, obs: Observation, rng: torch.Generator,
    by_sentence: bool,
) -> tuple[int, float]:  # fmt: skip
    """Sample a command index from pi(. | obs); returns (index, log-prob)."""
    log_p = _log_pi(policy, embedder, obs, by_sentence)
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
    eval_paths: Sequence[Path] = (),
    games_per_iteration: int | None = None,
    noisy: bool = False,
) -> list[dict[str, Any]]:
    """Train a fresh policy (init and sampling seeded by ``seed``); one record per iteration.

    Task ids carry a unique run id, so runs sharing a server never share success histories.
    With ``eval_paths``, ``success_rate`` is the greedy policy's success on those (held-out)
    games after the iteration's update, one episode each, and ``train_success_rate`` the
    sampled rollouts'; without, both are the rollouts' success. ``games_per_iteration`` draws
    that many training games per iteration (seeded by ``seed``); ``noisy`` gives every game
    observation noise seeded by ``seed`` (the noisy regime).
    """
    torch.manual_seed(seed)
    policy = PairScorer()
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    rng = torch.Generator().manual_seed(seed)
    draw = np.random.default_rng(seed)
    noise = (lambda i: seed * 100_003 + i) if noisy else (lambda i: None)
    games = [Game(path, noise(i)) for i, path in enumerate(game_paths)]
    eval_games = [Game(path, noise(len(games) + i)) for i, path in enumerate(eval_paths)]
    run_id = f"{spec.name}/seed{seed}/{time.time_ns()}"
    records: list[dict[str, Any]] = []
    env_steps = 0
    prefetch = spec.overrides.get("similarity") == "encoder"
    try:
        for iteration in range(config.iterations):
            started = time.perf_counter()
            env_before, embed_before = _env_seconds(games + eval_games), embedder.encode_s
            buffer = _StepBuffer()
            trajectories: list[dict[str, Any]] = []
            wins: list[bool] = []
            if games_per_iteration is None:
                playing = games
            else:
                picks = draw.choice(len(games), size=games_per_iteration, replace=False)
                playing = [games[i] for i in sorted(picks)]
            for game in playing:
                for r in range(config.rollouts):
                    episode = _Episode()
                    obs = game.reset()
                    for _ in range(config.max_steps):
                        index, log_p = _act(policy, embedder, obs, rng,
                                            config.state_by_sentence)  # fmt: skip
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
                        "rewards": _discounted(episode.rewards, spec.discount_return),
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
            update_started = time.perf_counter()
            stats = ppo_update(
                policy, optimizer, buffer.to_batch(embedder, config.state_by_sentence),
                torch.tensor(buffer.old_log_probs), advantages,
                epochs=config.ppo_epochs, clip=config.clip, target_kl=config.target_kl,
                entropy_coef=_entropy_coef(config, iteration, env_steps),
                minibatches=config.minibatches, generator=rng,
            )  # fmt: skip
            update_s = time.perf_counter() - update_started
            eval_started = time.perf_counter()
            success = (
                _greedy_success(policy, embedder, eval_games, config)
                if eval_games else None
            )  # fmt: skip
            eval_s = time.perf_counter() - eval_started
            iteration_steps = len(buffer.states)
            env_steps += iteration_steps
            rows = sum(g.num_steps for g in response.groups)
            train_success = float(np.mean(wins))
            record = {
                "estimator": spec.name,
                "seed": seed,
                "iteration": iteration,
                "env_steps": env_steps,
                "success_rate": train_success if success is None else success,
                "train_success_rate": train_success,
                # Exact-anchor singletons (the rows GiGPO's step term gives 0), row-weighted.
                "singleton_fraction": sum(
                    g.singleton_fraction * g.num_steps for g in response.groups
                ) / max(rows, 1),
                "mean_episode_length": iteration_steps / len(trajectories),
                "rows_advantaged": int(advantages.numel()),
                "adv_abs_mean": float(advantages.abs().mean()),
                "entropy": stats["entropy"],
                "clip_fraction": stats["clip_fraction"],
                "approx_kl": stats["approx_kl"],
                "ppo_epochs": int(stats["epochs"]),
                "optimizer_steps": int(stats["steps"]),
                "rollout_s": round(rollout_s, 4),
                "service_s": round(service_s, 4),
                # Where the iteration's time went (rollout_s holds env_s and most of embed_s;
                # embed_s also counts the update's and the evaluation's new texts).
                "env_s": round(_env_seconds(games + eval_games) - env_before, 4),
                "embed_s": round(embedder.encode_s - embed_before, 4),
                "update_s": round(update_s, 4),
                "eval_s": round(eval_s, 4),
                "iteration_s": round(time.perf_counter() - started, 4),
            }
            records.append(record)
            if on_iteration is not None:
                on_iteration(record)
            if config.env_step_budget is not None and env_steps >= config.env_step_budget:
                break
    finally:
        for game in games + eval_games:
            game.close()
    return records


def _env_seconds(games: Sequence[Game]) -> float:
    return sum(game.env_s for game in games)


def _discounted(rewards: list[float], gamma: float | None) -> list[float]:
    """r_t -> gamma^t r_t, so the episode's summed return is its discounted return."""
    if gamma is None:
        return rewards
    return [r * gamma**t for t, r in enumerate(rewards)]


def _entropy_coef(config: TrainConfig, iteration: int, env_steps: int) -> float:
    """entropy_coef annealed linearly to entropy_final over the run (its env-step budget, or
    its iterations without one)."""
    if config.entropy_final is None:
        return config.entropy_coef
    if config.env_step_budget is not None:
        frac = min(1.0, env_steps / config.env_step_budget)
    else:
        frac = min(1.0, iteration / max(1, config.iterations - 1))
    return config.entropy_coef + frac * (config.entropy_final - config.entropy_coef)


def _greedy_success(
    policy: PairScorer, embedder: TextEmbedder, games: Sequence[Game], config: TrainConfig
) -> float:
    """Success of the greedy policy (argmax command), one episode per game."""
    wins = []
    for game in games:
        obs = game.reset()
        for _ in range(config.max_steps):
            index = int(_log_pi(policy, embedder, obs, config.state_by_sentence).argmax())
            obs, _ = game.step(obs.commands[index])
            if game.done:
                break
        wins.append(game.won)
    return float(np.mean(wins))
