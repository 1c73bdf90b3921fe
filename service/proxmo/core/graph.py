"""GraphGPO step returns: distance to success on a per-group state graph (docs/algorithm.md 4a).

Per group, a directed graph over its distinct states (exact identity: `state_key` when given,
else the state text): an edge s_t -> next_t for every row, where next_t = s_{t+1}, and for a
trajectory's last step a single SUCCESS node of the group when the trajectory succeeded, else a
dead-end node of its own. d(v) = fewest edges from v to SUCCESS (d(SUCCESS) = 0); a node that
cannot reach SUCCESS gets (largest finite d of its group) + 1, so a group without a success has
d = 1 everywhere. Step returns:

    G_t = c * gamma^d(next_t)                       (distances not normalized)
    G_t = c * gamma^(d(next_t) - d(s_t) + 1)        (normalized)

with c = `graph_success_value`, then G_t -= lambda * v_t. The exponent is never negative
(d(s_t) <= d(next_t) + 1 along the edge), so G_t stays within [0, c] before the penalty.

All groups' graphs form one block-diagonal sparse graph; one breadth-first search (scipy's
csgraph, unweighted) from a virtual root joined to every group's SUCCESS node, over the reversed
edges, gives every node its distance: O(rows log rows) time, O(rows) memory, no Python loop
over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import shortest_path

from proxmo.core.batch import StepBatch


@dataclass(frozen=True)
class GraphReturns:
    """GraphGPO returns per row and the per-group distance diagnostics."""

    returns: np.ndarray  # float64[n_rows]: G_t after the invalid-action penalty
    mean_distance: np.ndarray  # float64[n_groups]: mean d over states that reach SUCCESS
    unreachable_fraction: np.ndarray  # float64[n_groups]: states that cannot reach SUCCESS


def _distances(
    batch: StepBatch, success: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """d(s_t) and d(next_t) per row (unreachable: the group's largest finite d + 1), then per
    distinct state its group and its raw distance (inf when it cannot reach SUCCESS)."""
    n_rows, n_groups = batch.n_rows, batch.n_groups
    row_group = batch.row_group
    n_keys = int(batch.row_key.max()) + 1
    state_keys, state_node = np.unique(row_group * n_keys + batch.row_key, return_inverse=True)
    state_node = state_node.reshape(-1)
    n_states = state_keys.shape[0]
    # Node numbering: distinct states, then one SUCCESS per group, then one dead end per
    # trajectory (only failed trajectories' dead ends get an edge), then the virtual root.
    success_node = n_states + np.arange(n_groups)
    dead_end = n_states + n_groups + np.arange(batch.n_traj)
    root = n_states + n_groups + batch.n_traj
    node_group = np.concatenate(
        [state_keys // n_keys, np.arange(n_groups), batch.traj_group, [-1]]
    ).astype(np.int64)

    last = batch.row_t == batch.traj_lengths[batch.row_traj] - 1
    following = np.minimum(np.arange(n_rows) + 1, n_rows - 1)
    terminal = np.where(
        success[batch.row_traj], success_node[row_group], dead_end[batch.row_traj]
    )
    next_node = np.where(last, terminal, state_node[following])

    # Reversed edges (next -> state), plus root -> every SUCCESS node.
    sources = np.concatenate([next_node, np.full(n_groups, root)])
    targets = np.concatenate([state_node, success_node])
    n_nodes = root + 1
    reversed_graph = sp.csr_matrix(
        (np.ones(sources.shape[0]), (sources, targets)), shape=(n_nodes, n_nodes)
    )
    from_root = shortest_path(reversed_graph, directed=True, unweighted=True, indices=root)
    distance = np.asarray(from_root, dtype=np.float64) - 1.0  # SUCCESS at 0
    finite = np.isfinite(distance[:-1])
    farthest = np.zeros(n_groups)  # SUCCESS itself is at 0 even in a group without success
    np.maximum.at(farthest, node_group[:-1][finite], distance[:-1][finite])
    filled = np.where(np.isfinite(distance), distance, farthest[node_group] + 1.0)
    return filled[state_node], filled[next_node], state_keys // n_keys, distance[:n_states]


def graph_returns(
    batch: StepBatch,
    success: np.ndarray,
    *,
    gamma: float,
    success_value: float,
    normalize_distance: bool,
    invalid_action_penalty: float,
) -> GraphReturns:
    """GraphGPO's G_t per row (module docstring) and per-group distance diagnostics.

    `success`: bool[n_traj], each trajectory's outcome y_i. The diagnostics count each distinct
    state of a group once: the mean of d over those that can reach SUCCESS (0 when none can)
    and the fraction that cannot.
    """
    state_distance, next_distance, state_group, raw = _distances(batch, success)
    exponent = next_distance - state_distance + 1.0 if normalize_distance else next_distance
    returns = success_value * np.power(gamma, exponent) - invalid_action_penalty * batch.invalid
    n_groups = batch.n_groups
    reachable = np.isfinite(raw)
    states = np.bincount(state_group, minlength=n_groups).astype(np.float64)
    reached = np.bincount(state_group, weights=reachable, minlength=n_groups)
    distance_sum = np.bincount(
        state_group, weights=np.where(reachable, raw, 0.0), minlength=n_groups
    )
    return GraphReturns(
        returns=returns,
        mean_distance=distance_sum / np.maximum(reached, 1.0),
        unreachable_fraction=(states - reached) / states,
    )
