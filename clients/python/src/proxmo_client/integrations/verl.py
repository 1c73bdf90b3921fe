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

``adv_estimator=hgpo`` and ``adv_estimator=graphgpo`` (PRESET_ESTIMATORS) are served the same
way, with the preset of that name unless ``algorithm.proxmo.preset`` names another.

``install(server, preset, overrides)`` (or the environment: ``PROXMO_SERVER``, ``PROXMO_PRESET``,
``PROXMO_OVERRIDES`` as a JSON object, ``PROXMO_TOKEN``) sets process-wide defaults under
``algorithm.proxmo``.

**verl-agent forks** (verl 0.3-era: no registry, no entry points, their own ``proxmo``/``gigpo``
branches): ``install()`` never raises there either. With a server configured
(``install(server=...)`` or ``PROXMO_SERVER``) the wrapped ``compute_advantage`` sends those
estimators to the service ahead of the fork's own branches, translating the fork's arguments
(:mod:`proxmo_client.integrations.verl_fork`; also ``copies=`` / ``PROXMO_COPIES`` and
``returns=`` / ``PROXMO_RETURNS``). Where advantages are computed in a Ray actor, install it there
too: ``ray_init.runtime_env.worker_process_setup_hook=proxmo_client.integrations.verl.install``;
``ray.init`` without that hook in a process where a fork or an explicit server was seen logs a
warning.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import importlib.abc
import importlib.machinery
import inspect
import json
import logging
import os
import re
import sys
import warnings
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
    "ENVIRONMENT",
    "ESTIMATOR_NAME",
    "PRESET_ESTIMATORS",
    "FORK_ESTIMATORS",
    "SETUP_HOOK",
    "check_ray_runtime_env",
    "compute_proxmo_advantages",
    "config_from_algorithm",
    "current_batch",
    "fork_options",
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
RAY = "ray"
# Estimators that verl-agent forks branch on themselves (no registry): served when a server is set.
FORK_ESTIMATORS = ("proxmo", "gigpo")
# Further names registered in verl's registry, served like "proxmo" with the preset of the same
# name unless algorithm.proxmo (or install() / PROXMO_PRESET) names one: verl-agent's HGPO and
# GraphGPO estimators, computed by the service.
PRESET_ESTIMATORS = ("hgpo", "graphgpo")
# install()'s settings and their environment twins (read at each call, so a Ray worker's
# environment counts). PROXMO_OVERRIDES is a JSON object of EstimatorConfig fields.
ENVIRONMENT = {
    "server": "PROXMO_SERVER",
    "preset": "PROXMO_PRESET",
    "overrides": "PROXMO_OVERRIDES",
    "token": "PROXMO_TOKEN",
    "copies": "PROXMO_COPIES",
    "returns": "PROXMO_RETURNS",
}
SETUP_HOOK = "proxmo_client.integrations.verl.install"

logger = logging.getLogger(__name__)
_INSTALLED: dict[str, Any] = {}  # install()'s explicit arguments (win over the environment)
_FORK: dict[str, Any] = {}  # "trainer_config": the fork trainer's config; "seen": a fork loaded
_WARNED: set[str] = set()

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
    """``algorithm.proxmo`` of verl's ``config.algorithm`` (DictConfig, AlgoConfig, dict, None),
    over the defaults of :func:`install` and the environment."""
    defaults = _service_values()
    node = _get(config, "proxmo")
    values = {} if node is None else _plain(node)
    if not isinstance(values, Mapping):
        raise BuildError("algorithm.proxmo", f"expected a mapping, got {type(node).__name__}")
    overrides = {**(defaults.get("overrides") or {}), **(values.get("overrides") or {})}
    merged = {**defaults, **values}
    if overrides:
        merged["overrides"] = overrides
    return ServiceConfig.from_mapping(merged, "algorithm.proxmo")


def _settings() -> dict[str, Any]:
    """install()'s explicit arguments over their ``PROXMO_*`` environment twins."""
    values: dict[str, Any] = {}
    for name, variable in ENVIRONMENT.items():
        raw = os.environ.get(variable)
        if raw:
            values[name] = raw
    if "overrides" in values:
        try:
            values["overrides"] = json.loads(values["overrides"])
        except ValueError as e:
            raise BuildError(ENVIRONMENT["overrides"], f"expected a JSON object: {e}") from None
        if not isinstance(values["overrides"], dict):
            raise BuildError(ENVIRONMENT["overrides"], "expected a JSON object of config fields")
    values.update(_INSTALLED)
    return values


def _service_values() -> dict[str, Any]:
    values = _settings()
    return {k: values[k] for k in ("server", "preset", "overrides", "token") if k in values}


def fork_options() -> Any:
    """The :class:`~proxmo_client.integrations.verl_fork.ForkOptions` the fork wrapper uses, or
    None when no server is configured (then the fork's own code runs)."""
    from proxmo_client.integrations.verl_fork import ForkOptions  # it imports this module

    values = _settings()
    if not values.get("server"):
        return None
    service = ServiceConfig.from_mapping(_service_values(), "install")
    return ForkOptions(
        service=service,
        copies=str(values.get("copies", "merge")),
        returns=str(values.get("returns", "discounted")),
    )


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


def _wrap_compute_advantage(
    original: Callable[..., Any], fork_estimators: frozenset[str] = frozenset()
) -> Callable[..., Any]:
    """``original`` publishing its batch for the registered estimator; in a fork, the
    ``fork_estimators`` it branches on itself go to the service when a server is configured."""
    if getattr(original, "__proxmo_original__", None) is not None:
        return original

    signature = inspect.signature(original) if fork_estimators else None

    @functools.wraps(original)
    def compute_advantage(data: Any, *args: Any, **kwargs: Any) -> Any:
        if signature is not None:
            served = _fork_call(signature, fork_estimators, data, args, kwargs)
            if served is not None:
                return served()
        token = _CURRENT_BATCH.set(data)
        try:
            return original(data, *args, **kwargs)
        finally:
            _CURRENT_BATCH.reset(token)

    compute_advantage.__proxmo_original__ = original  # type: ignore[attr-defined]
    return compute_advantage


def _fork_call(
    signature: inspect.Signature,
    fork_estimators: frozenset[str],
    data: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Callable[[], Any] | None:
    """The service's computation for this fork call, or None to run the fork's own code."""
    try:
        bound = signature.bind(data, *args, **kwargs)
    except TypeError:
        return None  # the fork's own call raises its own error
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    estimator = _estimator_value(arguments.get("adv_estimator"))
    if estimator not in fork_estimators:
        return None
    options = fork_options()
    if options is None:
        _warn_once(
            "no-server",
            f"proxmo: adv_estimator={estimator} runs the fork's in-process code: no server is "
            f"configured in this process (install(server=...) or {ENVIRONMENT['server']})",
        )
        return None
    from proxmo_client.integrations.verl_fork import compute_fork_advantages

    return functools.partial(
        compute_fork_advantages, data, estimator, arguments, options, _FORK.get("trainer_config")
    )


def _estimator_value(value: Any) -> str:
    """An estimator name from a string or a (str, Enum) member."""
    return str(getattr(value, "value", value))


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _wrap_balance_batch(original: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(original, "__proxmo_original__", None) is not None:
        return original

    @functools.wraps(original)
    def _balance_batch(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        stamp_step_index(batch, _get(getattr(self, "config", None), "algorithm"))
        return original(self, batch, *args, **kwargs)

    _balance_batch.__proxmo_original__ = original  # type: ignore[attr-defined]
    return _balance_batch


def _wrap_trainer_init(original: Callable[..., Any]) -> Callable[..., Any]:
    """A fork trainer's ``__init__`` that keeps its config (the invalid-action penalty lives
    there, not in compute_advantage's arguments)."""
    if getattr(original, "__proxmo_original__", None) is not None:
        return original

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _FORK["trainer_config"] = getattr(self, "config", None)

    __init__.__proxmo_original__ = original  # type: ignore[attr-defined]
    return __init__


def stamp_step_index(batch: Any, algorithm_config: Any) -> None:
    """Before verl reorders rows: record each row's step index from the current row order.

    Only for ``adv_estimator`` ``proxmo`` (or a fork's ``gigpo``, or ``hgpo`` / ``graphgpo``)
    batches that have ``traj_uid`` and no step index.
    """
    estimator = _estimator_value(_get(algorithm_config, "adv_estimator"))
    if estimator not in FORK_ESTIMATORS + PRESET_ESTIMATORS:
        return
    non_tensor = batch.non_tensor_batch
    if "traj_uid" not in non_tensor or STEP_INDEX_KEY in non_tensor:
        return
    row_keys = _token_keys(batch.batch["input_ids"]) if "input_ids" in batch.batch.keys() else None
    non_tensor[STEP_INDEX_KEY] = derive_step_index(non_tensor["traj_uid"], row_keys)


def _preset_estimator(name: str) -> Callable[..., tuple[Any, Any]]:
    """The estimator registered as ``name`` (see PRESET_ESTIMATORS): proxmo's, with preset
    ``name`` unless one is configured."""

    def estimator(
        token_level_rewards: Any,
        response_mask: Any,
        index: Any = None,
        config: Any = None,
        **_unused: Any,
    ) -> tuple[Any, Any]:
        data = current_batch()
        if data is None:  # proxmo's estimator raises the error that says how to call it
            return proxmo_advantage_estimator(token_level_rewards, response_mask, index, config)
        settings = config_from_algorithm(config)
        if not settings.preset:
            settings = dataclasses.replace(settings, preset=name)
        return compute_proxmo_advantages(data, settings, dtype=token_level_rewards.dtype)

    estimator.__name__ = estimator.__qualname__ = f"{name}_advantage_estimator"
    return estimator


_PRESET_ESTIMATOR_FNS = {name: _preset_estimator(name) for name in PRESET_ESTIMATORS}


def _patch_core_algos(module: Any) -> None:
    registry = getattr(module, "ADV_ESTIMATOR_REGISTRY", None)
    if registry is None or not hasattr(module, "register_adv_est"):
        return  # a verl-agent fork (verl 0.3): ray_trainer's wrapper serves its estimators
    if registry.get(ESTIMATOR_NAME) is not proxmo_advantage_estimator:
        module.register_adv_est(ESTIMATOR_NAME)(proxmo_advantage_estimator)
    for name, estimator in _PRESET_ESTIMATOR_FNS.items():
        if registry.get(name) is None:  # never displace an estimator verl itself ships
            module.register_adv_est(name)(estimator)


def _fork_estimators(module: Any) -> frozenset[str]:
    """The FORK_ESTIMATORS that this ray_trainer branches on itself: all of them without a
    registry, else those its own AdvantageEstimator enum names (its branch runs first)."""
    core_algos = sys.modules.get(CORE_ALGOS)
    if core_algos is not None and not hasattr(core_algos, "ADV_ESTIMATOR_REGISTRY"):
        return frozenset(FORK_ESTIMATORS)
    enums = (getattr(m, "AdvantageEstimator", None) for m in (module, core_algos))
    named = {_estimator_value(member) for enum in enums if enum is not None for member in enum}
    return frozenset(FORK_ESTIMATORS) & named


def _patch_ray_trainer(module: Any) -> None:
    fork_estimators = _fork_estimators(module)
    original = module.compute_advantage
    module.compute_advantage = _wrap_compute_advantage(original, fork_estimators)
    trainer = getattr(module, "RayPPOTrainer", None)
    if trainer is not None and hasattr(trainer, "_balance_batch"):
        trainer._balance_batch = _wrap_balance_batch(trainer._balance_batch)
    if not fork_estimators:
        return
    _FORK["seen"] = True
    if trainer is not None:
        trainer.__init__ = _wrap_trainer_init(trainer.__init__)
    for other in list(sys.modules.values()):  # names bound by `from ... import` before install
        if getattr(other, "__dict__", {}).get("compute_advantage") is original:
            setattr(other, "compute_advantage", module.compute_advantage)  # noqa: B010


def _patch_v1_utils(module: Any) -> None:
    module.compute_advantage = _wrap_compute_advantage(module.compute_advantage)


def _patch_ray(module: Any) -> None:
    init = module.init
    if getattr(init, "__proxmo_original__", None) is not None:
        return

    @functools.wraps(init)
    def ray_init(*args: Any, **kwargs: Any) -> Any:
        check_ray_runtime_env(kwargs.get("runtime_env"))
        return init(*args, **kwargs)

    ray_init.__proxmo_original__ = init  # type: ignore[attr-defined]
    module.init = ray_init


def check_ray_runtime_env(runtime_env: Any) -> bool:
    """False, with a loud warning, when Ray workers started with ``runtime_env`` would compute a
    fork's advantages without the wrapper although this process has a server configured."""
    if not (_FORK.get("seen") or "server" in _INSTALLED):
        return True
    try:
        if not _settings().get("server"):
            return True
    except BuildError:
        return True  # the bad setting is reported where it is used
    hook = _get(_plain(runtime_env), "worker_process_setup_hook")
    if hook in (SETUP_HOOK, install):
        return True
    _warn_once(
        "ray-hook",
        "proxmo: a server is configured in this process, but the Ray workers that run verl's "
        "fit() and compute_advantage will not get it: a verl-agent fork's workers compute "
        "advantages in process and the server gets no requests. Pass "
        f"ray_init.runtime_env.worker_process_setup_hook={SETUP_HOOK} and PROXMO_SERVER in "
        "the workers' environment (runtime_env.env_vars)",
    )
    return False


_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    CORE_ALGOS: _patch_core_algos,
    RAY_TRAINER: _patch_ray_trainer,
    V1_UTILS: _patch_v1_utils,
    RAY: _patch_ray,
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
        _apply(self._patch, module)


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


def _apply(patch: Callable[[ModuleType], None], module: ModuleType) -> None:
    """A patch that fails leaves the module as verl made it, and says so: never break verl."""
    try:
        patch(module)
    except Exception:
        logger.exception("proxmo: could not patch %s; it runs unchanged", module.__name__)


def install(
    server: str | None = None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    copies: str | None = None,
    returns: str | None = None,
    token: str | None = None,
) -> bool:
    """Register the estimator and wrap verl's dispatch, now for loaded modules and on import
    for the others; idempotent; run on import of this module.

    Arguments given (not None) become process-wide settings over their ``PROXMO_*`` twins
    (:data:`ENVIRONMENT`): the defaults under ``algorithm.proxmo``, and in a verl-agent fork the
    service that its ``proxmo``/``gigpo`` estimators use. Never raises: on failure it logs why,
    leaves no import hook behind and returns False. Ray calls it with no arguments as a
    ``worker_process_setup_hook``.
    """
    given = {"server": server, "preset": preset, "overrides": overrides, "copies": copies,
             "returns": returns, "token": token}  # fmt: skip
    finder = next((f for f in sys.meta_path if isinstance(f, _PatchOnImport)), None)
    added = finder is None
    before = dict(_INSTALLED)
    try:
        _INSTALLED.update({k: v for k, v in given.items() if v is not None})
        if "overrides" in _INSTALLED:
            _INSTALLED["overrides"] = dict(_INSTALLED["overrides"])
        if finder is None:
            finder = _PatchOnImport()
            sys.meta_path.insert(0, finder)
        for name, patch in _PATCHES.items():
            module = sys.modules.get(name)
            if module is not None:
                patch(module)
        if _settings().get("server"):
            fork_options()  # a bad setting is reported now, and again where it is used
    except Exception as e:
        if isinstance(e, BuildError):
            logger.error("proxmo: install() failed, verl runs without the service: %s", e)
        else:
            logger.exception("proxmo: install() failed, verl runs without the service")
        _INSTALLED.clear()
        _INSTALLED.update(before)
        if added and finder in sys.meta_path:
            sys.meta_path.remove(finder)
        return False
    return True


install()
