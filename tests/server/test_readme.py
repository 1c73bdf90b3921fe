"""The README stays true: its trainer snippet runs against a real server, its CLI command runs,
and every file it links to exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

from .conftest import ROOT, ServerProcess

README = (ROOT / "README.md").read_text()


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_trainer_snippet_runs_against_a_real_server(server: ServerProcess) -> None:
    [snippet] = [b for b in _python_blocks(README) if "ProxmoClient(" in b]
    # the README talks to the default port; this test's server has its own
    code = snippet.replace('"localhost:50051"', repr(server.grpc_target))
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    token_adv = namespace["token_adv"]
    step_adv = namespace["step_adv"]
    assert isinstance(token_adv, np.ndarray) and token_adv.shape == (4, 16)
    assert np.all(np.isfinite(token_adv))
    # every token of a row carries that row's step advantage
    assert np.array_equal(token_adv, np.repeat(np.asarray(step_adv)[:, None], 16, axis=1))
    namespace["client"].close()  # type: ignore[attr-defined]


def test_cli_command_runs(tmp_path: Path) -> None:
    [command] = [line.split("#")[0].strip() for line in README.splitlines()
                 if line.startswith(".venv/bin/proxmo compute")]
    command = command.replace("/tmp/advantages.json", str(tmp_path / "out.json"))
    subprocess.run(command, shell=True, check=True, cwd=ROOT)  # noqa: S602 (our own README)
    assert '"advantages"' in (tmp_path / "out.json").read_text()


def test_linked_files_exist() -> None:
    links = re.findall(r"\]\(((?:docs|clients|deploy|service|protos|tests)/[^)#]+)\)", README)
    assert links, "the README links its docs"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
    for path in re.findall(r"`((?:docs|deploy|clients|service|protos)/[\w./-]+)`", README):
        assert (ROOT / path).exists(), f"README names a missing path: {path}"
