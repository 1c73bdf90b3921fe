"""verl-agent forks (verl 0.3-era, e.g. verl-agent's GiGPO trainer and the ProxMO authors'
ProxMO-RL): their ``proxmo`` and ``gigpo`` estimators computed by the service.

Such a fork has no estimator registry and loads no ``verl.plugins`` entry points; its
``verl.trainer.ppo.ray_trainer.compute_advantage(data, adv_estimator, gamma, ...,
step_advantage_w, proxmo_mode | gigpo_mode, ..., **kwargs)`` branches on an enum whose values
include ``proxmo`` or ``gigpo``. :func:`proxmo_client.integrations.verl.install` wraps that
function; with a server configured, the wrapper calls :func:`compute_fork_advantages` ahead of
the fork's own branches. The fork's arguments become the service's configuration
(:func:`fork_config`) so that the default answer is the fork's in-process answer:

=========================================  =========================================================
fork                                       service (``EstimatorConfig``)
=========================================  =========================================================
``gigpo``, ``gigpo_mode=mean_norm``        preset ``gigpo`` (STEP unit, MEAN, exact anchors)
``proxmo``, ``proxmo_mode=mean_norm``      preset ``gigpo`` (+ PSC when ``enable_psc``)
``*_mode=mean_std_norm``                   the same, ``episode_normalization`` and
                                           ``step_normalization`` MEAN_STD
``proxmo_mode=soft_grouping``              preset ``proxmo-rl`` (PSA over TF-IDF, tau 0.1)
``enable_psc`` (default false)             ``psc_enabled``; ``success_rate_source`` ROW_MEAN
``psc_alpha`` (default 5.0)                ``psc_alpha``
``psc_beta`` (default 0.866)               ``psc_beta``
``psc_target_range``                       ``psc_range``
``step_advantage_w``                       ``step_weight``
``gamma``                                  ``gamma``
``compute_mean_std_cross_steps=False``     ``stats_unit`` TRAJECTORY
trainer ``actor_rollout_ref.actor.``       ``invalid_action_penalty`` (0 when
``invalid_action_penalty_coef``            ``use_invalid_action_penalty`` is false)
``*_enable_similarity=True``               not served: :class:`BuildError`
=========================================  =========================================================

With an explicit ``preset`` only ``gamma``, ``step_weight`` and ``invalid_action_penalty`` are
taken from the fork; ``overrides`` win over everything.

**Padding copies** (``copies``). The fork's ``adjust_batch`` pads the batch with copies of
random rows. ``"merge"`` (default): a copy is its original's step, sent once, and gets its
advantage (the service's semantics; rows are identified as in the mainline plugin).
``"count"``: every row counts, copies included, in the group statistics, p, TF-IDF and the
softmax, as the released code does. The service has no per-row weights, so this sends two
dry-run requests of one-step trajectories, one row each: rewards = the fork's row scores
(``token_level_rewards`` summed) for the episode term, and = the fork's ``step_rewards`` for the
step term; ``A = episode + step_weight * step``.

**Returns** (``returns``). ``"discounted"`` (default): ``batch["returns"]`` = G_t, the discounted
return after the invalid-action penalty, as in the mainline plugin. ``"advantages"``: the fork's
convention, ``returns`` = ``advantages``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from proxmo_client.errors import BuildError
from proxmo_client.integrations.rows import advantages_for_rows, rows_to_request
from proxmo_client.integrations.service import ServiceConfig
from proxmo_client.integrations.verl import FORK_ESTIMATORS, _get, request_from_batch

__all__ = [
    "COPIES",
    "FORK_ESTIMATORS",
    "RETURNS",
    "ForkOptions",
    "compute_fork_advantages",
    "fork_config",
]

COPIES = ("merge", "count")
RETURNS = ("discounted", "advantages")

# The fork's mode -> (preset, overrides) before PSC and the trainer's hyper-parameters.
_MODES: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "mean_norm": ("gigpo", {}),
    "mean_std_norm": (
        "gigpo",
        {"episode_normalization": "MEAN_STD", "step_normalization": "MEAN_STD"},
    ),
    "soft_grouping": ("proxmo-rl", {}),
}
# The fork's own defaults where its compute_advantage reads kwargs.get(name, default).
_PSC_DEFAULTS = {"enable_psc": False, "psc_alpha": 5.0, "psc_beta": 0.866}


@dataclass(frozen=True)
class ForkOptions:
    """How the wrapper serves a fork: ``service`` (its ``preset`` "" = translate the fork's
    estimator), ``copies`` ("merge" or "count") and ``returns`` ("discounted" or "advantages")."""

    service: ServiceConfig = field(default_factory=ServiceConfig)
    copies: str = "merge"
    returns: str = "discounted"

    def __post_init__(self) -> None:
        if self.copies not in COPIES:
            raise BuildError("copies", f"expected one of {', '.join(COPIES)}, got {self.copies!r}")
        if self.returns not in RETURNS:
            raise BuildError(
                "returns", f"expected one of {', '.join(RETURNS)}, got {self.returns!r}"
            )


def fork_config(
    estimator: str, arguments: Mapping[str, Any], trainer_config: Any = None, preset: str = ""
) -> tuple[str, dict[str, Any]]:
    """(preset, overrides) reproducing the fork's ``estimator`` called with ``arguments`` (its
    ``compute_advantage`` arguments by name, ``**kwargs`` flattened in); ``trainer_config`` is the
    fork trainer's config (for the invalid-action penalty) when known. A non-empty ``preset``
    keeps only the trainer's hyper-parameters (module docstring)."""
    overrides: dict[str, Any] = {}
    if "gamma" in arguments:
        overrides["gamma"] = float(arguments["gamma"])
    if "step_advantage_w" in arguments:
        overrides["step_weight"] = float(arguments["step_advantage_w"])
    penalty = _invalid_action_penalty(arguments, trainer_config)
    if penalty is not None:
        overrides["invalid_action_penalty"] = penalty
    if preset:
        return preset, overrides
    if estimator not in FORK_ESTIMATORS:
        raise BuildError("adv_estimator", f"expected one of {', '.join(FORK_ESTIMATORS)}")
    mode_key = f"{estimator}_mode"
    mode = str(arguments.get(mode_key, "mean_norm"))
    if (estimator == "gigpo" and mode == "soft_grouping") or mode not in _MODES:
        choices = [m for m in _MODES if estimator == "proxmo" or m != "soft_grouping"]
        raise BuildError(mode_key, f"unknown mode {mode!r}; expected one of {', '.join(choices)}")
    similarity_key = f"{estimator}_enable_similarity"
    if arguments.get(similarity_key, False):
        raise BuildError(
            similarity_key,
            "similarity-threshold anchor grouping is not served; set it to false "
            "(proxmo_mode=soft_grouping is the service's soft similarity)",
        )
    base, mode_overrides = _MODES[mode]
    overrides.update(mode_overrides)
    if arguments.get("compute_mean_std_cross_steps", True) is False:
        overrides["stats_unit"] = "TRAJECTORY"
    if estimator == "proxmo":
        psc = {name: arguments.get(name, default) for name, default in _PSC_DEFAULTS.items()}
        overrides["psc_enabled"] = bool(psc["enable_psc"])
        overrides["success_rate_source"] = "ROW_MEAN"
        overrides["psc_alpha"] = float(psc["psc_alpha"])
        if "psc_target_range" in arguments and "psc_beta" not in arguments:
            overrides["psc_range"] = float(arguments["psc_target_range"])
        else:
            overrides["psc_beta"] = float(psc["psc_beta"])
    return base, overrides


def _invalid_action_penalty(arguments: Mapping[str, Any], trainer_config: Any) -> float | None:
    """The fork's lambda: an explicit argument, else the trainer's actor config (verl-agent
    subtracts it from the row score and the step return before compute_advantage)."""
    for name in ("invalid_action_penalty_coef", "invalid_action_penalty"):
        if name in arguments:
            return float(arguments[name])
    actor = _get(_get(trainer_config, "actor_rollout_ref"), "actor")
    if actor is None:
        return None
    if _get(actor, "use_invalid_action_penalty") is False:
        return 0.0
    coefficient = _get(actor, "invalid_action_penalty_coef")
    return None if coefficient is None else float(coefficient)


def compute_fork_advantages(
    data: Any,
    estimator: str,
    arguments: Mapping[str, Any],
    options: ForkOptions,
    trainer_config: Any = None,
) -> Any:
    """The fork's ``compute_advantage`` for ``proxmo``/``gigpo``, by the service: writes
    ``advantages`` and ``returns`` (and, with ``return_components``, ``episode_advantages`` and
    ``step_advantages``) into ``data.batch`` and returns ``data``."""
    import torch

    batch = data.batch
    if "response_mask" not in batch.keys():
        if "responses" not in batch.keys() or "attention_mask" not in batch.keys():
            raise BuildError("batch['response_mask']", "is required (or responses, attention_mask)")
        batch["response_mask"] = batch["attention_mask"][:, -batch["responses"].shape[1] :]
    preset, overrides = fork_config(estimator, arguments, trainer_config, options.service.preset)
    overrides.update(options.service.overrides)
    settings = dataclasses.replace(options.service, preset=preset, overrides=overrides)
    if options.copies == "count":
        values = _every_row_counted(data, settings)
    else:
        request, plan = request_from_batch(data, settings)
        response = settings.client().compute_advantages(request, timeout=settings.timeout)
        values = {
            name: advantages_for_rows(response, plan, name)
            for name in ("advantages", "episode_advantages", "step_advantages", "returns")
        }
    if options.returns == "advantages":
        values["returns"] = values["advantages"]
    mask = batch["response_mask"]
    dtype = batch["token_level_rewards"].dtype if "token_level_rewards" in batch.keys() else None
    dtype = dtype or torch.float32
    names = ["advantages", "returns"]
    if arguments.get("return_components", False):
        names += ["episode_advantages", "step_advantages"]
    for name in names:
        per_row = torch.as_tensor(values[name], device=mask.device).to(dtype)
        batch[name] = per_row.unsqueeze(-1) * mask.to(dtype)
    return data


def _every_row_counted(data: Any, settings: ServiceConfig) -> dict[str, np.ndarray]:
    """``copies="count"``: the released code's per-row statistics, copies included (module doc)."""
    batch, non_tensor = data.batch, data.non_tensor_batch
    for key in ("token_level_rewards", "step_rewards"):
        if key not in batch.keys():
            raise BuildError(f"batch['{key}']", "is required by copies='count'")
    for key in ("uid", "anchor_obs"):
        if key not in non_tensor:
            raise BuildError(f"non_tensor_batch['{key}']", "is required by copies='count'")
    scores = batch["token_level_rewards"].detach().cpu().double().sum(-1).numpy()
    step_returns = batch["step_rewards"].detach().cpu().double().reshape(-1).numpy()
    row_ids = [str(r) for r in range(len(scores))]
    overrides = {**settings.overrides, "invalid_action_penalty": 0.0}  # already in both inputs
    client = settings.client()
    answers = []
    for rewards in (scores, step_returns):
        request, plan = rows_to_request(
            non_tensor["uid"], row_ids, non_tensor["anchor_obs"], rewards,
            preset=settings.preset, dry_run=True, **overrides,
        )  # fmt: skip
        answers.append(
            (client.compute_advantages(request, timeout=settings.timeout), plan)
        )
    (episode_response, episode_plan), (step_response, step_plan) = answers
    episode = advantages_for_rows(episode_response, episode_plan, "episode_advantages")
    step = advantages_for_rows(step_response, step_plan, "step_advantages")
    step_weight = episode_response.resolved_config.step_weight
    return {
        "advantages": episode + step_weight * step,
        "episode_advantages": episode,
        "step_advantages": step,
        "returns": advantages_for_rows(step_response, step_plan, "returns"),
    }
