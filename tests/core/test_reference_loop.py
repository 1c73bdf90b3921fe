"""The vectorized core against a slow, obviously-correct row-by-row loop (written here).

The reference follows docs/algorithm.md literally: a Python loop per row over its candidates, the
softmax over rows (not distinct states), sklearn's TfidfVectorizer on every row's text, and
plain statistics per group. Random batches of every preset and of random overrides must agree
to 1e-9.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from proxmo.core import (
    PRESETS,
    EstimatorConfig,
    Similarity,
    StepBatch,
    TrajectoryInput,
    compute_advantages,
    resolve_config,
)
from sklearn.feature_extraction.text import TfidfVectorizer

from .helpers import features_for, state_embeddings

WORDS = ["cabinet", "fridge", "apple", "open", "closed", "arrive", "see", "soapbar", "knife", "you"]


def random_batch(rng: np.random.Generator, *, embeddings: bool = True) -> list[TrajectoryInput]:
    """2-4 groups of 1-5 trajectories, 1-6 steps, states repeating within and across groups."""
    pool = [
        " ".join(rng.choice(WORDS, size=int(rng.integers(0, 6)))) + f" {int(rng.integers(3))}"
        for _ in range(10)
    ]
    vectors = {text: rng.normal(size=4) for text in pool}
    trajs: list[TrajectoryInput] = []
    for g in range(int(rng.integers(2, 5))):
        local = list(rng.choice(pool, size=4, replace=False))
        use_keys = bool(rng.random() < 0.3)
        for k in range(int(rng.integers(1, 6))):
            n = int(rng.integers(1, 7))
            states = [str(s) for s in rng.choice(local, size=n)]
            rewards = [0.0] * n
            rewards[-1] = float(rng.choice([0.0, 1.0, 10.0]))
            if rng.random() < 0.3:
                rewards = [float(x) for x in rng.normal(size=n)]
            keys = [s[:3] if rng.random() < 0.5 else "" for s in states] if use_keys else None
            trajs.append(
                TrajectoryInput(
                    trajectory_id=f"g{g}-{k}",
                    group_id=f"g{g}",
                    task_id=f"task{g % 2}",
                    states=states,
                    rewards=rewards,
                    invalid=[bool(rng.random() < 0.2) for _ in range(n)],
                    state_keys=keys,
                    embeddings=[list(vectors[s]) for s in states] if embeddings else None,
                    success=None if rng.random() < 0.7 else bool(rng.random() < 0.5),
                )
            )
    order = rng.permutation(len(trajs))
    return [trajs[i] for i in order]


# --- the reference ------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if len(values) == 1:
        return 0.0, 1.0
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _graph_returns(rows: list[dict[str, Any]], cfg: EstimatorConfig) -> dict[str, list[float]]:
    """GraphGPO (section 4a): replace every row's G by c * gamma^d(next) (or the normalized
    exponent) minus the penalty, d by breadth-first search per group; per group the mean d over
    its states that reach SUCCESS and the share that do not."""
    diagnostics: dict[str, list[float]] = {"mean": [], "unreachable": []}
    for g in dict.fromkeys(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == g]
        edges: list[tuple[Any, Any]] = []
        for r in members:
            following = [q for q in members if q["traj"] == r["traj"] and q["t"] == r["t"] + 1]
            if following:
                r["next"] = following[0]["key"]
            else:
                r["next"] = "SUCCESS" if r["y"] else ("dead end", r["traj"])
            edges.append((r["key"], r["next"]))
        distance: dict[Any, float] = {"SUCCESS": 0.0}
        frontier = ["SUCCESS"]
        while frontier:
            reached = []
            for node in frontier:
                for source, target in edges:
                    if target == node and source not in distance:
                        distance[source] = distance[node] + 1
                        reached.append(source)
            frontier = reached
        states = {r["key"] for r in members}
        far = max(distance.values())
        finite = [distance[s] for s in states if s in distance]
        diagnostics["mean"].append(sum(finite) / len(finite) if finite else 0.0)
        diagnostics["unreachable"].append(1.0 - len(finite) / len(states))
        for r in members:
            d_next = distance.get(r["next"], far + 1)
            d_state = distance.get(r["key"], far + 1)
            power = d_next - d_state + 1 if cfg.graph_normalize_distance else d_next
            r["G"] = cfg.graph_success_value * cfg.gamma**power - cfg.invalid_action_penalty * r[
                "invalid"
            ]
    return diagnostics


def _hgpo_step(
    rows: list[dict[str, Any]], cfg: EstimatorConfig, base: list[float]
) -> tuple[list[float], list[bool]]:
    """HGPO (section 4a): per row, the (k + 1)^alpha-weighted mean of its nonzero values over
    its history keys (k = 1 .. K + 1, >= 2 rows each, population std), the base item at k = 0.
    Also whether a nonzero item came from k >= 2."""
    by_step = {(r["traj"], r["t"]): r for r in rows}
    keys: dict[Any, list[int]] = {}
    row_keys: list[list[tuple[int, Any]]] = []
    for i, r in enumerate(rows):
        mine = []
        for k in range(1, min(cfg.hgpo_history_length + 1, r["t"] + 1) + 1):
            history = tuple(by_step[(r["traj"], r["t"] - j)]["key"] for j in range(k - 1, -1, -1))
            key = (r["group"], history)
            keys.setdefault(key, []).append(i)
            mine.append((k, key))
        row_keys.append(mine)
    step, long_history = [], []
    for i, r in enumerate(rows):
        items = [(0, base[i])] if cfg.hgpo_base_group else []
        for k, key in row_keys[i]:
            gs = [rows[j]["G"] for j in keys[key]]
            if len(gs) < 2:
                continue
            # equal returns have exactly their value as mean (not a rounded sum / n): value 0
            mean = gs[0] if len(set(gs)) == 1 else sum(gs) / len(gs)
            value = r["G"] - mean
            if cfg.step_normalization.value == "MEAN_STD":
                value /= math.sqrt(sum((v - mean) ** 2 for v in gs) / len(gs)) + 1e-6
            items.append((k, value))
        items = [(k, v) for k, v in items if v != 0.0]
        weights = [(k + 1) ** cfg.hgpo_alpha for k, _ in items]
        total = sum(weights) + 1e-6
        step.append(sum(w / total * v for w, (_, v) in zip(weights, items, strict=True)))
        long_history.append(any(k >= 2 for k, _ in items))
    return step, long_history


def reference(
    trajs: Sequence[TrajectoryInput],
    cfg: EstimatorConfig,
    state_vectors: dict[str, np.ndarray] | None,
    group_rates: dict[str, float] | None,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    group_order: list[str] = []
    for i, tr in enumerate(trajs):
        if tr.group_id not in group_order:
            group_order.append(tr.group_id)
        big_r = sum(tr.rewards)
        y = tr.success if tr.success is not None else big_r > cfg.success_threshold
        running = 0.0
        returns = [0.0] * len(tr.states)
        for t in reversed(range(len(tr.states))):
            running = tr.rewards[t] + cfg.gamma * running
            returns[t] = running
        for t, state in enumerate(tr.states):
            key = ("k", tr.state_keys[t]) if tr.state_keys and tr.state_keys[t] else ("s", state)
            rows.append(
                {
                    "traj": i,
                    "t": t,
                    "group": tr.group_id,
                    "state": state,
                    "key": key,
                    "G": returns[t] - cfg.invalid_action_penalty * tr.invalid[t],
                    "R": big_r,
                    "y": bool(y),
                    "score": big_r - cfg.invalid_action_penalty * tr.invalid[t],
                    "emb": None if tr.embeddings is None else np.asarray(tr.embeddings[t], float),
                    "invalid": tr.invalid[t],
                }
            )
    n = len(rows)
    estimator = cfg.estimator.value
    graph = _graph_returns(rows, cfg) if estimator == "GRAPHGPO" else None
    psc = cfg.psc_enabled and estimator in ("PROXMO", "GIGPO")

    # episode term
    episode = [0.0] * n
    p_used: dict[str, float] = {}
    for g in group_order:
        members = [r for r in range(n) if rows[r]["group"] == g]
        trajs_g = sorted({rows[r]["traj"] for r in members})
        if cfg.stats_unit.value == "TRAJECTORY":
            units = [(tj, sum(trajs[tj].rewards)) for tj in trajs_g]
            value_of = {tj: x for tj, x in units}
            xs = [x for _, x in units]
            per_row = [value_of[rows[r]["traj"]] for r in members]
        else:
            xs = [rows[r]["score"] for r in members]
            per_row = xs
        mean, std = _mean_std(xs)
        for r, x in zip(members, per_row, strict=True):
            if estimator == "RLOO":
                others = [v for v in xs]
                others.remove(x)
                a = x - sum(others) / len(others) if others else x
            elif cfg.episode_normalization.value == "MEAN":
                a = x - mean
            else:
                a = (x - mean) / (std + 1e-6)
            episode[r] = a
        successes = sum(
            1 for tj in trajs_g if rows[[r for r in members if rows[r]["traj"] == tj][0]]["y"]
        )
        batch_p = successes / len(trajs_g)
        p_used[g] = batch_p
        if psc:
            source = cfg.success_rate_source.value
            if source == "ROW_MEAN":
                # mu_g of the row scores, 0 for a single row (the released code's convention)
                row_mean = sum(rows[r]["score"] for r in members) / len(members)
                p = min(max(row_mean if len(members) > 1 else 0.0, 0.0), 1.0)
            elif source == "HISTORY" and group_rates is not None:
                p = group_rates[g]
            else:
                p = batch_p
            p_used[g] = p
            w_plus = 1 + cfg.psc_beta * (_sigmoid((1 - p) ** cfg.psc_alpha) - 0.5)
            w_minus = 1 + cfg.psc_beta * (_sigmoid(-(p**cfg.psc_alpha)) - 0.5)
            for r in members:
                ok = rows[r]["score"] > 0.5 if source == "ROW_MEAN" else rows[r]["y"]
                episode[r] *= w_plus if ok else w_minus

    # step term
    step = [0.0] * n
    effective = [0.0] * n
    same_step = cfg.scope.value == "SAME_STEP"

    def candidates(i: int) -> list[int]:
        return [
            j
            for j in range(n)
            if rows[j]["group"] == rows[i]["group"]
            and (not same_step or rows[j]["t"] == rows[i]["t"])
        ]

    anchored = ("GIGPO", "GRAPHGPO", "HGPO")
    exact = estimator in anchored or (estimator == "PROXMO" and cfg.similarity.value == "EXACT")
    if exact:
        for i in range(n):
            anchor = [j for j in candidates(i) if rows[j]["key"] == rows[i]["key"]]
            gs = [rows[j]["G"] for j in anchor]
            mean = sum(gs) / len(gs)
            effective[i] = float(len(anchor))
            if len(anchor) == 1:
                continue
            if estimator in anchored and cfg.step_normalization.value == "MEAN_STD":
                std = _mean_std(gs)[1]
                step[i] = (rows[i]["G"] - mean) / (std + 1e-6)
            else:
                step[i] = rows[i]["G"] - mean
    elif estimator == "PROXMO":
        sim = cfg.similarity.value
        x: list[np.ndarray] | None
        if sim == "TFIDF":
            try:
                m = TfidfVectorizer(max_features=1024).fit_transform([r["state"] for r in rows])
                dense = m.toarray()
                dense = dense / (np.linalg.norm(dense, axis=1, keepdims=True) + 1e-8)
                x = list(dense)
            except ValueError:
                x = None
        elif sim == "ENCODER":
            assert state_vectors is not None
            x = [_unit(state_vectors[r["state"]]) for r in rows]
        else:
            x = [_unit(r["emb"]) for r in rows]
        if x is not None:
            for i in range(n):
                cand = candidates(i)
                logits = [float(x[i] @ x[j]) / cfg.tau for j in cand]
                top = max(logits)
                w = [math.exp(v - top) for v in logits]
                total = sum(w)
                w = [v / total for v in w]
                step[i] = rows[i]["G"] - sum(
                    wj * rows[j]["G"] for wj, j in zip(w, cand, strict=True)
                )
                effective[i] = 1.0 / sum(v * v for v in w)

    long_history = [False] * n
    if estimator == "HGPO":
        # no episode term; GiGPO's per-row episode value is the optional k = 0 item
        base = []
        for i in range(n):
            xs = [rows[r]["score"] for r in range(n) if rows[r]["group"] == rows[i]["group"]]
            mean, std = _mean_std(xs)
            normalized = cfg.step_normalization.value == "MEAN_STD"
            base.append((rows[i]["score"] - mean) / (std + 1e-6 if normalized else 1.0))
        step, long_history = _hgpo_step(rows, cfg, base)
        episode = [0.0] * n
        # HGPO's keys ignore `scope`: the anchor size is the row's k = 1 key's
        effective = [
            float(sum(1 for q in rows if q["group"] == r["group"] and q["key"] == r["key"]))
            for r in rows
        ]

    # diagnostics
    singles = []
    for g in group_order:
        members = [r for r in range(n) if rows[r]["group"] == g]
        single = [sum(1 for j in members if rows[j]["key"] == rows[i]["key"]) == 1 for i in members]
        singles.append(sum(single) / len(members))
    mean_eff = [
        float(np.mean([effective[r] for r in range(n) if rows[r]["group"] == g]))
        for g in group_order
    ]
    return {
        "returns": np.array([r["G"] for r in rows]),
        "episode": np.array(episode),
        "step": np.array(step),
        "advantages": cfg.episode_weight * np.array(episode) + cfg.step_weight * np.array(step),
        "success_rate": np.array([p_used[g] for g in group_order]),
        "singleton_fraction": np.array(singles),
        "mean_effective_neighbors": np.array(mean_eff),
        "hgpo_long_history_fraction": np.array(
            [
                np.mean([long_history[r] for r in range(n) if rows[r]["group"] == g])
                for g in group_order
            ]
        ),
        "graph_mean_distance": np.array(graph["mean"] if graph else [0.0] * len(group_order)),
        "graph_unreachable_fraction": np.array(
            graph["unreachable"] if graph else [0.0] * len(group_order)
        ),
    }


# --- the comparison -------------------------------------------------------------------------------

OPTION_POOLS: dict[str, list[Any]] = {
    "scope": ["GROUP", "SAME_STEP"],
    "stats_unit": ["TRAJECTORY", "STEP"],
    "episode_normalization": ["MEAN", "MEAN_STD"],
    "step_normalization": ["MEAN", "MEAN_STD"],
    "success_rate_source": ["BATCH", "ROW_MEAN", "HISTORY"],
    "psc_enabled": [True, False],
    "tau": [0.05, 0.1, 0.7],
    "gamma": [0.0, 0.9, 1.0],
    "step_weight": [0.5, 1.0],
    "episode_weight": [0.0, 0.5, 1.0],
    "hgpo_history_length": [0, 1, 3],
    "hgpo_alpha": [-1.0, 0.0, 2.0],
    "hgpo_base_group": [True, False],
    "graph_normalize_distance": [True, False],
    "graph_success_value": [1.0, 10.0],
}


def _random_overrides(rng: np.random.Generator, preset: str) -> dict[str, Any]:
    chosen: dict[str, Any] = {}
    for name, pool in OPTION_POOLS.items():
        if rng.random() < 0.4:
            chosen[name] = pool[int(rng.integers(len(pool)))]
    if preset in ("proxmo", "paper", "proxmo-rl") and rng.random() < 0.5:
        chosen["similarity"] = str(rng.choice(["TFIDF", "ENCODER", "EXACT", "PRECOMPUTED"]))
    return chosen


def _compare(trajs: list[TrajectoryInput], cfg: EstimatorConfig, rng: np.random.Generator) -> None:
    batch = StepBatch.from_trajectories(trajs)
    rates = None
    if rng.random() < 0.5:
        rates = rng.random(batch.n_groups)
    features = features_for(batch, cfg, seed=3)
    result = compute_advantages(batch, cfg, features=features, group_success_rate=rates)
    vectors = dict(zip(batch.states, state_embeddings(batch, seed=3), strict=True))
    rate_map = None if rates is None else dict(zip(batch.group_ids, rates.tolist(), strict=True))
    expected = reference(trajs, cfg, vectors, rate_map)
    tol = {"rtol": 0, "atol": 1e-9}
    np.testing.assert_allclose(result.returns, expected["returns"], **tol)
    np.testing.assert_allclose(result.episode_advantages, expected["episode"], **tol)
    np.testing.assert_allclose(result.step_advantages, expected["step"], **tol)
    np.testing.assert_allclose(result.advantages, expected["advantages"], **tol)
    groups = result.groups
    np.testing.assert_allclose(groups.success_rate, expected["success_rate"], **tol)
    np.testing.assert_allclose(groups.singleton_fraction, expected["singleton_fraction"], **tol)
    np.testing.assert_allclose(
        groups.mean_effective_neighbors, expected["mean_effective_neighbors"], rtol=1e-9, atol=1e-9
    )
    for name in ("hgpo_long_history_fraction", "graph_mean_distance", "graph_unreachable_fraction"):
        np.testing.assert_allclose(getattr(groups, name), expected[name], **tol)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("seed", range(4))
def test_presets_match_reference(preset: str, seed: int) -> None:
    rng = np.random.default_rng(1000 * seed + sum(map(ord, preset)))
    for default_similarity in (Similarity.TFIDF, Similarity.ENCODER):
        cfg = resolve_config(preset, default_similarity=default_similarity)
        _compare(random_batch(rng), cfg, rng)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("seed", range(10))
def test_random_overrides_match_reference(preset: str, seed: int) -> None:
    rng = np.random.default_rng(7919 * seed + sum(map(ord, preset)))
    overrides = _random_overrides(rng, preset)
    cfg = resolve_config(preset, overrides, default_similarity=Similarity.ENCODER)
    _compare(random_batch(rng), cfg, rng)
