"""The long runs of ``make soak``. Collected only with ``PROXMO_SOAK=1`` (``make soak`` sets it),
so ``make test`` stays within minutes."""

from __future__ import annotations

import os

from hardening.conftest import redis_server, start_server  # noqa: F401 (fixtures)

collect_ignore_glob = [] if os.environ.get("PROXMO_SOAK") == "1" else ["test_*.py"]
