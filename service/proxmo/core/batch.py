"""The validated, columnar step batch every estimator works on.

Rows are step rows in request order, trajectory-major: the rows of trajectory i are
traj_offsets[i]:traj_offsets[i+1]. Groups are numbered by first appearance.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# |r_t| <= MAX_ABS_REWARD keeps every output finite (docs/algorithm.md section 5a). With gamma <= 1
# a return is at most T * 1e15 in size (plus the penalty, <= 1e15); for T = 1000 steps that is
# 1e18. The largest intermediate is a group's sum of squared deviations, n * (2 * T * 1e15)^2:
# for n = 4096 trajectories of 1000 steps 1.6e40, and even for a billion rows of a billion steps
# (far beyond any configurable limit) 4e57, against float64's 1.8e308. z-scores are at most
# 2 * 1e18 / 1e-6, PSA's baseline is a convex combination of returns, PSC weights are within
# [0, 2] and step_weight <= 1e6 (config.py), so the combined advantage stays far below the
# overflow threshold too. 1e15 is also about where float64 stops resolving a unit reward.
MAX_ABS_REWARD = 1e15
# |x| <= MAX_ABS_EMBEDDING per value of a state_embedding: the squared norm of a 4096-value
# vector stays below 4e33 (an unbounded 1e200 would overflow |x| to inf and silently zero it).
MAX_ABS_EMBEDDING = 1e15


class ValidationError(ValueError):
    """Bad input, naming the offending field: str(e) == f"{field}: {message}"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


ECHO_CHARS = 64


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters: user input is
    echoed so that the user can find it, never whole (a 7,000-character value would overflow
    the status metadata and fill the logs)."""
    return cut(repr(value), limit)


def cut(text: str, limit: int) -> str:
    """``text`` if at most ``limit`` characters, else its start and its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class TrajectoryInput:
    """One rollout as plain Python (what convert.py builds from protobuf).

    Per-step sequences are parallel and as long as `states`. `task_id` "" means `group_id`.
    `state_keys`: "" for a step means "use the state text". `embeddings`: an empty vector for a
    step means "no embedding".
    """

    trajectory_id: str
    group_id: str
    task_id: str
    states: Sequence[str]
    rewards: Sequence[float]
    invalid: Sequence[bool]
    state_keys: Sequence[str] | None = None
    embeddings: Sequence[Sequence[float]] | None = None
    success: bool | None = None


@dataclass(frozen=True)
class StepBatch:
    """A validated batch in columns (all float arrays float64)."""

    rewards: np.ndarray  # float64[n_rows]
    invalid: np.ndarray  # bool[n_rows]
    row_traj: np.ndarray  # int64[n_rows] trajectory index of each row
    row_t: np.ndarray  # int64[n_rows] step index within its trajectory (0-based)
    traj_offsets: np.ndarray  # int64[n_traj + 1]
    traj_group: np.ndarray  # int64[n_traj] group index, groups numbered by first appearance
    success: np.ndarray  # int8[n_traj]: 1 success, 0 failure, -1 not given (use threshold)
    group_ids: tuple[str, ...]  # [n_groups]
    group_task: tuple[str, ...]  # [n_groups] task id of each group
    trajectory_ids: tuple[str, ...]  # [n_traj]
    row_state: np.ndarray  # int64[n_rows] index into `states`
    states: tuple[str, ...]  # distinct state texts, by first appearance
    row_key: np.ndarray  # int64[n_rows] exact identity (state_key if set, else the state text)
    embeddings: np.ndarray | None  # float64[n_rows, d] when every step carries one
    # bool[n_rows]: which steps carry an embedding (so PRECOMPUTED can name a missing one)
    row_has_embedding: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def n_traj(self) -> int:
        return int(self.traj_group.shape[0])

    @property
    def n_groups(self) -> int:
        return len(self.group_ids)

    @property
    def traj_lengths(self) -> np.ndarray:
        """int64[n_traj]: steps per trajectory."""
        return np.diff(self.traj_offsets)

    @property
    def row_group(self) -> np.ndarray:
        """int64[n_rows]: group index of each row."""
        groups: np.ndarray = self.traj_group[self.row_traj]
        return groups

    def row_field(self, row: int, name: str) -> str:
        """The request field of one step row, e.g. 'trajectories[3].steps[7].reward'."""
        return f"trajectories[{int(self.row_traj[row])}].steps[{int(self.row_t[row])}].{name}"

    @staticmethod
    def from_trajectories(trajs: Sequence[TrajectoryInput]) -> StepBatch:
        """Validate and columnize. Raises ValidationError naming the first bad field.

        Checks: at least one trajectory; non-empty, unique trajectory_id; non-empty group_id;
        one task_id per group; at least one step; per-step sequences as long as `states`;
        rewards finite and within +-MAX_ABS_REWARD; embeddings finite, within
        +-MAX_ABS_EMBEDDING and all of one size.
        """
        return _build_columns(trajs, _validate(trajs))


@dataclass(frozen=True)
class _Validated:
    """What validation learnt on the way: the group table and the per-step values it had to
    convert to check them."""

    traj_group: list[int]  # [n_traj] group index, groups numbered by first appearance
    group_ids: tuple[str, ...]
    group_task: tuple[str, ...]
    rewards: np.ndarray  # float64[n_rows]
    invalid: list[np.ndarray]  # bool[T_i] per trajectory
    embeddings: list[np.ndarray | None]  # float64[T_i, d] (zero rows where absent) or None
    has_embedding: list[np.ndarray | None]  # bool[T_i], None where no step carries one


def _validate(trajs: Sequence[TrajectoryInput]) -> _Validated:
    """Checks every field, trajectory by trajectory, so that the first bad one is named.

    Reward values are checked in one pass over all rows at the end (not one numpy call per
    trajectory); an error found before then gives way to a bad reward earlier in the request,
    the one a step-by-step check would have met first.
    """
    if len(trajs) == 0:
        raise ValidationError("trajectories", "at least one trajectory is required")
    first_index: dict[str, int] = {}
    groups: dict[str, tuple[int, str, int]] = {}  # group_id -> (index, task, first trajectory)
    traj_group: list[int] = []
    rewards: list[np.ndarray] = []
    invalid: list[np.ndarray] = []
    embeddings: list[np.ndarray | None] = []
    has_embedding: list[np.ndarray | None] = []
    embedding_size: tuple[int, str] | None = None  # (size, the step that set it)
    try:
        for i, traj in enumerate(trajs):
            where = f"trajectories[{i}]"
            _check_trajectory_id(traj.trajectory_id, where, first_index, i)
            traj_group.append(_group_of(traj, where, groups, i))
            n_steps = _check_lengths(traj, where)
            rewards.append(_as_float_array(traj.rewards, f"{where}.steps[0].reward"))
            invalid.append(np.asarray(traj.invalid, dtype=bool).reshape(n_steps))
            block, present = None, None
            if traj.embeddings is not None:
                block, present = _embedding_block(traj.embeddings, where)
                if present.any():
                    embedding_size = _check_embeddings(block, present, where, embedding_size)
                else:
                    block, present = None, None
            embeddings.append(block)
            has_embedding.append(present)
    except Exception:
        if rewards and (earlier := _reward_error(np.concatenate(rewards), rewards)) is not None:
            raise earlier from None
        raise
    all_rewards = np.concatenate(rewards)
    if (error := _reward_error(all_rewards, rewards)) is not None:
        raise error
    return _Validated(
        traj_group=traj_group,
        group_ids=tuple(groups),
        group_task=tuple(task for _, task, _ in groups.values()),
        rewards=all_rewards,
        invalid=invalid,
        embeddings=embeddings,
        has_embedding=has_embedding,
    )


def _build_columns(trajs: Sequence[TrajectoryInput], checked: _Validated) -> StepBatch:
    """The columns of a validated batch (raises nothing)."""
    n_traj = len(trajs)
    lengths = np.fromiter((len(t.states) for t in trajs), dtype=np.int64, count=n_traj)
    offsets = np.zeros(n_traj + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n_rows = int(offsets[-1])
    row_traj = np.repeat(np.arange(n_traj, dtype=np.int64), lengths)
    row_t = np.arange(n_rows, dtype=np.int64) - offsets[row_traj]

    texts = list(itertools.chain.from_iterable(t.states for t in trajs))
    state_ids = {text: k for k, text in enumerate(dict.fromkeys(texts))}
    row_state = np.fromiter(map(state_ids.__getitem__, texts), dtype=np.int64, count=n_rows)

    has_embedding = np.zeros(n_rows, dtype=bool)
    for i, present in enumerate(checked.has_embedding):
        if present is not None:
            has_embedding[offsets[i] : offsets[i + 1]] = present
    embeddings: np.ndarray | None = None
    if bool(has_embedding.all()):
        # every part is present here, so each is a full [T_i, d] block
        embeddings = np.concatenate([b for b in checked.embeddings if b is not None])

    return StepBatch(
        rewards=checked.rewards,
        invalid=np.concatenate(checked.invalid),
        row_traj=row_traj,
        row_t=row_t,
        traj_offsets=offsets,
        traj_group=np.asarray(checked.traj_group, dtype=np.int64),
        success=np.fromiter(
            (-1 if t.success is None else int(bool(t.success)) for t in trajs),
            dtype=np.int8,
            count=n_traj,
        ),
        group_ids=checked.group_ids,
        group_task=checked.group_task,
        trajectory_ids=tuple(t.trajectory_id for t in trajs),
        row_state=row_state,
        states=tuple(state_ids),
        row_key=_row_keys(trajs, row_state, len(state_ids)),
        embeddings=embeddings,
        row_has_embedding=has_embedding,
    )


def _row_keys(trajs: Sequence[TrajectoryInput], row_state: np.ndarray, n_states: int) -> np.ndarray:
    """Exact-identity ids: the state id for rows without a state_key, n_states + key id (keys
    numbered by first appearance) for rows with one."""
    if all(t.state_keys is None for t in trajs):
        return row_state.copy()
    keys = list(itertools.chain.from_iterable(
        itertools.repeat("", len(t.states)) if t.state_keys is None else t.state_keys
        for t in trajs
    ))  # fmt: skip
    key_ids = {key: k for k, key in enumerate(dict.fromkeys(key for key in keys if key))}
    key_id = np.fromiter(
        map(key_ids.get, keys, itertools.repeat(-1)), dtype=np.int64, count=len(keys)
    )
    keyed: np.ndarray = np.where(key_id >= 0, n_states + key_id, row_state)
    return keyed


def _check_trajectory_id(tid: str, where: str, first_index: dict[str, int], i: int) -> None:
    if not tid:
        raise ValidationError(f"{where}.trajectory_id", "must not be empty")
    if tid in first_index:
        raise ValidationError(
            f"{where}.trajectory_id",
            f"duplicate {echo(tid)} (also trajectories[{first_index[tid]}])",
        )
    first_index[tid] = i


def _group_of(
    traj: TrajectoryInput, where: str, groups: dict[str, tuple[int, str, int]], i: int
) -> int:
    """The trajectory's group index (a new group is numbered next); one task_id per group."""
    if not traj.group_id:
        raise ValidationError(f"{where}.group_id", "must not be empty")
    task = traj.task_id or traj.group_id
    known = groups.get(traj.group_id)
    if known is None:
        groups[traj.group_id] = (len(groups), task, i)
        return len(groups) - 1
    g, group_task, first = known
    if group_task != task:
        raise ValidationError(
            f"{where}.task_id",
            f"group {echo(traj.group_id)} has task_id {echo(group_task)} "
            f"(trajectories[{first}]), got {echo(task)}",
        )
    return g


def _check_lengths(traj: TrajectoryInput, where: str) -> int:
    """The number of steps: at least one, and every per-step sequence that long."""
    n_steps = len(traj.states)
    if n_steps == 0:
        raise ValidationError(f"{where}.steps", "a trajectory needs at least one step")
    _check_length(f"{where}.rewards", traj.rewards, n_steps)
    _check_length(f"{where}.invalid", traj.invalid, n_steps)
    if traj.state_keys is not None:
        _check_length(f"{where}.state_keys", traj.state_keys, n_steps)
    if traj.embeddings is not None:
        _check_length(f"{where}.embeddings", traj.embeddings, n_steps)
    return n_steps


def _check_length(field: str, values: Sequence[object], n_steps: int) -> None:
    if len(values) != n_steps:
        raise ValidationError(field, f"has {len(values)} values for {n_steps} steps")


def _reward_error(rewards: np.ndarray, parts: list[np.ndarray]) -> ValidationError | None:
    """The error naming the first reward that is not finite or beyond +-MAX_ABS_REWARD, if any
    (``rewards``: the concatenation of ``parts``, the trajectories' rewards in request order)."""
    bad = np.flatnonzero(~(np.abs(rewards) <= MAX_ABS_REWARD))  # NaN compares False
    if bad.size == 0:
        return None
    row = int(bad[0])
    ends = np.cumsum([len(p) for p in parts])
    i = int(np.searchsorted(ends, row, side="right"))
    t = row - (int(ends[i - 1]) if i else 0)
    value = rewards[row]
    reason = f"must be within +-{MAX_ABS_REWARD:g}" if np.isfinite(value) else "must be finite"
    return ValidationError(f"trajectories[{i}].steps[{t}].reward", f"{reason}, got {value}")


def _as_float_array(values: Sequence[float], field: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64).reshape(len(values))
    except (TypeError, ValueError) as exc:
        raise ValidationError(field, f"must be numbers ({exc})") from None


def _check_embeddings(
    block: np.ndarray, present: np.ndarray, where: str, size: tuple[int, str] | None
) -> tuple[int, str]:
    """One trajectory's embeddings (some present): the batch's size, finite, in range.

    Returns the batch's (size, the step that set it)."""
    t0 = int(np.flatnonzero(present)[0])
    if size is None:
        size = (block.shape[1], f"{where}.steps[{t0}]")
    elif block.shape[1] != size[0]:
        raise ValidationError(
            f"{where}.steps[{t0}].state_embedding",
            f"has size {block.shape[1]}, expected {size[0]} "
            f"(the size of {size[1]}.state_embedding)",
        )
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        t = int(np.flatnonzero(~finite)[0])
        raise ValidationError(
            f"{where}.steps[{t}].state_embedding", "must be finite (found nan or inf)"
        )
    in_range = (np.abs(block) <= MAX_ABS_EMBEDDING).all(axis=1)
    if not in_range.all():
        t = int(np.flatnonzero(~in_range)[0])
        raise ValidationError(
            f"{where}.steps[{t}].state_embedding",
            f"values must be within +-{MAX_ABS_EMBEDDING:g}, got {float(np.abs(block[t]).max())}",
        )
    return size


def _embedding_block(
    embeddings: Sequence[Sequence[float]], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """A trajectory's embeddings as float64[T, d] (zero rows where absent) and bool[T] present.

    Raises ValidationError when the present vectors of this trajectory differ in size.
    """
    try:  # fast path: a rectangular block (numpy array or equal-length lists)
        block = np.asarray(embeddings, dtype=np.float64)
        if block.ndim == 2 and block.shape[1] > 0:
            return block, np.ones(block.shape[0], dtype=bool)
    except (TypeError, ValueError):
        pass
    vectors: list[np.ndarray] = []
    dim: int | None = None
    first = -1
    for t, vec in enumerate(embeddings):
        field = f"{where}.steps[{t}].state_embedding"
        try:
            arr = np.asarray(vec, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValidationError(field, f"must be numbers ({exc})") from None
        if arr.ndim != 1:
            raise ValidationError(field, f"must be a vector, got shape {arr.shape}")
        if arr.shape[0] > 0:
            if dim is None:
                dim, first = arr.shape[0], t
            elif arr.shape[0] != dim:
                raise ValidationError(
                    field,
                    f"has size {arr.shape[0]}, expected {dim} "
                    f"(the size of {where}.steps[{first}].state_embedding)",
                )
        vectors.append(arr)
    present = np.asarray([v.shape[0] > 0 for v in vectors], dtype=bool)
    block = np.zeros((len(vectors), dim or 0), dtype=np.float64)
    for t, arr in enumerate(vectors):
        if arr.shape[0] > 0:
            block[t] = arr
    return block, present
