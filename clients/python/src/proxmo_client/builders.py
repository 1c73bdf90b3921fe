"""Build proxmo requests from plain Python and numpy, and map answers back onto rows.

Two input layouts:

- one dict per trajectory -> :func:`build_request`::

      build_request([{"trajectory_id": "t0", "group_id": "g0", "states": [...], "rewards": [...]}])

- one row per step, as trainers keep them (verl-agent: ``uid``, ``traj_uid``, ``anchor_obs``,
  per-step rewards), rows in any order -> :func:`trajectories_from_rows`, which also returns the
  :class:`RowBookkeeping` that :func:`advantages_to_rows` uses to put the answer back in row order.

Malformed input raises :class:`~proxmo_client.errors.BuildError` naming the field and index
before anything is sent.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast

import numpy as np
import numpy.typing as npt
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor

from proxmo_client.errors import BuildError
from proxmo_client.v1 import proxmo_pb2 as pb

TrajectoryLike: TypeAlias = "Mapping[str, Any] | pb.Trajectory"
ResultField = Literal["advantages", "episode_advantages", "step_advantages", "returns"]

TRAJECTORY_KEYS = (
    "trajectory_id", "group_id", "task_id", "states", "rewards", "invalid", "success",
    "state_keys", "embeddings",
)  # fmt: skip
_CONFIG_FIELDS = pb.EstimatorConfig.DESCRIPTOR.fields_by_name


# ------------------------------------------------------------------- enums and config


def parse_enum(enum: str | EnumDescriptor, value: str | int) -> int:
    """The number of ``value`` in a proxmo.v1 enum, accepting the short or the full name.

    ``parse_enum("Similarity", "tfidf") == parse_enum("Similarity", "SIMILARITY_TFIDF") == 1``;
    ``"MEAN_STD"``, ``"mean-std"`` and ``2`` all name ``NORMALIZATION_MEAN_STD``.
    """
    descriptor = pb.DESCRIPTOR.enum_types_by_name[enum] if isinstance(enum, str) else enum
    # Every proxmo.v1 enum prefixes its values with its UPPER_SNAKE name, e.g. SUCCESS_RATE_SOURCE_.
    prefix = descriptor.values_by_number[0].name.removesuffix("UNSPECIFIED")
    if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
        raise BuildError(descriptor.name, f"expected a name or a number, got {value!r}")
    if not isinstance(value, str):
        if int(value) not in descriptor.values_by_number:
            raise BuildError(descriptor.name, f"no value numbered {int(value)}")
        return int(value)
    name = value.strip().upper().replace("-", "_")
    for candidate in (name, prefix + name):
        if candidate in descriptor.values_by_name:
            return int(descriptor.values_by_name[candidate].number)
    choices = ", ".join(v.name.removeprefix(prefix).lower() for v in descriptor.values[1:])
    raise BuildError(descriptor.name, f"unknown value {value!r}; expected one of {choices}")


def build_config(preset: str | None = None, **overrides: Any) -> pb.EstimatorConfig:
    """An ``EstimatorConfig`` from a preset name and proto-named overrides.

    Enum fields take names (``similarity="encoder"``, ``episode_normalization="MEAN_STD"``) or
    numbers; ``None`` leaves a field unset (the preset's value). Range checks are the server's.
    """
    config = pb.EstimatorConfig(preset=preset or "")
    for name, value in overrides.items():
        field = _CONFIG_FIELDS.get(name)
        where = f"config.{name}"
        if field is None:
            known = ", ".join(n for n in _CONFIG_FIELDS if n != "preset")
            raise BuildError(where, f"unknown config field; expected one of {known}")
        if value is None:
            continue
        if field.enum_type is not None:
            try:
                setattr(config, name, parse_enum(cast(EnumDescriptor, field.enum_type), value))
            except BuildError as e:
                raise BuildError(where, e.message) from None
        elif field.type == FieldDescriptor.TYPE_BOOL:
            if not isinstance(value, (bool, np.bool_)):
                raise BuildError(where, f"expected a bool, got {value!r}")
            setattr(config, name, bool(value))
        elif field.type == FieldDescriptor.TYPE_UINT32:
            setattr(config, name, _count(value, where))
        else:
            setattr(config, name, _finite_float(value, where))
    return config


# ------------------------------------------------------------------- one dict per trajectory


def build_request(
    trajectories: Iterable[TrajectoryLike],
    *,
    preset: str | None = None,
    request_id: str | None = None,
    dry_run: bool = False,
    **config_overrides: Any,
) -> pb.ComputeAdvantagesRequest:
    """A ``ComputeAdvantagesRequest`` from trajectory dicts (or ``Trajectory`` messages).

    Each dict has ``trajectory_id``, ``group_id`` and per-step ``states`` (str) and ``rewards``
    (finite numbers), and optionally ``task_id``, ``invalid`` (bools), ``success`` (bool),
    ``state_keys`` (str) and ``embeddings`` (a ``[steps, dim]`` array). ``request_id`` defaults
    to a fresh uuid4: keep it when re-sending the same batch, so it is applied only once.
    Config overrides use the proto field names, see :func:`build_config`.
    """
    if isinstance(trajectories, (str, bytes, Mapping)) or not isinstance(trajectories, Iterable):
        raise BuildError("trajectories", "expected a list of trajectory dicts or messages")
    request = pb.ComputeAdvantagesRequest(
        request_id=request_id or new_request_id(),
        dry_run=dry_run,
        config=build_config(preset, **config_overrides),
    )
    first_index: dict[str, int] = {}
    for i, item in enumerate(trajectories):
        message = request.trajectories.add()
        if isinstance(item, pb.Trajectory):
            message.CopyFrom(item)
        elif isinstance(item, Mapping):
            _fill_trajectory(message, item, f"trajectories[{i}]")
        else:
            raise BuildError(
                f"trajectories[{i}]",
                f"expected a dict or a proxmo.v1.Trajectory, got {type(item).__name__}",
            )
        previous = first_index.setdefault(message.trajectory_id, i)
        if previous != i:
            raise BuildError(
                f"trajectories[{i}].trajectory_id",
                f"{message.trajectory_id!r} repeats trajectories[{previous}]",
            )
    if not request.trajectories:
        raise BuildError("trajectories", "at least one trajectory is required")
    return request


def new_request_id() -> str:
    """A fresh idempotency key (uuid4)."""
    return str(uuid.uuid4())


def _fill_trajectory(message: pb.Trajectory, item: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(item) - set(TRAJECTORY_KEYS))
    if unknown:
        raise BuildError(
            f"{where}.{unknown[0]}", f"unknown key; expected {', '.join(TRAJECTORY_KEYS)}"
        )
    for key in ("trajectory_id", "group_id"):
        if key not in item:
            raise BuildError(f"{where}.{key}", "is required")
    message.trajectory_id = _identifier(item["trajectory_id"], f"{where}.trajectory_id")
    message.group_id = _identifier(item["group_id"], f"{where}.group_id")
    if item.get("task_id") is not None:
        message.task_id = _identifier(item["task_id"], f"{where}.task_id")
    if item.get("success") is not None:
        message.success = _bool(item["success"], f"{where}.success")

    for key in ("states", "rewards"):
        if key not in item:
            raise BuildError(f"{where}.{key}", "is required (one entry per step)")
    states = _strings(item["states"], f"{where}.states")
    if not states:
        raise BuildError(f"{where}.states", "a trajectory needs at least one step")
    num_steps = len(states)
    rewards = _floats(item["rewards"], f"{where}.rewards", num_steps)
    invalid = _bools(item.get("invalid"), f"{where}.invalid", num_steps)
    keys = item.get("state_keys")
    state_keys = _strings(keys, f"{where}.state_keys", num_steps) if keys is not None else None
    embeddings = _matrix(item.get("embeddings"), f"{where}.embeddings", num_steps)
    _add_steps(message, range(num_steps), states, rewards, invalid, state_keys, embeddings)


def _add_steps(
    message: pb.Trajectory,
    rows: Iterable[int],
    states: Sequence[str],
    rewards: Sequence[float],
    invalid: npt.NDArray[np.bool_] | None,
    state_keys: Sequence[str] | None,
    embeddings: npt.NDArray[np.float32] | None,
) -> None:
    """Appends to ``message`` one step per entry of ``rows``, an index into the checked
    per-step columns."""
    for r in rows:
        step = message.steps.add(state=states[r], reward=rewards[r])
        if invalid is not None:
            step.invalid_action = bool(invalid[r])
        if state_keys is not None:
            step.state_key = state_keys[r]
        if embeddings is not None:
            step.state_embedding.extend(embeddings[r].tolist())


# ------------------------------------------------------------------- one row per step


@dataclass(frozen=True)
class RowBookkeeping:
    """Where each input row went: row ``r`` is step ``row_step[r]`` of trajectory
    ``trajectory_ids[row_trajectory[r]]``."""

    trajectory_ids: tuple[str, ...]
    row_trajectory: npt.NDArray[np.int64]  # [n_rows]
    row_step: npt.NDArray[np.int64]  # [n_rows]
    num_steps: npt.NDArray[np.int64]  # [n_trajectories]

    @property
    def num_rows(self) -> int:
        return int(self.row_trajectory.shape[0])


def trajectories_from_rows(
    group_ids: Sequence[Any] | npt.ArrayLike,
    trajectory_ids: Sequence[Any] | npt.ArrayLike,
    states: Sequence[str] | npt.ArrayLike,
    rewards: npt.ArrayLike,
    *,
    invalid: npt.ArrayLike | None = None,
    task_ids: Sequence[Any] | npt.ArrayLike | None = None,
    success: npt.ArrayLike | None = None,
    state_keys: Sequence[str] | npt.ArrayLike | None = None,
    embeddings: npt.ArrayLike | None = None,
    step_index: npt.ArrayLike | None = None,
) -> tuple[list[pb.Trajectory], RowBookkeeping]:
    """Trajectories from flat per-step rows (verl-agent: ``uid``, ``traj_uid``, ``anchor_obs``).

    Every argument has one entry per row. Rows may come in any order (trajectory-major,
    step-major, shuffled): trajectories are numbered by first appearance, and a trajectory's
    steps are its rows in row order, or sorted by ``step_index`` (0-based, each index exactly
    once) when given. Per-trajectory values (group, task, success) must agree across its rows.
    Returns the ``Trajectory`` messages (for :func:`build_request`) and the bookkeeping for
    :func:`advantages_to_rows`.
    """
    traj_column = row_column(trajectory_ids, "trajectory_ids")
    num_rows = len(traj_column)
    if num_rows == 0:
        raise BuildError("trajectory_ids", "at least one row is required")
    group_column = row_column(group_ids, "group_ids", num_rows)
    state_column = _strings(states, "states", num_rows)
    reward_column = _floats(rewards, "rewards", num_rows)
    invalid_column = _bools(invalid, "invalid", num_rows)
    task_column = row_column(task_ids, "task_ids", num_rows) if task_ids is not None else None
    success_column = _bools(success, "success", num_rows)
    keys = state_keys
    key_column = _strings(keys, "state_keys", num_rows) if keys is not None else None
    embedding_matrix = _matrix(embeddings, "embeddings", num_rows)

    traj_ids: list[str] = []
    traj_index: dict[str, int] = {}
    first_row: list[int] = []
    rows_of: list[list[int]] = []
    row_trajectory = np.empty(num_rows, dtype=np.int64)
    for r in range(num_rows):
        tid = _identifier(traj_column[r], f"trajectory_ids[{r}]")
        k = traj_index.get(tid)
        if k is None:
            k = traj_index[tid] = len(traj_ids)
            traj_ids.append(tid)
            first_row.append(r)
            rows_of.append([])
        rows_of[k].append(r)
        row_trajectory[r] = k
        r0 = first_row[k]
        _same(group_column, r, r0, "group_ids", tid)
        if task_column is not None:
            _same(task_column, r, r0, "task_ids", tid)
        if success_column is not None:
            _same(success_column, r, r0, "success", tid)

    row_step = np.empty(num_rows, dtype=np.int64)
    ordered_rows: list[list[int]] = []
    step_column = None if step_index is None else integer_column(step_index, "step_index", num_rows)
    for k, rows in enumerate(rows_of):
        if step_column is not None:
            rows = sorted(rows, key=lambda r: int(step_column[r]))
            for t, r in enumerate(rows):
                if step_column[r] != t:
                    raise BuildError(
                        f"step_index[{r}]",
                        f"trajectory {traj_ids[k]!r} has {len(rows)} rows, so its step indices "
                        f"must be 0..{len(rows) - 1} once each; got {int(step_column[r])} "
                        f"where {t} was expected",
                    )
        row_step[rows] = np.arange(len(rows))
        ordered_rows.append(rows)

    messages: list[pb.Trajectory] = []
    for k, rows in enumerate(ordered_rows):
        r0 = first_row[k]
        message = pb.Trajectory(
            trajectory_id=traj_ids[k],
            group_id=_identifier(group_column[r0], f"group_ids[{r0}]"),
        )
        if task_column is not None:
            message.task_id = _identifier(task_column[r0], f"task_ids[{r0}]")
        if success_column is not None:
            message.success = bool(success_column[r0])
        _add_steps(
            message, rows, state_column, reward_column, invalid_column, key_column,
            embedding_matrix,
        )  # fmt: skip
        messages.append(message)

    bookkeeping = RowBookkeeping(
        trajectory_ids=tuple(traj_ids),
        row_trajectory=row_trajectory,
        row_step=row_step,
        num_steps=np.array([len(rows) for rows in ordered_rows], dtype=np.int64),
    )
    return messages, bookkeeping


def advantages_to_rows(
    response: pb.ComputeAdvantagesResponse,
    bookkeeping: RowBookkeeping,
    field: ResultField = "advantages",
) -> npt.NDArray[np.float64]:
    """The response's per-step ``field`` in the original row order: ``out[r]`` belongs to row r.

    Trajectories are matched by id, and each must have exactly its number of steps.
    """
    if field not in ("advantages", "episode_advantages", "step_advantages", "returns"):
        raise BuildError("field", f"unknown result field {field!r}")
    by_id = {t.trajectory_id: t for t in response.trajectories}
    flat: list[npt.NDArray[np.float64]] = []
    for k, tid in enumerate(bookkeeping.trajectory_ids):
        entry = by_id.get(tid)
        if entry is None:
            raise BuildError("response.trajectories", f"no entry for trajectory {tid!r}")
        values = np.asarray(getattr(entry, field), dtype=np.float64)
        if values.shape[0] != bookkeeping.num_steps[k]:
            raise BuildError(
                f"response.trajectories[{tid!r}].{field}",
                f"has {values.shape[0]} values, expected {int(bookkeeping.num_steps[k])}",
            )
        flat.append(values)
    offsets = np.concatenate(([0], np.cumsum(bookkeeping.num_steps)))
    result: npt.NDArray[np.float64] = np.concatenate(flat)[
        offsets[bookkeeping.row_trajectory] + bookkeeping.row_step
    ]
    return result


# ------------------------------------------------------------------- input checks


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


def _length(value: Any, where: str, expected: int | None, per: str = "step") -> int:
    if not _is_sequence(value):
        raise BuildError(where, f"expected a list or array, got {type(value).__name__}")
    n = len(value)
    if expected is not None and n != expected:
        raise BuildError(where, f"has {n} entries, expected {expected} (one per {per})")
    return n


def row_column(
    value: Any, where: str, expected: int | None = None, per: str = "step"
) -> Sequence[Any]:
    """``value`` when it is a list or 1-D array (of ``expected`` entries when given), else
    BuildError naming ``where``: the check of every per-row argument here and in
    :mod:`proxmo_client.integrations.rows`."""
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise BuildError(where, f"expected one entry per row, got shape {value.shape}")
    _length(value, where, expected, per)
    return value  # type: ignore[no-any-return]


def _identifier(value: Any, where: str) -> str:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
        raise BuildError(where, f"expected a string id, got {type(value).__name__}")
    text = str(value)
    if not text:
        raise BuildError(where, "must not be empty")
    return text


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise BuildError(where, f"expected a bool, got {value!r}")
    return bool(value)


def _finite_float(value: Any, where: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise BuildError(where, f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise BuildError(where, f"must be finite, got {number}")
    return number


def _count(value: Any, where: str) -> int:
    """A non-negative integer (an integral float such as 2.0 from YAML is accepted)."""
    number = _finite_float(value, where)
    if not number.is_integer() or number < 0 or number > 2**32 - 1:
        raise BuildError(where, f"expected a non-negative integer, got {value!r}")
    return int(number)


def _strings(value: Any, where: str, expected: int | None = None) -> list[str]:
    _length(value, where, expected)
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise BuildError(f"{where}[{i}]", f"expected a string, got {type(item).__name__}")
        out.append(str(item))
    return out


def _floats(value: Any, where: str, expected: int) -> list[float]:
    _length(value, where, expected)
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != (expected,) or np.asarray(value).dtype == np.bool_:
        for i, item in enumerate(value):  # find and name the offending entry
            _finite_float(item, f"{where}[{i}]")
        raise BuildError(where, f"expected {expected} numbers")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise BuildError(f"{where}[{bad[0]}]", f"must be finite, got {array[bad[0]]}")
    floats: list[float] = array.tolist()
    return floats


def _bools(value: Any, where: str, expected: int) -> npt.NDArray[np.bool_] | None:
    if value is None:
        return None
    _length(value, where, expected)
    array = np.asarray(value)
    if array.dtype != np.bool_:
        for i, item in enumerate(value):
            if isinstance(item, (bool, np.bool_)):
                continue
            if isinstance(item, (int, np.integer)) and item in (0, 1):
                continue
            raise BuildError(f"{where}[{i}]", f"expected a bool, got {item!r}")
        array = array.astype(np.bool_)
    return array


def integer_column(value: Any, where: str, expected: int) -> npt.NDArray[np.int64]:
    _length(value, where, expected)
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise BuildError(where, f"expected integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _matrix(value: Any, where: str, expected: int) -> npt.NDArray[np.float32] | None:
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise BuildError(where, "expected a [steps, dim] array of numbers") from None
    if array.ndim != 2 or array.shape[0] != expected or array.shape[1] == 0:
        raise BuildError(where, f"expected shape ({expected}, dim >= 1), got {array.shape}")
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        raise BuildError(f"{where}[{bad[0][0]}]", "must be finite")
    return array


def _same(column: Any, r: int, r0: int, where: str, trajectory_id: str) -> None:
    if column[r] != column[r0]:
        # .item(): show True, not np.True_
        first, here = (
            v.item() if isinstance(v, np.generic) else v for v in (column[r0], column[r])
        )
        raise BuildError(
            f"{where}[{r}]",
            f"trajectory {trajectory_id!r} has {first!r} at row {r0} but {here!r} here",
        )
