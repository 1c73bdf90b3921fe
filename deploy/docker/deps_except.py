#!/usr/bin/env python3
"""Print the runtime requirements of pyproject files, leaving out the named distributions.

The GPU image keeps the torch / Torch-TensorRT that its NGC base ships. NGC's torch carries a
pre-release version (``2.13.0a0+...``) that does not satisfy ``torch>=2.13``, so the image
installs the other requirements from this list and the two proxmo packages with ``--no-deps``:
the pyproject files stay the one source of truth for the dependency list.

    deps_except.py torch,proxmo-client pyproject.toml clients/python/pyproject.toml
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib


def _name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement (PEP 503 normalization)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(paths: list[str], excluded: set[str]) -> list[str]:
    """``[project].dependencies`` of every file, in order, without the excluded names."""
    out: list[str] = []
    for path in paths:
        project = tomllib.loads(Path(path).read_text())["project"]
        for requirement in project.get("dependencies", []):
            if _name(requirement) not in excluded and requirement not in out:
                out.append(requirement)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: deps_except.py NAME[,NAME...] PYPROJECT...", file=sys.stderr)
        return 2
    excluded = {_name(n) for n in argv[1].split(",") if n}
    print("\n".join(requirements(argv[2:], excluded)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
