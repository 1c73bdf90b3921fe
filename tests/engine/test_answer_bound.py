"""The answer-size check (``Limits.max_message_bytes``) bounds the real answer from above:
with the limit set to the real answer's size it passes, one byte of id more and it refuses."""

from __future__ import annotations

import pytest
from proxmo.core.config import Similarity
from proxmo.engine import Engine, check_limits
from proxmo.errors import LimitExceeded
from proxmo.limits import Limits
from proxmo.store.memory import MemoryStore
from proxmo_client.v1 import proxmo_pb2 as pb

from engine.conftest import STATES, run


def _request(preset: str, groups: int, steps: int, id_chars: int) -> pb.ComputeAdvantagesRequest:
    request = pb.ComputeAdvantagesRequest(request_id="r" * id_chars,
                                          config=pb.EstimatorConfig(preset=preset))
    for g in range(groups):
        for k in range(4):
            trajectory = request.trajectories.add(
                trajectory_id=f"{g}-{k}".ljust(id_chars, "t"), group_id=f"{g}".ljust(id_chars, "g"),
                task_id=f"{g}".ljust(id_chars, "é"))
            trajectory.steps.extend(pb.Step(state=STATES[(s + k) % 3], reward=float(s % 2))
                                    for s in range(steps))
    return request


@pytest.mark.parametrize("preset", ["proxmo", "paper", "gigpo", "grpo", "rloo", "hgpo",
                                    "graphgpo", "proxmo-rl"])
@pytest.mark.parametrize(("groups", "steps", "id_chars"), [(1, 1, 1), (3, 7, 256), (8, 40, 30)])
def test_the_bound_is_never_below_the_real_answer(preset: str, groups: int, steps: int,
                                                  id_chars: int) -> None:
    request = _request(preset, groups, steps, id_chars)
    engine = Engine(store=MemoryStore(), embedder=None, default_similarity=Similarity.TFIDF,
                    compute_threads=1)
    try:
        size = run(engine.compute(request)).ByteSize()
    finally:
        engine.close()
    with pytest.raises(LimitExceeded, match="the answer would take up to"):
        check_limits(request, Limits(max_message_bytes=size - 1))
    # The bound is close: within a few percent plus the fixed part.
    check_limits(request, Limits(max_message_bytes=int(size * 1.3) + 1024))
