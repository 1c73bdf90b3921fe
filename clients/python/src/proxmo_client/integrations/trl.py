"""TRL hook: ``ProxmoGRPOTrainer`` trains on ProxMO's per-token advantages from the service.

``pip install "proxmo-client[trl]"``. A drop-in ``trl.GRPOTrainer`` subclass for multi-turn
rollouts made by TRL's ``rollout_func``. TRL computes one GRPO advantage per completion inline
in ``_generate_and_score_completions``; this subclass calls ``super()`` and then replaces
``advantages`` with a ``(B, T)`` tensor: the service's advantage of turn k on the completion
tokens of turn k, 0 on environment tokens (TRL's loss accepts (B,) or (B, T)). TRL is
imported only when ``ProxmoGRPOTrainer`` is first used.

The ``rollout_func`` contract. Besides TRL's ``prompt_ids``, ``completion_ids`` and
``logprobs`` (and usually ``env_mask``), it returns, one entry per completion:

=================  ==========================  ================================================
``turn_index``     ``list[list[int]]``         per completion token: the turn (0-based) whose
                                               action produced it, -1 for environment tokens
``anchor_obs``     ``list[list[str]]``         per turn: the observation the turn acted on
``turn_rewards``   ``list[list[float]]``       per turn: the immediate reward r_t
``turn_invalid``   ``list[list[bool]]``, opt.  per turn: the action was invalid
``success``        ``list[bool]``, optional    the episode succeeded
``task_id``        ``list[str]``, optional     stable task id (history); else a hash of the
                                               prompt, so repeats of one prompt share history
=================  ==========================  ================================================

Groups are TRL's: the ``num_generations`` consecutive completions of one prompt. A turn with
no tokens (e.g. cut by the length limit) still counts as a step. Reward functions still run
(TRL logs them) but no longer set the advantages.

Usage::

    trainer = ProxmoGRPOTrainer(
        model=model, reward_funcs=episode_return, args=GRPOConfig(num_generations=8, ...),
        train_dataset=dataset, processing_class=tokenizer, rollout_func=play_episodes,
        proxmo=ServiceConfig(server="localhost:50051", preset="proxmo"),
    )
    trainer.train()
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from proxmo_client.errors import BuildError
from proxmo_client.integrations.service import ServiceConfig
from proxmo_client.v1 import proxmo_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = [  # noqa: F822 (ProxmoGRPOTrainer comes from __getattr__)
    "TURN_KEYS", "ProxmoAdvantagesMixin", "ProxmoGRPOTrainer", "turn_token_advantages",
]  # fmt: skip

TURN_KEYS = ("turn_index", "anchor_obs", "turn_rewards")
_OPTIONAL_KEYS = ("turn_invalid", "success", "task_id")


class ProxmoAdvantagesMixin:
    """Put before ``GRPOTrainer`` in the bases (``ProxmoGRPOTrainer`` does).

    ``proxmo``: the service and estimator (default: localhost:50051, the server's preset).
    After each generation, ``proxmo_last_response`` holds the service's answer and
    ``proxmo_last_advantages`` the (B, T) tensor installed for the loss.
    """

    def __init__(self, *args: Any, proxmo: ServiceConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proxmo = proxmo or ServiceConfig()
        self.proxmo_last_response: pb.ComputeAdvantagesResponse | None = None
        self.proxmo_last_advantages: torch.Tensor | None = None
        self._proxmo_completion_lengths: list[int] = []

    def _generate(self, prompts: list[Any]) -> Any:
        result = super()._generate(prompts)  # type: ignore[misc]
        completion_ids = result[1]
        self._proxmo_completion_lengths = [len(ids) for ids in completion_ids]
        return result

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output: dict[str, Any] = super()._generate_and_score_completions(inputs)  # type: ignore[misc]
        mode = "train" if self.model.training else "eval"  # type: ignore[attr-defined]
        num_generations = (
            self.num_generations if mode == "train" else self.num_generations_eval  # type: ignore[attr-defined]
        )
        completion_ids = output["completion_ids"]
        accelerator = self.accelerator  # type: ignore[attr-defined]
        records = _records(inputs, self._proxmo_completion_lengths, completion_ids.shape[1])
        offset = accelerator.process_index * len(records)
        if accelerator.num_processes > 1:
            # Groups span processes: one request for the global batch, sent by the main process.
            from accelerate.utils import (  # type: ignore[import-not-found]
                broadcast_object_list,
                gather_object,
            )

            everything = gather_object(records)
            answer: list[Any] = [None]
            if accelerator.is_main_process:
                answer = [self._proxmo_answer(everything, num_generations)]
            broadcast_object_list(answer)
            response = answer[0]
        else:
            response = self._proxmo_answer(records, num_generations)
        advantages = turn_token_advantages(response, records, offset, completion_ids.shape[1])
        token_advantages = completion_ids.new_tensor(advantages, dtype=output["advantages"].dtype)
        output["advantages"] = token_advantages
        self.proxmo_last_response = response
        self.proxmo_last_advantages = token_advantages
        return output

    def _proxmo_answer(
        self, records: Sequence[Mapping[str, Any]], num_generations: int
    ) -> pb.ComputeAdvantagesResponse:
        batch = uuid.uuid4().hex[:12]
        trajectories = [
            {
                "trajectory_id": f"{batch}-c{i}",
                "group_id": f"{batch}-g{i // num_generations}",
                "task_id": record["task_id"],
                "states": record["anchor_obs"],
                "rewards": record["turn_rewards"],
                "invalid": record["turn_invalid"],
                "success": record["success"],
            }
            for i, record in enumerate(records)
        ]
        config = self.proxmo
        return config.client().compute_advantages(
            trajectories, preset=config.preset or None, dry_run=config.dry_run,
            timeout=config.timeout, **dict(config.overrides),
        )  # fmt: skip


def turn_token_advantages(
    response: pb.ComputeAdvantagesResponse,
    records: Sequence[Mapping[str, Any]],
    offset: int,
    num_tokens: int,
) -> np.ndarray:
    """``out[i, j]`` = the advantage of turn ``turn_index[i][j]`` of completion i (0 where the
    index is -1 or past the completion): float64 ``[len(records), num_tokens]``. ``records`` are
    this process's completions; the response's trajectory ``offset + i`` is completion i."""
    out = np.zeros((len(records), num_tokens), dtype=np.float64)
    for i, record in enumerate(records):
        entry = response.trajectories[offset + i]
        per_turn = np.asarray(entry.advantages, dtype=np.float64)
        if per_turn.shape[0] != len(record["anchor_obs"]):
            raise BuildError(
                f"response.trajectories[{offset + i}].advantages",
                f"has {per_turn.shape[0]} values for {len(record['anchor_obs'])} turns",
            )
        turns = np.asarray(record["turn_index"], dtype=np.int64)
        own = turns >= 0
        out[i, : turns.shape[0]][own] = per_turn[turns[own]]
    return out


def _records(
    inputs: Sequence[Mapping[str, Any]], completion_lengths: Sequence[int], num_tokens: int
) -> list[dict[str, Any]]:
    """Checked per-completion turn data from the ``rollout_func`` extra keys in ``inputs``."""
    records = []
    for i, item in enumerate(inputs):
        for key in TURN_KEYS:
            if key not in item:
                raise BuildError(
                    f"rollout_func.{key}",
                    "missing: ProxmoGRPOTrainer needs the rollout_func to return "
                    f"{', '.join(TURN_KEYS)} (one entry per completion; see "
                    "proxmo_client.integrations.trl)",
                )
        where = f"rollout_func.%s[{i}]"
        states = list(item["anchor_obs"])
        num_turns = len(states)
        if num_turns == 0:
            raise BuildError(where % "anchor_obs", "a completion needs at least one turn")
        rewards = list(item["turn_rewards"])
        if len(rewards) != num_turns:
            raise BuildError(
                where % "turn_rewards", f"has {len(rewards)} entries for {num_turns} turns"
            )
        invalid = item.get("turn_invalid")
        if invalid is not None and len(invalid) != num_turns:
            raise BuildError(
                where % "turn_invalid", f"has {len(invalid)} entries for {num_turns} turns"
            )
        turns = np.asarray(item["turn_index"], dtype=np.int64).reshape(-1)
        length = completion_lengths[i] if i < len(completion_lengths) else num_tokens
        if turns.shape[0] != length:
            raise BuildError(
                where % "turn_index",
                f"has {turns.shape[0]} entries but the completion has {length} tokens",
            )
        bad = np.flatnonzero((turns < -1) | (turns >= num_turns))
        if bad.size:
            raise BuildError(
                f"{where % 'turn_index'}[{bad[0]}]",
                f"turn {int(turns[bad[0]])} outside -1..{num_turns - 1}",
            )
        task = item.get("task_id")
        if task is None:
            task = "prompt-" + hashlib.sha1(repr(item.get("prompt")).encode()).hexdigest()[:16]
        success = item.get("success")
        records.append({
            "anchor_obs": states,
            "turn_rewards": rewards,
            "turn_invalid": None if invalid is None else [bool(v) for v in invalid],
            "turn_index": turns,
            "success": None if success is None else bool(success),
            "task_id": str(task),
        })  # fmt: skip
    return records


_TRAINER_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    """``ProxmoGRPOTrainer`` is built on first use, so importing this module needs no TRL."""
    global _TRAINER_CLASS
    if name != "ProxmoGRPOTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _TRAINER_CLASS is None:
        from trl import GRPOTrainer  # type: ignore[import-not-found]

        _TRAINER_CLASS = type(
            "ProxmoGRPOTrainer",
            (ProxmoAdvantagesMixin, GRPOTrainer),
            {"__module__": __name__, "__doc__": ProxmoAdvantagesMixin.__doc__},
        )
    return _TRAINER_CLASS
