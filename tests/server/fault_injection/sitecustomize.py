"""Fault injection for tests/server/test_numerical_safety.py, loaded by Python's own startup hook
(``site`` imports ``sitecustomize`` from PYTHONPATH) in the server and in its fork server, hence
in every compute worker. No product code knows about it.

It plays a validation hole: after the real stage 1 has validated a request whose request_id
starts with ``inflate-``, every reward becomes 1e308, which no accepted request can carry, so
the estimator overflows and the server's last guard (NonFiniteResult) has to act.
"""

import dataclasses
import os

if os.environ.get("PROXMO_TEST_FAULT") == "inflate-rewards":
    import numpy as np
    import proxmo.engine as engine

    _real_prepare = engine.prepare

    def _prepare(request, *args, **kwargs):  # type: ignore[no-untyped-def]
        prepared = _real_prepare(request, *args, **kwargs)
        if request.request_id.startswith("inflate-"):
            batch = dataclasses.replace(prepared.batch,
                                        rewards=np.full(prepared.batch.n_rows, 1e308))
            prepared = dataclasses.replace(prepared, batch=batch)
        return prepared

    engine.prepare = _prepare
