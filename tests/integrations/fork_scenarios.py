"""Scenarios run inside a verl-agent fork, in a fresh interpreter whose ``verl`` is the stand-in
package ``fork_verl/`` (verl 0.3-era interfaces). ``test_verl_fork.py`` runs
``python fork_scenarios.py SCENARIO TARGET`` with ``fork_verl`` first on PYTHONPATH and reads
one JSON object from the last line of stdout.

The batches are built as the fork's fit() builds them (rollout rows in trajectory order, the
step returns, adjust_batch copies, _balance_batch, the invalid-action penalty) and go through
the stand-in's RayPPOTrainer.fit_batch; "fork" numbers come from the stand-in's own in-process
branches, "service" numbers from the wrapper and a real proxmo-server at TARGET.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from integration_batches import rollout_rows

PENALTY = 0.1
# (estimator, its config node): the fork configurations the parity checks cover.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gigpo-mean_norm": ("gigpo", {"mode": "mean_norm"}),
    "gigpo-mean_std_norm": ("gigpo", {"mode": "mean_std_norm", "step_advantage_w": 0.5}),
    "proxmo-mean_norm-psc": ("proxmo", {"mode": "mean_norm", "enable_psc": True,
                                        "psc_alpha": 4.0, "psc_target_range": 0.05}),
    "proxmo-mean_std_norm": ("proxmo", {"mode": "mean_std_norm"}),
    "proxmo-soft_grouping": ("proxmo", {"mode": "soft_grouping"}),
    "proxmo-soft_grouping-psc": ("proxmo", {"mode": "soft_grouping", "enable_psc": True,
                                            "psc_alpha": 4.0, "psc_target_range": 0.2}),
}  # fmt: skip


def trainer_config(name: str, size_divisor: int = 1, gamma: float = 0.95) -> dict[str, Any]:
    estimator, node = CONFIGS[name]
    return {
        "algorithm": {"adv_estimator": estimator, "gamma": gamma, estimator: node},
        "actor_rollout_ref": {"actor": {"use_invalid_action_penalty": True,
                                        "invalid_action_penalty_coef": PENALTY}},
        "trainer": {"size_divisor": size_divisor, "balance_batch": True},
    }  # fmt: skip


def rollout(seed: int = 3, groups: int = 3, per_group: int = 4) -> Any:
    """The trajectory collector's output: one row per step, trajectory-major, time order."""
    from verl import DataProto

    rows = rollout_rows(groups, per_group, seed=seed)
    totals: dict[str, float] = {}
    for tid, r in zip(rows.traj_uid, rows.rewards, strict=True):
        totals[tid] = totals.get(tid, 0.0) + float(r)
    mask = torch.as_tensor(rows.response_mask)
    prompt = rows.input_ids.shape[1] - mask.shape[1]
    return DataProto(
        {"input_ids": torch.as_tensor(rows.input_ids),
         "attention_mask": torch.cat([torch.ones(len(mask), prompt, dtype=mask.dtype), mask], 1),
         "responses": torch.zeros_like(mask)},
        {"uid": rows.uid, "traj_uid": rows.traj_uid, "anchor_obs": rows.anchor_obs,
         "rewards": rows.rewards, "is_action_valid": rows.is_action_valid,
         "episode_rewards": np.array([totals[t] for t in rows.traj_uid], dtype=object),
         "active_masks": np.ones(rows.num_rows, dtype=object)},
    )  # fmt: skip


def fit(config: dict[str, Any], seed: int = 3) -> Any:
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    return RayPPOTrainer(config).fit_batch(rollout(seed))


def in_process(run: Callable[[], Any]) -> Any:
    """``run()`` with the fork's own compute_advantage (the wrapper bypassed)."""
    from verl.trainer.ppo import ray_trainer

    wrapped = ray_trainer.compute_advantage
    ray_trainer.compute_advantage = wrapped.__proxmo_original__
    try:
        return run()
    finally:
        ray_trainer.compute_advantage = wrapped


def max_diff(a: Any, b: Any) -> float:
    return float((a.batch["advantages"] - b.batch["advantages"]).abs().max())


def copies_of(data: Any) -> int:
    keys = {(t, bytes(i.numpy())) for t, i in
            zip(data.non_tensor_batch["traj_uid"], data.batch["input_ids"], strict=True)}
    return len(data) - len(keys)


def scenario_import_order(target: str) -> dict[str, Any]:
    """The plugin imported before the fork's verl, install() without a server, bad settings."""
    from proxmo_client.integrations import verl as plugin

    finders = [type(f).__name__ for f in sys.meta_path]
    from verl.trainer.ppo import core_algos, ray_trainer

    out: dict[str, Any] = {
        "has_registry": hasattr(core_algos, "ADV_ESTIMATOR_REGISTRY"),
        "wrapped": hasattr(ray_trainer.compute_advantage, "__proxmo_original__"),
        "install_again": plugin.install(),
        "finders_unchanged": finders == [type(f).__name__ for f in sys.meta_path],
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = fit(trainer_config("proxmo-mean_norm-psc"))
    out["no_server_computed_by"] = data.meta_info.get("computed_by")
    out["no_server_warning"] = [str(w.message) for w in caught]
    ours = [f for f in sys.meta_path if isinstance(f, plugin._PatchOnImport)]
    for finder in ours:  # as before this module's own install(): none of ours on sys.meta_path
        sys.meta_path.remove(finder)
    out["bad_install"] = plugin.install(server=target, copies="sometimes")
    out["finder_left_after_failure"] = any(
        isinstance(f, plugin._PatchOnImport) for f in sys.meta_path
    )
    out["server_after_failure"] = plugin._settings().get("server")
    return out


def scenario_parity(target: str) -> dict[str, Any]:
    """Service (default options) vs the fork's in-process code, batches without copies."""
    from proxmo_client.integrations import verl as plugin
    from verl.trainer.ppo import ray_trainer  # patched on import

    assert plugin.install(server=target)
    out: dict[str, Any] = {"max_diff": {}, "computed_by": {}}
    for name in CONFIGS:
        served = fit(trainer_config(name))
        fork = in_process(lambda name=name: fit(trainer_config(name)))
        out["max_diff"][name] = max_diff(served, fork)
        out["computed_by"][name] = [
            served.meta_info.get("computed_by"), fork.meta_info["computed_by"]
        ]
        out.setdefault("max_abs", {})[name] = float(fork.batch["advantages"].abs().max())
    served = fit(trainer_config("proxmo-soft_grouping"))
    out["returns_are_discounted"] = not torch.equal(
        served.batch["returns"], served.batch["advantages"]
    )
    mask = served.batch["response_mask"].bool()
    step_rewards = served.batch["step_rewards"]  # G_t after the penalty, as the fork computed it
    want = step_rewards.unsqueeze(-1).expand_as(mask)[mask]
    out["returns_vs_step_rewards"] = float((served.batch["returns"][mask] - want).abs().max())
    components = {}  # ProxMO-RL's gradient weighting asks for the two terms separately
    kwargs: dict[str, Any] = {"adv_estimator": "proxmo", "gamma": 0.95,
                              "proxmo_mode": "soft_grouping", "enable_psc": True,
                              "psc_alpha": 4.0, "psc_beta": 0.8, "return_components": True}
    for path, compute in (("service", ray_trainer.compute_advantage),
                          ("fork", ray_trainer.compute_advantage.__proxmo_original__)):
        components[path] = compute(copy.deepcopy(served), **kwargs).batch
    out["components_max_diff"] = max(
        float((components["service"][name] - components["fork"][name]).abs().max())
        for name in ("episode_advantages", "step_advantages")
    )
    plugin.install(returns="advantages")
    served = fit(trainer_config("proxmo-soft_grouping"))
    out["fork_returns_equal_advantages"] = torch.equal(
        served.batch["returns"], served.batch["advantages"]
    )
    return out


def scenario_copies(target: str) -> dict[str, Any]:
    """adjust_batch copies: "merge" (default) and "count" vs the fork's in-process code."""
    from proxmo_client import ProxmoClient
    from proxmo_client.integrations import verl as plugin
    from verl.trainer.ppo import ray_trainer  # noqa: F401

    assert plugin.install(server=target)
    out: dict[str, Any] = {"merge": {}, "count": {}}
    for name in ("proxmo-soft_grouping-psc", "gigpo-mean_norm", "proxmo-mean_std_norm"):
        config = trainer_config(name, size_divisor=48)
        fork = in_process(lambda config=config: fit(config))
        out["copies"] = copies_of(fork)
        plugin.install(copies="merge")
        merged = fit(config)
        plugin.install(copies="count")
        counted = fit(config)
        out["merge"][name] = max_diff(merged, fork)
        out["count"][name] = max_diff(counted, fork)
        if name == "proxmo-soft_grouping-psc":  # merge = the service on the distinct steps
            rows = rollout_rows(3, 4, seed=3)
            with ProxmoClient(target) as client:
                response = client.compute_advantages(
                    rows.trajectories(), preset="proxmo-rl", gamma=0.95, step_weight=1.0,
                    invalid_action_penalty=PENALTY, psc_alpha=4.0, psc_range=0.2,
                    success_rate_source="ROW_MEAN", psc_enabled=True,
                )  # fmt: skip
            per_step = {(t.trajectory_id, s): t.advantages[s]
                        for t in response.trajectories for s in range(len(t.advantages))}
            keys = zip(merged.non_tensor_batch["traj_uid"],
                       merged.non_tensor_batch["step_index"].astype(int), strict=True)
            want = torch.tensor([per_step[k] for k in keys])
            got = merged.batch["advantages"]
            mask = merged.batch["response_mask"]
            out["merge_vs_direct"] = float((got - want[:, None] * mask).abs().max())
    plugin.install(copies="merge")
    return out


def scenario_ray(target: str) -> dict[str, Any]:
    """fit() in a Ray TaskRunner actor of a job started with the setup hook: the driver's own
    install(server=...) does not reach the actor; PROXMO_SERVER in its environment does."""
    import ray
    from proxmo_client.integrations import verl as plugin
    from verl.trainer import main_ppo

    assert plugin.install(server=target)
    config = trainer_config("proxmo-soft_grouping-psc", size_divisor=48)
    in_driver = fit(copy.deepcopy(config))
    out: dict[str, Any] = {"ray_init_checked": hasattr(ray.init, "__proxmo_original__")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["hookless_env_ok"] = plugin.check_ray_runtime_env({"env_vars": {"A": "1"}})
        out["hookless_warning"] = [str(w.message) for w in caught]
    ray_init = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False,
                "runtime_env": {"worker_process_setup_hook": plugin.SETUP_HOOK}}  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unset = main_ppo.run_ppo({**config, "ray_init": ray_init}, rollout())
        out["init_warnings"] = [str(w.message) for w in caught]
    served = main_ppo.run_ppo(config, rollout(), {"env_vars": {"PROXMO_SERVER": target}})
    ray.shutdown()
    out["server_unset"] = {"computed_by": unset["computed_by"], "loaded": unset["wrapper_loaded"]}
    out["server_set"] = {
        "computed_by": served["computed_by"],
        "loaded": served["wrapper_loaded"],
        "max_diff_vs_driver": float(
            np.abs(served["advantages"] - in_driver.batch["advantages"].numpy()).max()
        ),
    }
    return out


def scenario_numbers(target: str) -> dict[str, Any]:
    """parity and copies in one interpreter (one torch import less)."""
    return {"parity": scenario_parity(target), "copies": scenario_copies(target)}


if __name__ == "__main__":
    scenario, server = sys.argv[1], sys.argv[2]
    print(json.dumps(globals()[f"scenario_{scenario}"](server)))
