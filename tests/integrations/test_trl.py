"""ProxmoGRPOTrainer against the real TRL 1.16.0: two training steps of a tiny Llama built
locally (WordLevel tokenizer, no hub) on a scripted multi-turn text game played by a
``rollout_func``; the advantages the loss saw must be the service's, turn by turn."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from proxmo_client import BuildError, ProxmoClient  # noqa: E402
from proxmo_client.integrations.service import ServiceConfig  # noqa: E402
from proxmo_client.integrations.trl import ProxmoGRPOTrainer  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig  # noqa: E402

ACTIONS = ("go", "look", "wait")
WORDS = ("<pad>", "<eos>", "<unk>", *ACTIONS, "you", "are", "in", "room", "episode",
         "nothing", "happens", "won", ".", *[str(d) for d in range(10)])  # fmt: skip
NUM_GENERATIONS = 4
MAX_TURNS = 3


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


class CorridorGame:
    """Rooms 0..2 along a corridor: "go" moves on (reaching room 2 wins, reward 1), "look"
    changes nothing, "wait" is an invalid action. At most MAX_TURNS turns."""

    def __init__(self, start: int) -> None:
        self.room = start

    def observation(self) -> str:
        return f"you are in room {self.room}"

    def step(self, action: str) -> tuple[str, float, bool, bool]:
        """(feedback, reward, done, invalid)"""
        if action == "go":
            self.room += 1
            if self.room >= 2:
                return "you won .", 1.0, True, False
            return self.observation() + " .", 0.0, False, False
        return "nothing happens .", 0.0, False, action not in ACTIONS[:2]


class ScriptedRollouts:
    """A ``rollout_func`` that plays CorridorGame with the trainer's model and returns the turn
    bookkeeping ProxmoGRPOTrainer reads. Every call is recorded for the test."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.action_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(ACTIONS)))
        self.calls: list[list[dict[str, Any]]] = []
        self.episodes = 0

    def __call__(self, prompts: list[str], trainer: Any) -> dict[str, Any]:
        model = trainer.model
        out: dict[str, list[Any]] = {k: [] for k in (
            "prompt_ids", "completion_ids", "logprobs", "env_mask", "turn_index", "anchor_obs",
            "turn_rewards", "turn_invalid")}  # fmt: skip
        call = []
        for prompt in prompts:
            self.episodes += 1
            game = CorridorGame(start=int(prompt.split()[-1]))
            prompt_ids = self.tokenizer(prompt)["input_ids"]
            # Environment tokens first: "episode N" makes every completion's tokens unique.
            completion = self.ids(f"episode {' '.join(str(self.episodes))} .")
            turn_index = [-1] * len(completion)
            states, rewards, invalid = [], [], []
            for turn in range(MAX_TURNS):
                states.append(game.observation())
                action_token = self.sample(model, prompt_ids + completion)
                completion.append(action_token)
                turn_index.append(turn)
                feedback, reward, done, bad = game.step(self.tokenizer.decode([action_token]))
                rewards.append(reward)
                invalid.append(bad)
                env = self.ids(feedback)
                completion += env
                turn_index += [-1] * len(env)
                if done:
                    break
            completion.append(self.tokenizer.eos_token_id)
            turn_index.append(-1)
            out["prompt_ids"].append(prompt_ids)
            out["completion_ids"].append(completion)
            out["logprobs"] = None
            out["env_mask"].append([int(t >= 0) for t in turn_index])
            out["turn_index"].append(turn_index)
            out["anchor_obs"].append(states)
            out["turn_rewards"].append(rewards)
            out["turn_invalid"].append(invalid)
            call.append(
                {
                    "completion_ids": completion,
                    "turn_index": turn_index,
                    "states": states,
                    "rewards": rewards,
                    "invalid": invalid,
                }
            )
        self.calls.append(call)
        return out

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    @torch.no_grad()
    def sample(self, model: Any, ids: list[int]) -> int:
        logits = model(torch.tensor([ids], device=model.device)).logits[0, -1].float().cpu()
        probs = torch.softmax(logits[self.action_ids], dim=-1)
        return int(self.action_ids[torch.multinomial(probs, 1)])


def episode_return(
    completions: list[Any], turn_rewards: list[list[float]] | None = None, **_: Any
) -> list[float]:
    """TRL's reward function (still called and logged; no longer sets the advantages)."""
    return [float(sum(r)) for r in turn_rewards] if turn_rewards else [0.0] * len(completions)


class CapturingTrainer(ProxmoGRPOTrainer):  # type: ignore[misc, valid-type]
    """Records what the loss saw."""

    seen: list[tuple[torch.Tensor, torch.Tensor]]

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
        self.seen.append((inputs["completion_ids"].clone(), inputs["advantages"].clone()))
        return super()._compute_loss(model, inputs)


def make_trainer(
    tmp_path: Path, target: str, rollouts: ScriptedRollouts, **proxmo: Any
) -> CapturingTrainer:
    tokenizer = rollouts.tokenizer
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=2, learning_rate=1e-3,
        per_device_train_batch_size=2 * NUM_GENERATIONS, num_generations=NUM_GENERATIONS,
        max_completion_length=32, logging_steps=1, report_to="none", save_strategy="no",
        seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": ["you are in room 0", "you are in room 1"] * 4})
    trainer = CapturingTrainer(
        model=tiny_model(tokenizer), reward_funcs=episode_return, args=args,
        train_dataset=dataset, processing_class=tokenizer, rollout_func=rollouts,
        proxmo=ServiceConfig(server=target, **proxmo),
    )  # fmt: skip
    trainer.seen = []
    return trainer


@pytest.mark.parametrize("preset", ["paper", "hgpo", "graphgpo"])
def test_two_training_steps_train_on_the_services_turn_advantages(
    server: Any, tmp_path: Path, preset: str
) -> None:
    rollouts = ScriptedRollouts(tiny_tokenizer())
    trainer = make_trainer(tmp_path, server.target, rollouts, preset=preset)
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(rollouts.calls) == 2 and len(trainer.seen) == 2

    multi_turn_rows = 0
    with ProxmoClient(server.target) as client:
        for call, (completion_ids, advantages) in zip(rollouts.calls, trainer.seen, strict=True):
            # What the service says for this generation batch, asked directly.
            trajectories = [
                {"trajectory_id": f"c{i}", "group_id": f"g{i // NUM_GENERATIONS}",
                 "states": c["states"], "rewards": c["rewards"], "invalid": c["invalid"]}
                for i, c in enumerate(call)
            ]  # fmt: skip
            direct = client.compute_advantages(trajectories, preset=preset)
            expected = {}
            for c, answer in zip(call, direct.trajectories, strict=True):
                per_turn = list(answer.advantages)
                tokens = [per_turn[t] if t >= 0 else 0.0 for t in c["turn_index"]]
                expected[tuple(c["completion_ids"])] = tokens
                multi_turn_rows += len(set(per_turn)) > 1
            # TRL shuffles the generation batch before the loss: match rows by their tokens.
            assert advantages.shape == completion_ids.shape  # (B, T), not (B,)
            assert advantages.shape[0] == len(call)
            for row, ids in zip(advantages, completion_ids, strict=True):
                key = next(k for k in expected if tuple(ids[: len(k)].tolist()) == k)
                want = torch.zeros_like(row, dtype=torch.float64)
                want[: len(key)] = torch.tensor(expected[key], dtype=torch.float64)
                torch.testing.assert_close(row.to(torch.float64), want, rtol=1e-6, atol=1e-6)
    assert multi_turn_rows > 0  # some completions had turns with different advantages
    assert any(a.abs().max() > 0.1 for _, a in trainer.seen)
    assert trainer.proxmo_last_response is not None
    assert len(trainer.proxmo_last_response.trajectories) == 2 * NUM_GENERATIONS


def test_missing_turn_keys_are_named(server: Any, tmp_path: Path) -> None:
    rollouts = ScriptedRollouts(tiny_tokenizer())

    def without_rewards(prompts: list[str], trainer: Any) -> dict[str, Any]:
        out = rollouts(prompts, trainer)
        out.pop("turn_rewards")
        return out

    trainer = make_trainer(tmp_path, server.target, rollouts, preset="paper")
    trainer.rollout_func = without_rewards
    with pytest.raises(BuildError, match=r"^rollout_func\.turn_rewards: missing"):
        trainer.train()


def test_turn_index_must_cover_the_completion(server: Any, tmp_path: Path) -> None:
    rollouts = ScriptedRollouts(tiny_tokenizer())

    def short_index(prompts: list[str], trainer: Any) -> dict[str, Any]:
        out = rollouts(prompts, trainer)
        out["turn_index"][3] = out["turn_index"][3][:-1]
        return out

    trainer = make_trainer(tmp_path, server.target, rollouts, preset="paper")
    trainer.rollout_func = short_index
    with pytest.raises(BuildError, match=r"^rollout_func\.turn_index\[3\]: has \d+ entries"):
        trainer.train()
