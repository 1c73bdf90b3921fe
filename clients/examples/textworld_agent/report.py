"""Results: the per-iteration CSV -> a PNG of success rate vs environment steps (mean and 95%
confidence band over seeds) and a markdown table."""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

MAIN_ESTIMATORS = ("proxmo-tfidf", "proxmo-encoder", "paper", "gigpo", "hgpo", "graphgpo", "grpo")
TAU_SWEEP = {"proxmo-encoder-tau0.02": 0.02, "proxmo-encoder": 0.05, "proxmo-encoder-tau0.1": 0.1}
SMOOTH = 3  # iterations in the moving average of a curve (one iteration is a noisy estimate)
TARGET = 0.8  # success rate of the "env steps to reach" column


def write_csv(records: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _runs(
    rows: Sequence[dict[str, str]], column: str = "success_rate"
) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """estimator -> seed -> (env_steps, column) in iteration order."""
    grouped: dict[tuple[str, int], list[tuple[int, int, float]]] = defaultdict(list)
    for row in rows:
        grouped[(row["estimator"], int(row["seed"]))].append(
            (int(row["iteration"]), int(row["env_steps"]), float(row[column]))
        )
    runs: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    for (name, seed), points in grouped.items():
        points.sort()
        runs[name][seed] = (np.array([p[1] for p in points]), np.array([p[2] for p in points]))
    return runs


def _mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% t confidence interval (0 for one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, 0.0
    sem = float(np.std(values, ddof=1) / np.sqrt(len(values)))
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * sem)


def _smooth(y: np.ndarray) -> np.ndarray:
    kernel = np.ones(min(SMOOTH, len(y))) / min(SMOOTH, len(y))
    padded = np.concatenate([np.full(len(kernel) - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")


def summary(rows: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """Per estimator: final success (mean of the last quarter of iterations), the mean success
    over all iterations (area under the curve), env steps until the smoothed success first
    reaches TARGET (a run that never does counts all its steps), the final mean episode length
    (last quarter; shorter = fewer wasted commands) and env steps used; each mean +- 95% CI
    over seeds."""
    lengths = _runs(rows, "mean_episode_length")
    out = []
    for name, by_seed in _runs(rows).items():
        final_lengths = [y[-max(1, len(y) // 4) :].mean() for _, y in lengths[name].values()]
        finals, aucs, to_target, steps, reached = [], [], [], [], 0
        for env_steps, success in by_seed.values():
            tail = max(1, len(success) // 4)
            finals.append(success[-tail:].mean())
            aucs.append(success.mean())
            hits = np.flatnonzero(_smooth(success) >= TARGET)
            reached += len(hits) > 0
            to_target.append(env_steps[hits[0]] if len(hits) else env_steps[-1])
            steps.append(env_steps[-1])
        out.append({
            "estimator": name, "seeds": len(by_seed),
            "iterations": len(next(iter(by_seed.values()))[1]),
            "final": _mean_ci(np.array(finals)), "auc": _mean_ci(np.array(aucs)),
            "to_target": _mean_ci(np.array(to_target, dtype=float)), "reached": reached,
            "length": _mean_ci(np.array(final_lengths)),
            "env_steps": float(np.mean(steps)),
        })  # fmt: skip
    return sorted(out, key=lambda s: -s["final"][0])


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    lines = [
        "| estimator | seeds | iterations | final success (last 25%) | mean success (AUC) "
        f"| env steps to {TARGET:.0%} (runs reaching) | final episode length | env steps used |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary(rows):
        (fm, fc), (am, ac), (tm, tc) = s["final"], s["auc"], s["to_target"]
        lm, lc = s["length"]
        lines.append(
            f"| {s['estimator']} | {s['seeds']} | {s['iterations']} | {fm:.3f} ± {fc:.3f} "
            f"| {am:.3f} ± {ac:.3f} | {tm:.0f} ± {tc:.0f} ({s['reached']}/{s['seeds']}) "
            f"| {lm:.2f} ± {lc:.2f} | {s['env_steps']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _plot_panel(ax: Any, runs: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]],
                names: Sequence[str], labels: dict[str, str], ylabel: str) -> None:  # fmt: skip
    for name in names:
        if name not in runs:
            continue
        curves = list(runs[name].values())
        # Runs use different env steps per iteration (won episodes end early): interpolate
        # each smoothed curve onto a common grid covering the steps every seed reached.
        grid = np.linspace(max(c[0][0] for c in curves), min(c[0][-1] for c in curves), 100)
        ys = np.stack([np.interp(grid, steps, _smooth(y)) for steps, y in curves])
        mean = ys.mean(axis=0)
        line = ax.plot(grid, mean, label=f"{labels.get(name, name)} (n={len(curves)})")[0]
        if len(curves) > 1:
            half = (
                stats.t.ppf(0.975, len(curves) - 1) * ys.std(axis=0, ddof=1) / np.sqrt(len(curves))
            )
            ax.fill_between(grid, mean - half, mean + half, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"{ylabel} (moving average of {SMOOTH} iterations)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot(rows: Sequence[dict[str, str]], path: Path, *, title: str = "") -> None:
    """Top: success rate vs env steps; bottom: mean episode length. Left: the estimators;
    right (when present): the ENCODER tau sweep. Mean and 95% t-band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"success_rate": "success rate", "mean_episode_length": "mean episode length"}
    runs = {column: _runs(rows, column) for column in panels}
    names = runs["success_rate"]
    sweep = [name for name in TAU_SWEEP if name in names]
    main = [n for n in MAIN_ESTIMATORS if n in names]
    main += [n for n in names if n not in MAIN_ESTIMATORS and n not in TAU_SWEEP]
    groups = [("estimators", main, {})]
    if len(sweep) > 1:
        groups.append(("ENCODER tau sweep", sweep,
                       {n: f"proxmo ENCODER tau={t}" for n, t in TAU_SWEEP.items()}))  # fmt: skip
    fig, axes = plt.subplots(2, len(groups), figsize=(6.5 * len(groups), 8), squeeze=False)
    for col, (group_title, group, labels) in enumerate(groups):
        for row, (column, ylabel) in enumerate(panels.items()):
            ax = axes[row][col]
            _plot_panel(ax, runs[column], group, labels, ylabel)
            ax.set_title(f"{group_title}: {ylabel} (95% CI over seeds)", fontsize=9)
        axes[0][col].set_ylim(0, 1)
        axes[1][col].set_ylim(bottom=0)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Re-render table.md and success_vs_steps.png from a runs.csv (its folder by default)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m textworld_agent.report", description=main.__doc__)
    p.add_argument("csv", type=Path)
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    rows = read_csv(args.csv)
    (args.csv.parent / "table.md").write_text(markdown_table(rows))
    plot(rows, args.csv.parent / "success_vs_steps.png", title=args.title)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
