"""Any trainer's per-step rows -> one request -> one advantage per row -> token advantages.

A trainer that keeps one row per environment step (verl-agent, SkyRL, most multi-turn GRPO
pipelines) has, per row: a group id, a trajectory id, the anchor observation, the immediate
reward, optionally an invalid-action flag, a success flag, a step index. Three steps::

    request, plan = rows_to_request(uid, traj_uid, anchor_obs, rewards, preset="proxmo")
    response = client.compute_advantages(request)
    token_adv = token_advantages_for_rows(response, plan, response_mask)   # [rows, tokens]

Row bookkeeping:

- **Order.** Rows may come in any order. A trajectory's steps are ordered by ``step_index``
  when given (0-based; after removing duplicates each index must appear exactly once), else by
  the order in which its rows first appear (right for trajectory-major or step-major rollouts,
  wrong once a trainer has shuffled rows: pass ``step_index`` then).
- **Duplicates.** Trainers pad batches by copying rows (verl-agent's ``adjust_batch``). A copy
  must get its original's advantage and must not add a step (that would shift every later
  step's return and count the step twice in the group statistics). A row is a copy of an earlier
  row of the same trajectory when both have the same ``step_index``, or, without step indices,
  the same ``row_keys`` entry (e.g. a hash of the row's prompt and response tokens). Copies
  must agree with their original on state, reward and flags, else :class:`BuildError`. With
  neither ``step_index`` nor ``row_keys`` every row is its own step: identical-looking rows can
  be real repeated steps (an agent repeating an action that changes nothing), so they are
  never merged on state and reward alone.
- **Tokens.** Row r's scalar lands on row r's *own* response mask (see
  :func:`~proxmo_client.tokens.to_token_advantages`); a row with an empty response keeps its
  step (the step happened) and gets no token advantages.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from proxmo_client.builders import (
    ResultField,
    RowBookkeeping,
    advantages_to_rows,
    build_request,
    integer_column,
    row_column,
    trajectories_from_rows,
)
from proxmo_client.errors import BuildError
from proxmo_client.tokens import to_token_advantages
from proxmo_client.v1 import proxmo_pb2 as pb

__all__ = [
    "RowPlan",
    "advantages_for_rows",
    "derive_step_index",
    "rows_to_request",
    "token_advantages_for_rows",
]


@dataclass(frozen=True)
class RowPlan:
    """Where every input row went.

    ``kept_rows[u]`` is the input row that stands for unique step u; ``row_unique[r]`` is the
    unique step of input row r (a copy points at its original). ``bookkeeping`` maps unique steps
    to the request's trajectories and steps.
    """

    kept_rows: npt.NDArray[np.int64]  # [n_unique]
    row_unique: npt.NDArray[np.int64]  # [n_rows]
    bookkeeping: RowBookkeeping  # over the unique steps

    @property
    def num_rows(self) -> int:
        return int(self.row_unique.shape[0])

    @property
    def num_duplicates(self) -> int:
        """Rows that are copies of an earlier row (not sent as steps)."""
        return self.num_rows - int(self.kept_rows.shape[0])

    @property
    def row_step(self) -> npt.NDArray[np.int64]:
        """Step index (0-based, within its trajectory) of every input row."""
        return self.bookkeeping.row_step[self.row_unique]


def rows_to_request(
    group_ids: Sequence[Any] | npt.ArrayLike,
    trajectory_ids: Sequence[Any] | npt.ArrayLike,
    states: Sequence[str] | npt.ArrayLike,
    rewards: npt.ArrayLike,
    *,
    invalid: npt.ArrayLike | None = None,
    task_ids: Sequence[Any] | npt.ArrayLike | None = None,
    success: npt.ArrayLike | None = None,
    state_keys: Sequence[str] | npt.ArrayLike | None = None,
    step_index: npt.ArrayLike | None = None,
    row_keys: Sequence[Hashable] | None = None,
    preset: str | None = None,
    request_id: str | None = None,
    dry_run: bool = False,
    **config_overrides: Any,
) -> tuple[pb.ComputeAdvantagesRequest, RowPlan]:
    """A request from flat per-step rows (one entry per row in every argument), and its plan.

    ``rewards`` are immediate step rewards r_t (the service discounts them itself).
    ``step_index`` or ``row_keys`` identify copied rows (module docstring). Config arguments
    are those of :func:`~proxmo_client.builders.build_request`.
    """
    traj_column = _as_column(trajectory_ids, "trajectory_ids")
    num_rows = len(traj_column)
    if num_rows == 0:
        raise BuildError("trajectory_ids", "at least one row is required")
    if step_index is not None and row_keys is not None:
        raise BuildError("row_keys", "give step_index or row_keys to find copied rows, not both")
    columns: dict[str, Any] = {
        "group_ids": _as_column(group_ids, "group_ids"),
        "states": _as_column(states, "states"),
        "rewards": _as_column(rewards, "rewards"),
        "invalid": _as_column(invalid, "invalid"),
        "task_ids": _as_column(task_ids, "task_ids"),
        "success": _as_column(success, "success"),
        "state_keys": _as_column(state_keys, "state_keys"),
    }
    steps = _as_column(step_index, "step_index")
    for name, column in (*columns.items(), ("step_index", steps), ("row_keys", row_keys)):
        if column is not None:
            row_column(column, name, num_rows, per="row")
    if steps is not None:
        steps = integer_column(steps, "step_index", num_rows)
        identity: Sequence[Hashable] | None = steps.tolist()
    else:
        identity = row_keys

    kept, row_unique = _find_copies(traj_column, identity, columns)

    def kept_only(name: str) -> list[Any] | None:
        column = columns[name]
        return None if column is None else [column[r] for r in kept]

    try:
        trajectories, bookkeeping = trajectories_from_rows(
            [columns["group_ids"][r] for r in kept],
            [traj_column[r] for r in kept],
            [columns["states"][r] for r in kept],
            [columns["rewards"][r] for r in kept],
            invalid=kept_only("invalid"),
            task_ids=kept_only("task_ids"),
            success=kept_only("success"),
            state_keys=kept_only("state_keys"),
            step_index=None if steps is None else steps[kept],
        )
    except BuildError as e:  # it saw only the kept rows: name the caller's row index
        raise _in_input_rows(e, kept) from None
    request = build_request(
        trajectories, preset=preset, request_id=request_id, dry_run=dry_run, **config_overrides
    )
    plan = RowPlan(kept_rows=kept, row_unique=row_unique, bookkeeping=bookkeeping)
    return request, plan


def advantages_for_rows(
    response: pb.ComputeAdvantagesResponse, plan: RowPlan, field: ResultField = "advantages"
) -> npt.NDArray[np.float64]:
    """The response's per-step ``field`` for every input row (copies get their original's)."""
    per_unique = advantages_to_rows(response, plan.bookkeeping, field)
    result: npt.NDArray[np.float64] = per_unique[plan.row_unique]
    return result


def token_advantages_for_rows(
    response: pb.ComputeAdvantagesResponse,
    plan: RowPlan,
    response_mask: Any,
    *,
    field: ResultField = "advantages",
    dtype: Any = None,
) -> Any:
    """``advantages_for_rows(...)[r] * response_mask[r, j]``: ``[rows, tokens]``, in the mask's
    container (numpy array or torch tensor) and, for a tensor, on its device."""
    return to_token_advantages(
        advantages_for_rows(response, plan, field), response_mask, dtype=dtype
    )


def derive_step_index(
    trajectory_ids: Sequence[Any] | npt.ArrayLike, row_keys: Sequence[Hashable] | None = None
) -> npt.NDArray[np.int64]:
    """Each row's 0-based step within its trajectory, from the current row order.

    For rows still in time order (before a trainer reorders them): step t of a trajectory is its
    t-th distinct row. With ``row_keys``, a row whose key already appeared in its trajectory is a
    copy and gets the original's index. Store the result as the rows' ``step_index`` before any
    reordering.
    """
    trajectories = _as_column(trajectory_ids, "trajectory_ids")
    num_rows = len(trajectories)
    if row_keys is not None and len(row_keys) != num_rows:
        raise BuildError("row_keys", f"has {len(row_keys)} entries, expected {num_rows}")
    seen: dict[tuple[str, Hashable], int] = {}
    next_step: dict[str, int] = {}
    steps = np.empty(num_rows, dtype=np.int64)
    for r in range(num_rows):
        tid = str(trajectories[r])
        key = (tid, r if row_keys is None else row_keys[r])
        step = seen.get(key)
        if step is None:
            step = seen[key] = next_step.get(tid, 0)
            next_step[tid] = step + 1
        steps[r] = step
    return steps


# ------------------------------------------------------------------- helpers


def _as_column(value: Any, where: str) -> Any:
    """One entry per row: a list or 1-D array (torch tensors become numpy arrays)."""
    if value is None:
        return None
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor (torch not imported)
        value = value.detach().cpu().numpy()
    return row_column(value, where)


def _in_input_rows(error: BuildError, kept: npt.NDArray[np.int64]) -> BuildError:
    """``error`` with the leading ``name[u]`` of its field (u: a kept row) renamed ``name[r]``."""
    match = re.match(r"^(\w+)\[(\d+)\]", error.field)
    if match is None or int(match.group(2)) >= kept.shape[0]:
        return error
    row = int(kept[int(match.group(2))])
    return BuildError(f"{match.group(1)}[{row}]{error.field[match.end() :]}", error.message)


def _find_copies(
    trajectory_ids: Sequence[Any],
    identity: Sequence[Hashable] | None,
    columns: dict[str, Any],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(kept rows, unique step of each row). Row r is a copy of the first row r0 of the same
    trajectory with the same identity; it must agree with r0 on every per-step column."""
    num_rows = len(trajectory_ids)
    if identity is None:
        everything = np.arange(num_rows, dtype=np.int64)
        return everything, everything.copy()
    first: dict[tuple[str, Hashable], int] = {}
    kept: list[int] = []
    row_unique = np.empty(num_rows, dtype=np.int64)
    for r in range(num_rows):
        key = (str(trajectory_ids[r]), identity[r])
        r0 = first.get(key)
        if r0 is None:
            first[key] = r
            row_unique[r] = len(kept)
            kept.append(r)
            continue
        for name in ("states", "rewards", "invalid", "state_keys"):
            column = columns[name]
            if column is not None and column[r] != column[r0]:
                raise BuildError(
                    f"{name}[{r}]",
                    f"row {r} repeats step {identity[r]!r} of trajectory {key[0]!r} (row {r0}) "
                    f"but has {column[r]!r} instead of {column[r0]!r}",
                )
        row_unique[r] = row_unique[r0]
    return np.asarray(kept, dtype=np.int64), row_unique
