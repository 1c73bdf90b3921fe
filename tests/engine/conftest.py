"""Shared helpers for the engine tests: request builders and an Engine on a real MemoryStore."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import pytest
from proxmo.core.config import Similarity
from proxmo.engine import Engine
from proxmo.limits import Limits
from proxmo.store.memory import MemoryStore
from proxmo_client.v1 import proxmo_pb2 as pb

T = TypeVar("T")

# Three ALFWorld-like states, so TF-IDF has a vocabulary and PSA has something to weigh.
STATES = (
    "You arrive at cabinet 1. The cabinet 1 is closed.",
    "You open the cabinet 1. In it, you see a soapbar 1.",
    "You arrive at countertop 1. On the countertop 1, you see a apple 2.",
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Each test runs its coroutine on a fresh loop (no pytest-asyncio needed)."""
    return asyncio.run(coro)


def trajectory(
    trajectory_id: str,
    group_id: str,
    rewards: Sequence[float],
    *,
    task_id: str = "",
    success: bool | None = None,
    states: Sequence[str] | None = None,
    embeddings: Sequence[Sequence[float]] | None = None,
) -> pb.Trajectory:
    """A trajectory with one step per reward (states cycle through STATES by default)."""
    steps = []
    for t, reward in enumerate(rewards):
        state = states[t] if states is not None else STATES[t % len(STATES)]
        step = pb.Step(state=state, reward=reward)
        if embeddings is not None:
            step.state_embedding.extend(embeddings[t])
        steps.append(step)
    traj = pb.Trajectory(trajectory_id=trajectory_id, group_id=group_id, task_id=task_id,
                         steps=steps)
    if success is not None:
        traj.success = success
    return traj


def group_request(
    *,
    request_id: str = "req-1",
    preset: str = "paper",
    groups: Sequence[tuple[str, Sequence[bool]]] = (("g0", (True, False, False, True)),),
    task_ids: dict[str, str] | None = None,
    **config: Any,
) -> pb.ComputeAdvantagesRequest:
    """One trajectory per outcome: a success ends with reward 1, a failure with reward 0;
    trajectory lengths vary (2..4 steps) so that per-trajectory splitting is exercised."""
    trajectories = []
    for group_id, outcomes in groups:
        for k, ok in enumerate(outcomes):
            length = 2 + k % 3
            rewards = [0.0] * (length - 1) + [1.0 if ok else 0.0]
            trajectories.append(trajectory(
                f"{group_id}-t{k}", group_id, rewards,
                task_id=(task_ids or {}).get(group_id, ""),
            ))
    return pb.ComputeAdvantagesRequest(
        request_id=request_id,
        trajectories=trajectories,
        config=pb.EstimatorConfig(preset=preset, **config),
    )


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def engine(store: MemoryStore) -> Iterator[Engine]:
    eng = Engine(store=store, embedder=None, default_similarity=Similarity.TFIDF,
                 limits=Limits(), compute_threads=1)
    yield eng
    eng.close()
