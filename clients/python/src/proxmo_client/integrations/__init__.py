"""Trainer integrations of the proxmo client.

- :mod:`proxmo_client.integrations.rows`: any framework's per-step rows -> one request -> one
  advantage per row -> token advantages (copied and reordered rows handled).
- :mod:`proxmo_client.integrations.verl`: the ``verl.plugins`` entry point that registers
  ``algorithm.adv_estimator=proxmo`` (extra ``[verl]``).
- :mod:`proxmo_client.integrations.trl`: ``ProxmoGRPOTrainer``, a ``trl.GRPOTrainer`` that
  trains on the service's per-turn advantages (extra ``[trl]``).

Importing this package (or ``rows``) imports neither verl, TRL nor torch.
"""

from proxmo_client.integrations.rows import (
    RowPlan,
    advantages_for_rows,
    derive_step_index,
    rows_to_request,
    token_advantages_for_rows,
)
from proxmo_client.integrations.service import ServiceConfig

__all__ = [
    "RowPlan",
    "ServiceConfig",
    "advantages_for_rows",
    "derive_step_index",
    "rows_to_request",
    "token_advantages_for_rows",
]
