"""End-to-end example tests. The example runs in .venv-examples (TextWorld) as a subprocess
against a real proxmo-server (main venv) and the real Redis; pure-torch parts of the example
(the policy) are tested in-process here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = ROOT / "clients" / "examples"
EXAMPLES_PY = Path(
    os.environ.get("PROXMO_EXAMPLES_PYTHON", ROOT / ".venv-examples" / "bin" / "python")
)
REDIS_URL = os.environ.get("PROXMO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# The policy module needs only numpy and torch: importable from the main venv.
sys.path.insert(0, str(EXAMPLES_DIR))


@pytest.fixture(scope="session")
def examples_python() -> Path:
    if not EXAMPLES_PY.exists():
        message = f"{EXAMPLES_PY} is missing: run `make examples-venv`"
        if os.environ.get("PROXMO_EXAMPLES_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return EXAMPLES_PY
