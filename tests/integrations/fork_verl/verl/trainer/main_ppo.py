"""The fork's entry point: ``ray.init(**config["ray_init"])``, then fit() runs in a TaskRunner
actor, a separate worker process (where an install() made in the driver never arrives)."""

from __future__ import annotations

from typing import Any

import ray


@ray.remote(num_cpus=1)
class TaskRunner:
    def run(self, config: dict[str, Any], batch: Any) -> dict[str, Any]:
        import sys

        from verl.trainer.ppo.ray_trainer import RayPPOTrainer

        out = RayPPOTrainer(config).fit_batch(batch)
        return {
            "advantages": out.batch["advantages"].numpy(),
            "non_tensor_batch": out.non_tensor_batch,
            "computed_by": out.meta_info.get("computed_by", "service"),
            "wrapper_loaded": "proxmo_client.integrations.verl" in sys.modules,
        }


def run_ppo(config: dict[str, Any], batch: Any, runtime_env: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """``runtime_env``: the TaskRunner actor's own (merged over the job's)."""
    if not ray.is_initialized():
        ray.init(**config.get("ray_init", {}))
    runner = TaskRunner.options(runtime_env=runtime_env or {}).remote()  # type: ignore[attr-defined]
    return ray.get(runner.run.remote(config, batch))  # type: ignore[no-any-return]
