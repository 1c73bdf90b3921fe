"""The verl plugin against the real verl 0.9.1: its registry, its ``compute_advantage`` dispatch
(legacy ``ray_trainer`` and v1 ``utils``), its ``DataProto`` and its ``_balance_batch``.

Expected values are a direct ``ProxmoClient`` call on the same steps, broadcast onto the masks.
"""

from __future__ import annotations

import sys

import verl  # noqa: F401 (first: loads the plugin through the `verl.plugins` entry point)

LOADED_BY_VERL = "proxmo_client.integrations.verl" in sys.modules

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from integration_batches import StepRows, rollout_rows, shuffled_with_copies  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from proxmo_client import BuildError, ProxmoClient  # noqa: E402
from proxmo_client.integrations import verl as plugin  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos, ray_trainer  # noqa: E402
from verl.trainer.ppo.v1 import utils as v1_utils  # noqa: E402


def to_data_proto(rows: StepRows, *, step_index: bool = False) -> DataProto:
    """A verl-agent batch: the episode reward on the last response token of every step row."""
    mask = torch.as_tensor(rows.response_mask, dtype=torch.int64)
    episode_reward: dict[str, float] = {}
    for tid, r in zip(rows.traj_uid, rows.rewards, strict=True):
        episode_reward[tid] = episode_reward.get(tid, 0.0) + float(r)
    token_rewards = torch.zeros(mask.shape, dtype=torch.float32)
    for r in range(rows.num_rows):
        on = torch.nonzero(mask[r])
        if on.numel():
            token_rewards[r, int(on[-1])] = episode_reward[rows.traj_uid[r]]
    prompt_length = rows.input_ids.shape[1] - mask.shape[1]
    attention = torch.cat([torch.ones(rows.num_rows, prompt_length, dtype=torch.int64), mask], 1)
    non_tensors = {
        "uid": rows.uid, "traj_uid": rows.traj_uid, "anchor_obs": rows.anchor_obs,
        "rewards": rows.rewards, "is_action_valid": rows.is_action_valid,
    }  # fmt: skip
    if step_index:
        non_tensors["step_index"] = rows.step_index
    return DataProto.from_dict(
        tensors={
            "token_level_rewards": token_rewards,
            "response_mask": mask,
            "input_ids": torch.as_tensor(rows.input_ids),
            "attention_mask": attention,
        },
        non_tensors=non_tensors,
    )


def algorithm_config(target: str, **proxmo: object) -> object:
    return OmegaConf.create(
        {"adv_estimator": "proxmo", "gamma": 1.0, "proxmo": {"server": target, **proxmo}}
    )


def direct_per_step(target: str, rows: StepRows, **config: object) -> dict[tuple[str, int], tuple]:
    """(advantage, return) per (trajectory, step) from a direct client call."""
    with ProxmoClient(target) as client:
        response = client.compute_advantages(rows.trajectories(), **config)
    return {
        (t.trajectory_id, s): (t.advantages[s], t.returns[s])
        for t in response.trajectories
        for s in range(len(t.advantages))
    }


def assert_matches(data: DataProto, per_step: dict, steps: np.ndarray) -> None:
    """data.batch advantages/returns == the direct call's step values on each row's own mask."""
    mask = data.batch["response_mask"].to(torch.float64)
    keys = list(zip(data.non_tensor_batch["traj_uid"], steps.tolist(), strict=True))
    for column, name in enumerate(("advantages", "returns")):
        want = torch.tensor([per_step[k][column] for k in keys], dtype=torch.float64)
        got = data.batch[name]
        assert got.shape == mask.shape and got.dtype == torch.float32
        torch.testing.assert_close(
            got.to(torch.float64), want[:, None] * mask, rtol=1e-6, atol=1e-6
        )
    assert data.batch["advantages"].abs().max() > 0.1


def test_plugin_is_loaded_by_import_verl_and_patches_dispatch() -> None:
    assert LOADED_BY_VERL
    assert core_algos.get_adv_estimator_fn("proxmo") is plugin.proxmo_advantage_estimator
    for module in (ray_trainer, v1_utils):
        assert getattr(module.compute_advantage, "__proxmo_original__", None) is not None
    balance = ray_trainer.RayPPOTrainer._balance_batch
    assert getattr(balance, "__proxmo_original__", None) is not None
    plugin.install()  # idempotent: no double wrapping
    assert not hasattr(ray_trainer.compute_advantage.__proxmo_original__, "__proxmo_original__")


def test_legacy_compute_advantage_equals_direct_call(server: object) -> None:
    rows = rollout_rows()  # 2 groups x 4 rollouts = 8 trajectories, 20 step rows
    assert len(set(rows.traj_uid)) == 8
    data = to_data_proto(rows)
    out = ray_trainer.compute_advantage(
        data, adv_estimator="proxmo", config=algorithm_config(server.target, preset="paper")
    )
    assert_matches(out, direct_per_step(server.target, rows, preset="paper"), rows.step_index)


def test_v1_compute_advantage_equals_direct_call(server: object) -> None:
    rows = rollout_rows(seed=4)
    data = to_data_proto(rows)
    batch_keys = [
        f"{u}_{t}_{s}" for u, t, s in zip(rows.uid, rows.traj_uid, rows.step_index, strict=True)
    ]
    out = v1_utils.compute_advantage_for_multi_trajectories(
        data, batch_keys, adv_estimator="proxmo",
        config=algorithm_config(server.target, preset="paper"),
    )  # fmt: skip
    assert_matches(out, direct_per_step(server.target, rows, preset="paper"), rows.step_index)


def test_preset_overrides_and_dry_run_reach_the_service(server: object) -> None:
    rows = rollout_rows(seed=7)
    config = algorithm_config(
        server.target,
        preset="proxmo",
        dry_run=True,
        overrides={"gamma": 0.8, "step_weight": 0.5},
        timeout=20,
    )
    out = ray_trainer.compute_advantage(to_data_proto(rows), adv_estimator="proxmo", config=config)
    want = direct_per_step(
        server.target, rows, preset="proxmo", dry_run=True, gamma=0.8, step_weight=0.5
    )
    assert_matches(out, want, rows.step_index)
    default_gamma = direct_per_step(server.target, rows, preset="proxmo", dry_run=True)
    assert any(abs(want[k][1] - default_gamma[k][1]) > 1e-3 for k in want)


def balance(data: DataProto, config: object) -> None:
    """verl's real RayPPOTrainer._balance_batch on a trainer built without Ray: its worker group
    is reduced to the dispatch info the method reads (2 data-parallel ranks)."""
    trainer = object.__new__(ray_trainer.RayPPOTrainer)
    trainer.config = OmegaConf.create({"algorithm": config})
    trainer.actor_rollout_wg = type("WorkerGroup", (), {"_dispatch_info": {"actor": [0, 1]}})()
    trainer._balance_batch(data, metrics={})


def test_copies_and_balance_batch_reordering(server: object) -> None:
    """adjust_batch-style copies appended, then verl's _balance_batch reorders the rows: the
    plugin stamps step indices first, so every row still gets its own step's advantage."""
    rows = rollout_rows(seed=2)
    order = np.concatenate([np.arange(rows.num_rows), [1, 5, 9, 14]])
    data = to_data_proto(rows.take(order))
    config = algorithm_config(server.target, preset="paper")
    balance(data, config)
    np.testing.assert_array_equal(  # the stamp: original time order, copies share it
        np.sort(data.non_tensor_batch["step_index"]), np.sort(rows.step_index[order])
    )
    assert not np.array_equal(data.non_tensor_batch["traj_uid"], rows.traj_uid[order])
    out = ray_trainer.compute_advantage(data, adv_estimator="proxmo", config=config)
    per_step = direct_per_step(server.target, rows, preset="paper")
    assert_matches(out, per_step, out.non_tensor_batch["step_index"].astype(np.int64))
    # each row's stamp is its true step: compare with the rows' own anchors
    for r in range(len(out)):
        tid, t = out.non_tensor_batch["traj_uid"][r], int(out.non_tensor_batch["step_index"][r])
        original = np.flatnonzero((rows.traj_uid == tid) & (rows.step_index == t))[0]
        assert out.non_tensor_batch["anchor_obs"][r] == rows.anchor_obs[original]


def test_shuffled_rows_with_explicit_step_index_and_copies(server: object) -> None:
    rows = rollout_rows(seed=9)
    shuffled = rows.take(shuffled_with_copies(rows, seed=11, copies=4))
    data = to_data_proto(shuffled, step_index=True)
    out = ray_trainer.compute_advantage(
        data, adv_estimator="proxmo", config=algorithm_config(server.target, preset="paper")
    )
    assert_matches(out, direct_per_step(server.target, rows, preset="paper"), shuffled.step_index)


def test_missing_and_malformed_fields_are_named(server: object) -> None:
    rows = rollout_rows()
    config = algorithm_config(server.target, preset="paper")
    data = to_data_proto(rows)
    data.non_tensor_batch.pop("anchor_obs")
    with pytest.raises(BuildError, match=r"^non_tensor_batch\['anchor_obs'\]: is required"):
        ray_trainer.compute_advantage(data, adv_estimator="proxmo", config=config)
    data = to_data_proto(rows)
    data.non_tensor_batch["rewards"] = rows.rewards.copy()
    data.non_tensor_batch["rewards"][5] = "lots"
    with pytest.raises(BuildError, match=r"^non_tensor_batch\['rewards'\]\[5\]: expected a number"):
        ray_trainer.compute_advantage(data, adv_estimator="proxmo", config=config)
    bad = algorithm_config(server.target, presett="paper")
    with pytest.raises(BuildError, match=r"^algorithm\.proxmo\.presett: unknown key"):
        ray_trainer.compute_advantage(to_data_proto(rows), adv_estimator="proxmo", config=bad)


def test_estimator_outside_compute_advantage_says_how_to_call_it() -> None:
    rows = rollout_rows()
    with pytest.raises(RuntimeError, match="needs the whole batch"):
        plugin.proxmo_advantage_estimator(
            token_level_rewards=torch.zeros(rows.response_mask.shape),
            response_mask=torch.as_tensor(rows.response_mask), index=rows.uid,
        )  # fmt: skip


@pytest.mark.parametrize("estimator", plugin.PRESET_ESTIMATORS)
def test_hgpo_and_graphgpo_are_served_with_their_preset(server: object, estimator: str) -> None:
    """adv_estimator=hgpo / graphgpo: registered in verl's registry, the preset of that name by
    default, another preset and overrides when configured, rows reordered by _balance_batch."""
    assert core_algos.get_adv_estimator_fn(estimator) is plugin._PRESET_ESTIMATOR_FNS[estimator]
    rows = rollout_rows(seed=5)
    config = OmegaConf.create(
        {"adv_estimator": estimator, "gamma": 1.0, "proxmo": {"server": server.target}}
    )
    out = ray_trainer.compute_advantage(to_data_proto(rows), adv_estimator=estimator, config=config)
    assert_matches(out, direct_per_step(server.target, rows, preset=estimator), rows.step_index)

    order = np.concatenate([np.arange(rows.num_rows), [0, 3]])
    data = to_data_proto(rows.take(order))
    overrides = {"hgpo_history_length": 0, "episode_weight": 0.5, "gamma": 0.5}
    config = OmegaConf.create({"adv_estimator": estimator, "proxmo": {
        "server": server.target, "overrides": overrides, "dry_run": True}})  # fmt: skip
    balance(data, config)
    out = ray_trainer.compute_advantage(data, adv_estimator=estimator, config=config)
    want = direct_per_step(server.target, rows, preset=estimator, dry_run=True, **overrides)
    assert_matches(out, want, out.non_tensor_batch["step_index"].astype(np.int64))

    explicit = algorithm_config(server.target, preset="gigpo")
    out = ray_trainer.compute_advantage(
        to_data_proto(rows), adv_estimator=estimator, config=explicit
    )
    assert_matches(out, direct_per_step(server.target, rows, preset="gigpo"), rows.step_index)
