#!/usr/bin/env python3
"""Print the requirements a wheelhouse lacks for another Python than the one that made it.

pip evaluates environment markers against the interpreter it runs on: a wheelhouse made by the
host's Python 3.11.7 lacks, say, ``async-timeout; python_full_version < "3.11.3"``, which the
image's Debian Python 3.11.2 needs. This reads every wheel's ``Requires-Dist``, evaluates the
markers in the target's environment (a JSON object of PEP 508 marker values, as
``packaging.markers.default_environment()`` prints it there) and prints, one a line, each
requirement that no wheel of the folder satisfies. Empty output: the wheelhouse is complete.

    wheelhouse_gaps.py build/wheelhouse target-env.json
"""

from __future__ import annotations

import json
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version


def _requires(wheel: Path) -> list[Requirement]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(archive.read(name).decode("utf-8"))
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


def gaps(folder: Path, environment: dict[str, str]) -> list[str]:
    """Requirements of the wheels, live in ``environment`` (no extra asked for), that no wheel
    of ``folder`` satisfies (missing, or only at a version outside the specifier)."""
    wheels = sorted(folder.glob("*.whl"))
    versions: dict[str, list[Version]] = {}
    for wheel in wheels:
        name, version, _, _ = parse_wheel_filename(wheel.name)
        versions.setdefault(name, []).append(version)
    missing: set[str] = set()
    for wheel in wheels:
        for requirement in _requires(wheel):
            if requirement.marker and not requirement.marker.evaluate({**environment,
                                                                        "extra": ""}):
                continue
            have = versions.get(canonicalize_name(requirement.name), [])
            if not any(requirement.specifier.contains(v, prereleases=True) for v in have):
                requirement.marker = None
                missing.add(str(requirement))
    return sorted(missing)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    environment = json.loads(Path(argv[2]).read_text())
    for requirement in gaps(Path(argv[1]), environment):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
