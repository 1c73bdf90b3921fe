"""verl plugin: ``algorithm.adv_estimator=proxmo`` computes advantages with a proxmo server.

Installed with ``pip install "proxmo-client[verl]"``; verl imports this module on ``import verl``
through the ``verl.plugins`` entry point. Importing it is cheap and never fails: it only installs
an import hook, which acts when verl's own modules load (or at once if they are loaded):

- ``verl.trainer.ppo.core_algos``: ``register_adv_est("proxmo")`` registers
  :func:`proxmo_advantage_estimator`.
- ``verl.trainer.ppo.ray_trainer`` and ``verl.trainer.ppo.v1.utils`` (which binds the name by
  ``from ... import``): ``compute_advantage`` is wrapped so the whole ``DataProto`` is published
  in a ``ContextVar`` while the estimator runs. verl hands a registered estimator only
  ``token_level_rewards``, ``response_mask``, ``index`` (= ``uid``) and ``config``; ProxMO
  also needs states, step rewards and trajectory ids.
- ``RayPPOTrainer._balance_batch`` (which reorders rows by sequence length): when
  ``adv_estimator == "proxmo"`` and the batch has ``traj_uid`` but no ``step_index``, it first
  stamps ``non_tensor_batch["step_index"]`` from the current (trajectory-major, time-ordered)
  row order; rows that copy an earlier row of their trajectory (same ``input_ids``, e.g. from
  verl-agent's ``adjust_batch``) get the original's index.

Batch fields **read** (one entry per row; a row is one environment step, verl-agent's layout):

==================================  ========  ====================================================
``non_tensor_batch["uid"]``         required  group id (rollouts of one prompt)
``non_tensor_batch["traj_uid"]``    required  trajectory id
``non_tensor_batch["anchor_obs"]``  required  the step's observation text (no prompt, no history)
``non_tensor_batch["rewards"]``     required  immediate env reward r_t (not the discounted
                                              ``batch["step_rewards"]``: the service discounts)
``batch["response_mask"]``          required  (rows, response_length) tokens of the step's action
``non_tensor_batch["is_action_valid"]``  opt.  invalid = not valid (invalid-action penalty)
``non_tensor_batch["step_index"]``  optional  0-based step within the trajectory; rows sharing
                                              (traj_uid, step_index) are copies
``non_tensor_batch["task_id"]``     optional  stable task id (success-rate history); else uid
``non_tensor_batch["success"]``     optional  per-trajectory success flag
``batch["input_ids"]``              optional  without ``step_index``: copies are found as rows of
                                              a trajectory with identical ``input_ids``
==================================  ========  ====================================================

Without ``step_index``, a trajectory's steps are its distinct rows in row order.

Fields **written** (by verl's ``compute_advantage`` from the returned pair):
``batch["advantages"]`` = A_t of the row's step on every response token (0 elsewhere) and
``batch["returns"]`` = the discounted return G_t the same way; float32 like the rewards.

Config, under ``algorithm.proxmo`` (all optional)::

    algorithm:
      adv_estimator: proxmo
      proxmo:
        server: localhost:50051     # gRPC target
        preset: proxmo              # "" = the server's default preset
        overrides: {gamma: 0.95}    # proxmo.v1.EstimatorConfig fields
        timeout: 30.0               # seconds per call, retries included
        token: null                 # bearer token
        dry_run: false              # compute without writing success-rate history
"""

from __future__ import annotations

import contextvars
import functools
import importlib.abc
import importlib.machinery
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from proxmo_client.errors import BuildError
from proxmo_client.integrations.rows import (
    RowPlan,
    advantages_for_rows,
    derive_step_index,
    rows_to_request,
)
from proxmo_client.integrations.service import ServiceConfig

__all__ = [
    "ESTIMATOR_NAME",
    "compute_proxmo_advantages",
    "config_from_algorithm",
    "current_batch",
    "install",
    "proxmo_advantage_estimator",
    "request_from_batch",
    "stamp_step_index",
]

ESTIMATOR_NAME = "proxmo"
STEP_INDEX_KEY = "step_index"
CORE_ALGOS = "verl.trainer.ppo.core_algos"
RAY_TRAINER = "verl.trainer.ppo.ray_trainer"
V1_UTILS = "verl.trainer.ppo.v1.utils"

_CURRENT_BATCH: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "proxmo_verl_batch", default=None
)

# Where the row helpers' column names come from, for error messages in verl's terms.
_FIELD_NAMES = {
    "group_ids": "non_tensor_batch['uid']",
    "trajectory_ids": "non_tensor_batch['traj_uid']",
    "states": "non_tensor_batch['anchor_obs']",
    "rewards": "non_tensor_batch['rewards']",
    "invalid": "non_tensor_batch['is_action_valid']",
    "step_index": "non_tensor_batch['step_index']",
    "task_ids": "non_tensor_batch['task_id']",
    "success": "non_tensor_batch['success']",
}


# ------------------------------------------------------------------- config


def config_from_algorithm(config: Any) -> ServiceConfig:
    """``algorithm.proxmo`` of verl's ``config.algorithm`` (DictConfig, AlgoConfig, dict, None)."""
    node = _get(config, "proxmo")
    if node is None:
        return ServiceConfig()
    values = _plain(node)
    if not isinstance(values, Mapping):
        raise BuildError("algorithm.proxmo", f"expected a mapping, got {type(node).__name__}")
    return ServiceConfig.from_mapping(values, "algorithm.proxmo")


def _get(config: Any, key: str) -> Any:
    if config is None:
        return None
    getter = getattr(config, "get", None)
    if callable(getter):
        return getter(key, None)
    return getattr(config, key, None)


def _plain(node: Any) -> Any:
    """An OmegaConf node as plain dicts and lists; anything else unchanged."""
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and isinstance(node, omegaconf.DictConfig):
        return omegaconf.OmegaConf.to_container(node, resolve=True)
    return node


# ------------------------------------------------------------------- the estimator


def current_batch() -> Any:
    """The ``DataProto`` that verl's ``compute_advantage`` is working on (None outside it)."""
    return _CURRENT_BATCH.get()


def proxmo_advantage_estimator(
    token_level_rewards: Any,
    response_mask: Any,
    index: Any = None,
    config: Any = None,
    **_unused: Any,
) -> tuple[Any, Any]:
    """verl's estimator signature; the batch itself comes from :func:`current_batch`.

    Returns ``(advantages, returns)``, each ``(rows, response_length)``: the row's step value
    times the row's own ``response_mask``.
    """
    data = current_batch()
    if data is None:
        raise RuntimeError(
            "the proxmo estimator needs the whole batch, published by verl's compute_advantage; "
            "call verl.trainer.ppo.ray_trainer.compute_advantage (patched when this plugin is "
            "installed: import verl, or proxmo_client.integrations.verl.install()), or "
            "compute_proxmo_advantages(data, config) directly"
        )
    return compute_proxmo_advantages(
        data, config_from_algorithm(config), dtype=token_level_rewards.dtype
    )


def compute_proxmo_advantages(
    data: Any, settings: ServiceConfig | None = None, *, dtype: Any = None
) -> tuple[Any, Any]:
    """(advantages, returns) for a verl ``DataProto`` with one row per step (see module doc).

    Sends one ``ComputeAdvantages`` request for the whole batch.
    """
    import torch

    settings = settings or ServiceConfig()
    request, plan = request_from_batch(data, settings)
    response = settings.client().compute_advantages(request, timeout=settings.timeout)
    mask = data.batch["response_mask"]
    dtype = dtype or torch.float32
    out = []
    for name in ("advantages", "returns"):
        per_row = torch.as_tensor(advantages_for_rows(response, plan, name), device=mask.device)
        out.append(per_row.to(dtype).unsqueeze(-1) * mask.to(dtype))
    return out[0], out[1]


def request_from_batch(data: Any, settings: ServiceConfig) -> tuple[Any, RowPlan]:
    """The ``ComputeAdvantagesRequest`` for a verl batch, and its row plan."""
    non_tensor = data.non_tensor_batch
    for key in ("uid", "traj_uid", "anchor_obs", "rewards"):
        if key not in non_tensor:
            raise BuildError(
                f"non_tensor_batch['{key}']",
                "is required by adv_estimator=proxmo (one entry per step row; see "
                "proxmo_client.integrations.verl)",
            )
    if "response_mask" not in data.batch.keys():
        raise BuildError("batch['response_mask']", "is required by adv_estimator=proxmo")
    valid = non_tensor.get("is_action_valid")
    invalid = None if valid is None else ~np.asarray(valid, dtype=bool)
    steps = non_tensor.get(STEP_INDEX_KEY)
    row_keys = None
    if steps is None and "input_ids" in data.batch.keys():
        row_keys = _token_keys(data.batch["input_ids"])
    try:
        return rows_to_request(
            non_tensor["uid"],
            non_tensor["traj_uid"],
            non_tensor["anchor_obs"],
            non_tensor["rewards"],
            invalid=invalid,
            task_ids=non_tensor.get("task_id"),
            success=non_tensor.get("success"),
            step_index=None if steps is None else np.asarray(steps).astype(np.int64),
            row_keys=row_keys,
            preset=settings.preset,
            dry_run=settings.dry_run,
            **dict(settings.overrides),
        )
    except BuildError as e:
        raise _in_verl_terms(e) from None


def _token_keys(input_ids: Any) -> list[bytes]:
    """One hashable key per row: its prompt+response token ids."""
    array = input_ids.detach().cpu().numpy()
    return [row.tobytes() for row in array]


def _in_verl_terms(error: BuildError) -> BuildError:
    match = re.match(r"^(\w+)", error.field)
    if match is None or match.group(1) not in _FIELD_NAMES:
        return error
    name = _FIELD_NAMES[match.group(1)]
    return BuildError(name + error.field[match.end() :], error.message)


# ------------------------------------------------------------------- patches of verl


def _wrap_compute_advantage(original: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(original, "__proxmo_original__", None) is not None:
        return original

    @functools.wraps(original)
    def compute_advantage(data: Any, *args: Any, **kwargs: Any) -> Any:
        token = _CURRENT_BATCH.set(data)
        try:
            return original(data, *args, **kwargs)
        finally:
            _CURRENT_BATCH.reset(token)

    compute_advantage.__proxmo_original__ = original  # type: ignore[attr-defined]
    return compute_advantage


def _wrap_balance_batch(original: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(original, "__proxmo_original__", None) is not None:
        return original

    @functools.wraps(original)
    def _balance_batch(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        stamp_step_index(batch, getattr(getattr(self, "config", None), "algorithm", None))
        return original(self, batch, *args, **kwargs)

    _balance_batch.__proxmo_original__ = original  # type: ignore[attr-defined]
    return _balance_batch


def stamp_step_index(batch: Any, algorithm_config: Any) -> None:
    """Before verl reorders rows: record each row's step index from the current row order.

    Only for ``adv_estimator == "proxmo"`` batches that have ``traj_uid`` and no step index.
    """
    if str(_get(algorithm_config, "adv_estimator")) != ESTIMATOR_NAME:
        return
    non_tensor = batch.non_tensor_batch
    if "traj_uid" not in non_tensor or STEP_INDEX_KEY in non_tensor:
        return
    row_keys = _token_keys(batch.batch["input_ids"]) if "input_ids" in batch.batch.keys() else None
    non_tensor[STEP_INDEX_KEY] = derive_step_index(non_tensor["traj_uid"], row_keys)


def _patch_core_algos(module: Any) -> None:
    if module.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME) is not proxmo_advantage_estimator:
        module.register_adv_est(ESTIMATOR_NAME)(proxmo_advantage_estimator)


def _patch_ray_trainer(module: Any) -> None:
    module.compute_advantage = _wrap_compute_advantage(module.compute_advantage)
    trainer = getattr(module, "RayPPOTrainer", None)
    if trainer is not None and hasattr(trainer, "_balance_batch"):
        trainer._balance_batch = _wrap_balance_batch(trainer._balance_batch)


def _patch_v1_utils(module: Any) -> None:
    module.compute_advantage = _wrap_compute_advantage(module.compute_advantage)


_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    CORE_ALGOS: _patch_core_algos,
    RAY_TRAINER: _patch_ray_trainer,
    V1_UTILS: _patch_v1_utils,
}


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the module's patch."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._patch = patch

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._patch(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the patched verl modules with the other finders and wraps their loaders."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def install() -> None:
    """Register the estimator and wrap verl's dispatch, now for loaded modules and on import
    for the others. Idempotent; run on import of this module."""
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)


install()
