"""The example's policy (pure torch, in the main venv): a per-step softmax over admissible
commands, and the clipped PPO update moving log-probs in the advantage's direction."""

from __future__ import annotations

import torch
from textworld_agent.policy import EMBED_DIM, SENTENCE_BREAK, PairScorer, StepChoices, ppo_update


def _batch(counts: list[int], seed: int = 0) -> StepChoices:
    g = torch.Generator().manual_seed(seed)
    n_steps, n_cand = len(counts), sum(counts)
    cand_step = torch.repeat_interleave(torch.arange(n_steps), torch.tensor(counts))
    starts = torch.cumsum(torch.tensor([0, *counts[:-1]]), 0)
    return StepChoices(
        state=torch.nn.functional.normalize(torch.randn(n_steps, EMBED_DIM, generator=g), dim=1),
        goal=torch.nn.functional.normalize(torch.randn(n_steps, EMBED_DIM, generator=g), dim=1),
        command=torch.nn.functional.normalize(torch.randn(n_cand, EMBED_DIM, generator=g), dim=1),
        cand_step=cand_step,
        chosen=starts + torch.tensor([c - 1 for c in counts]),  # the last candidate of each step
    )


def test_softmax_is_normalized_within_each_step() -> None:
    torch.manual_seed(0)
    policy = PairScorer()
    torch.nn.init.normal_(policy.out.weight)  # not the near-uniform start
    batch = _batch([1, 3, 7, 2])
    probs = policy.log_softmax(batch).exp()
    per_step = torch.zeros(4).index_add(0, batch.cand_step, probs.detach())
    torch.testing.assert_close(per_step, torch.ones(4))
    assert probs[0].item() == 1.0  # a single admissible command is certain
    assert probs[1:4].std() > 0  # and the scores do depend on the pair


def test_starts_near_uniform() -> None:
    torch.manual_seed(0)
    log_p, entropy = PairScorer().log_probs(_batch([4, 5]))
    torch.testing.assert_close(log_p.exp(), torch.tensor([0.25, 0.2]), atol=1e-3, rtol=0)
    torch.testing.assert_close(entropy, torch.log(torch.tensor([4.0, 5.0])), atol=1e-3, rtol=0)


def test_ppo_update_follows_the_advantage_sign() -> None:
    torch.manual_seed(0)
    policy = PairScorer()
    batch = _batch([5, 5, 5, 5], seed=1)
    with torch.no_grad():
        before, _ = policy.log_probs(batch)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    stats = ppo_update(policy, optimizer, batch, before, advantages, epochs=8, entropy_coef=0.0)
    with torch.no_grad():
        after, _ = policy.log_probs(batch)
    assert (after[advantages > 0] > before[advantages > 0]).all()
    assert (after[advantages < 0] < before[advantages < 0]).all()
    assert 0.0 <= stats["clip_fraction"] <= 1.0


def test_zero_advantages_leave_the_policy_alone() -> None:
    torch.manual_seed(0)
    policy = PairScorer()
    batch = _batch([3, 4])
    with torch.no_grad():
        before, _ = policy.log_probs(batch)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    ppo_update(policy, optimizer, batch, before, torch.zeros(2), entropy_coef=0.0)
    with torch.no_grad():
        after, _ = policy.log_probs(batch)
    torch.testing.assert_close(after, before)


def test_minibatches_take_one_step_each_and_stop_on_kl() -> None:
    torch.manual_seed(0)
    policy = PairScorer()
    batch = _batch([5] * 8, seed=2)
    with torch.no_grad():
        before, _ = policy.log_probs(batch)
    advantages = torch.tensor([1.0, -1.0] * 4)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    stats = ppo_update(policy, optimizer, batch, before, advantages, epochs=2, minibatches=4,
                       generator=g, entropy_coef=0.0)  # fmt: skip
    assert stats["steps"] == 8 and stats["epochs"] == 2
    # A KL target every step passes stops the update after its first step.
    stats = ppo_update(policy, optimizer, batch, before, advantages, epochs=2, minibatches=4,
                       generator=g, target_kl=-1.0)  # fmt: skip
    assert stats["steps"] == 1


def test_sentence_break_splits_a_noisy_observation() -> None:
    text = "-= Pantry =- It is oddly quiet here. You see a box.\nLast: Taken! Moves: 3."
    assert SENTENCE_BREAK.split(text) == [
        "-= Pantry =-", "It is oddly quiet here.", "You see a box.", "Last: Taken!", "Moves: 3.",
    ]  # fmt: skip
