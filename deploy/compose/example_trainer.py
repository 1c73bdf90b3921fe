#!/usr/bin/env python3
"""Example trainer loop beside proxmo: copy this shape into a real trainer.

Each "training step" rolls out a group of trajectories per task (here: random toy rollouts),
asks proxmo for per-step advantages over gRPC, and would hand them to the policy update. The
per-task success rates live in proxmo's Redis, so they carry over between steps and restarts.

Environment (the compose file sets them):
  PROXMO_TARGET          host:port of the gRPC server (default localhost:50051)
  TRAINER_STEPS          number of steps, 0 = run until stopped (default 0)
  TRAINER_TASKS          tasks per batch (default 4); TRAINER_GROUP_SIZE rollouts each (default 8)
  TRAINER_SEED           random seed (default 0)
"""

from __future__ import annotations

import os
import random
import sys
import uuid
from typing import Any

from proxmo_client import ProxmoClient

ROOMS = ("kitchen", "bathroom", "bedroom", "hallway", "garage")
ITEMS = ("mug", "apple", "soapbar", "key", "book")


def rollout(rng: random.Random, task: int, index: int, step: int) -> dict[str, Any]:
    """One toy trajectory: a walk through rooms that succeeds (reward 1 at the end) or not."""
    length = rng.randint(2, 6)
    target = ITEMS[task % len(ITEMS)]
    states = [f"You are in the {rng.choice(ROOMS)}. You see a {rng.choice(ITEMS)}."
              for _ in range(length - 1)]
    success = rng.random() < 0.2 + 0.15 * (task % 4)
    states.append(f"You pick up the {target}." if success else "Nothing happens.")
    rewards = [0.0] * (length - 1) + [1.0 if success else 0.0]
    return {
        "trajectory_id": f"s{step}-t{task}-r{index}",
        "group_id": f"s{step}-t{task}",  # one group per task per step (verl's uid)
        "task_id": f"toy-task-{task}",   # stable across steps: keys the success-rate history
        "states": states,
        "rewards": rewards,
    }


def main() -> int:
    target = os.environ.get("PROXMO_TARGET", "localhost:50051")
    steps = int(os.environ.get("TRAINER_STEPS", "0"))
    tasks = int(os.environ.get("TRAINER_TASKS", "4"))
    group_size = int(os.environ.get("TRAINER_GROUP_SIZE", "8"))
    rng = random.Random(int(os.environ.get("TRAINER_SEED", "0")))

    with ProxmoClient(target) as client:
        # Blocks until the server has warmed up (encoder loaded / TensorRT engine built).
        client.wait_until_serving(timeout=900)
        step = 0
        while steps == 0 or step < steps:
            batch = [rollout(rng, t, i, step) for t in range(tasks) for i in range(group_size)]
            # One request_id per logical batch: a retried call is applied to the history once.
            response = client.compute_advantages(batch, preset="proxmo",
                                                 request_id=str(uuid.uuid4()))
            rows = sum(len(t.advantages) for t in response.trajectories)
            rates = ", ".join(f"{g.task_id}={g.success_rate:.3f}" for g in response.groups)
            print(f"step {step}: {rows} step advantages; p: {rates}", flush=True)
            # ...here a real trainer broadcasts each step's advantage to its response tokens
            # (proxmo_client.to_token_advantages) and runs the policy update.
            step += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
