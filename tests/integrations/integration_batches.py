"""A deterministic verl-agent-style batch: one row per environment step, trajectory-major."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROOMS = (
    "You are in the kitchen. You see a fridge 1 and a cabinet 1.",
    "You arrive at fridge 1. The fridge 1 is closed.",
    "You open the fridge 1. In it, you see an apple 1.",
    "You arrive at cabinet 1. The cabinet 1 is open. It is empty.",
    "You pick up the apple 1 from the fridge 1.",
)


@dataclass(frozen=True)
class StepRows:
    """Columns of a step-row batch (all one entry per row) plus token masks."""

    uid: np.ndarray  # object str: group
    traj_uid: np.ndarray  # object str: trajectory
    anchor_obs: np.ndarray  # object str
    rewards: np.ndarray  # object float: immediate reward r_t
    is_action_valid: np.ndarray  # bool
    step_index: np.ndarray  # int64
    response_mask: np.ndarray  # int64 [rows, tokens]
    input_ids: np.ndarray  # int64 [rows, prompt + tokens]: distinct per step

    @property
    def num_rows(self) -> int:
        return int(self.uid.shape[0])

    def take(self, order: np.ndarray) -> StepRows:
        """Rows in ``order`` (a permutation, possibly with repeats = copied rows)."""
        return StepRows(**{name: getattr(self, name)[order] for name in self.__dataclass_fields__})

    def trajectories(self) -> list[dict[str, object]]:
        """The same batch as trajectory dicts for ``build_request`` (rows must be unique)."""
        out: dict[str, dict[str, list[object]]] = {}
        groups: dict[str, str] = {}
        for r in np.argsort(self.step_index, kind="stable"):
            tid = str(self.traj_uid[r])
            groups[tid] = str(self.uid[r])
            t = out.setdefault(tid, {"states": [], "rewards": [], "invalid": []})
            t["states"].append(str(self.anchor_obs[r]))
            t["rewards"].append(float(self.rewards[r]))
            t["invalid"].append(not bool(self.is_action_valid[r]))
        first = [str(x) for x in dict.fromkeys(self.traj_uid.tolist())]
        return [{"trajectory_id": tid, "group_id": groups[tid], **out[tid]} for tid in first]


def rollout_rows(
    groups: int = 2, per_group: int = 4, response_length: int = 12, seed: int = 0
) -> StepRows:
    """groups x per_group trajectories of 1-4 steps; trajectory k of a group succeeds when k is
    even (reward 1 on its last step); every step's response covers a different token span, some
    responses are empty (zero-length) and some are left-padded."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[object]] = {n: [] for n in StepRows.__dataclass_fields__}
    for g in range(groups):
        for k in range(per_group):
            num_steps = 1 + (k + g) % 4
            for t in range(num_steps):
                cols["uid"].append(f"group-{g}")
                cols["traj_uid"].append(f"traj-{g}-{k}")
                cols["anchor_obs"].append(ROOMS[(t + k * (g + 1)) % len(ROOMS)])
                cols["rewards"].append(1.0 if (t == num_steps - 1 and k % 2 == 0) else 0.0)
                cols["is_action_valid"].append((t + k) % 5 != 3)
                cols["step_index"].append(t)
                length = 0 if (g, k, t) == (1, 1, 0) else int(rng.integers(1, response_length))
                start = int(rng.integers(0, response_length - length + 1))
                mask = np.zeros(response_length, dtype=np.int64)
                mask[start : start + length] = 1
                cols["response_mask"].append(mask)
                ids = rng.integers(3, 1000, size=response_length + 4)
                cols["input_ids"].append(ids)
    return StepRows(
        uid=np.array(cols["uid"], dtype=object),
        traj_uid=np.array(cols["traj_uid"], dtype=object),
        anchor_obs=np.array(cols["anchor_obs"], dtype=object),
        rewards=np.array(cols["rewards"], dtype=object),
        is_action_valid=np.array(cols["is_action_valid"], dtype=bool),
        step_index=np.array(cols["step_index"], dtype=np.int64),
        response_mask=np.stack(cols["response_mask"]),  # type: ignore[arg-type]
        input_ids=np.stack(cols["input_ids"]),  # type: ignore[arg-type]
    )


def shuffled_with_copies(rows: StepRows, seed: int = 1, copies: int = 3) -> np.ndarray:
    """A row order as a trainer leaves it: ``copies`` random rows appended (verl-agent's
    ``adjust_batch``), then everything shuffled (``_balance_batch``)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([np.arange(rows.num_rows), rng.choice(rows.num_rows, copies)])
    return rng.permutation(order)
