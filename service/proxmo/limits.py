"""The per-request size limits: the one definition of each limit, its default and its help.

Each field is also a server setting of the same name (``--max-trajectories``,
``PROXMO_MAX_TRAJECTORIES``, the config file's ``max_trajectories``: ``proxmo.server.config``
spells them out from here) and a field of the same name in GetServerInfo's ``Limits`` message
(``proxmo.server.runtime.limits_to_proto``). Adding a limit: a field here, and its twin in
``protos/proxmo/v1/proxmo.proto``; then check it where it bounds work (``proxmo.engine``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """Per-request size limits; exceeding one raises LimitExceeded naming the field. Every
    field's ``help`` is its ``--help`` text."""

    # The largest message either way: the gRPC message size, the REST body, and the largest
    # answer that can be sent (a request whose answer would be larger is refused before
    # anything is computed or stored).
    max_message_bytes: int = field(default=64 * 1024 * 1024,
                                   metadata={"help": "largest message, bytes"})
    max_trajectories: int = field(default=4096, metadata={"help": "trajectories per request"})
    max_steps_per_trajectory: int = field(default=1000, metadata={"help": "steps per trajectory"})
    max_total_steps: int = field(default=200_000, metadata={"help": "steps per request"})
    max_state_chars: int = field(default=16_384, metadata={"help": "characters per state text"})
    max_embedding_dim: int = field(default=4096, metadata={"help": "largest state_embedding"})
    # Ids are stored (task ids, in the success-rate store), logged and echoed in every answer.
    max_id_chars: int = field(
        default=256, metadata={"help": "longest request, trajectory, group or task id"}
    )
    # Distinct task ids per request: the store's work per batch is linear in them.
    max_tasks_per_request: int = field(
        default=1024, metadata={"help": "distinct task ids per request"}
    )
    # Distinct states per group when PSA runs (TFIDF, ENCODER, PRECOMPUTED): its work grows
    # with their square. 1,024 bounds the worst accepted request (200,000 steps, every group
    # at the cap) to seconds on 2 cores; docs/server.md has the measurement.
    max_group_distinct_states: int = field(
        default=1024, metadata={"help": "distinct states in one group when PSA runs (its work "
                                "grows with their square)"}
    )
