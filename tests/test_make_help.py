"""`make help` lists every public target of the Makefile and mk/*.mk, one line each.

The list is generated from the `#   make TARGET  summary` lines of those files, so this test keeps
the two in step: every target declared .PHONY is documented, and every documented target exists.
A target named with a leading underscore is internal and needs no line.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILES = [ROOT / "Makefile", *sorted((ROOT / "mk").glob("*.mk"))]
HELP_LINE_MAX = 100


def phony_targets() -> set[str]:
    targets: set[str] = set()
    for makefile in MAKEFILES:
        text = makefile.read_text().replace("\\\n", " ")
        for match in re.finditer(r"^\.PHONY\s*:(.*)$", text, flags=re.MULTILINE):
            targets.update(match.group(1).split())
    return {target for target in targets if not target.startswith("_")}


@pytest.fixture(scope="module")
def help_lines() -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # A parent make (make test) passes its flags down; `make help` here runs on its own.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    result = subprocess.run(
        ["make", "--no-print-directory", "help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return result.stdout.splitlines()


def listed_targets(help_lines: list[str]) -> list[str]:
    return [line.split()[0] for line in help_lines if line.startswith("  ")]


def test_every_phony_target_is_listed(help_lines: list[str]) -> None:
    missing = phony_targets() - set(listed_targets(help_lines))
    assert not missing, f"targets with no `#   make TARGET  summary` line: {sorted(missing)}"


def test_every_listed_target_exists(help_lines: list[str]) -> None:
    unknown = set(listed_targets(help_lines)) - phony_targets()
    assert not unknown, f"`make help` lists targets no .PHONY declares: {sorted(unknown)}"


def test_one_line_each(help_lines: list[str]) -> None:
    targets = listed_targets(help_lines)
    assert len(targets) == len(set(targets)), f"a target is listed twice: {targets}"
    for line in help_lines:
        if line.startswith("  "):
            assert len(line.split(maxsplit=1)) == 2, f"no summary: {line!r}"
            assert len(line) <= HELP_LINE_MAX, f"longer than {HELP_LINE_MAX}: {line!r}"


def test_grouped_by_documenting_file(help_lines: list[str]) -> None:
    headings = [line for line in help_lines if line and not line.startswith(" ")]
    assert headings == [str(path.relative_to(ROOT)) for path in MAKEFILES]
