"""The Dockerfile, checked without a Docker engine: hadolint passes, and its structure keeps the
rules of the deployment issue (multi-stage, pinned bases, non-root numeric user, exec-form
proxmo-server entrypoint, HEALTHCHECK on /livez, ports = the server's defaults, nothing the build
copies is excluded by .dockerignore). deploy/docker/deps_except.py is run for real."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import tomllib
from proxmo.server.config import Settings

from .conftest import ROOT, tool

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in _instructions():
        if word == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((word, rest))
    return stages


def test_hadolint_passes() -> None:
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    """The linter is live: an unpinned base and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nUSER root\nCMD python\n")
    result = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3002" in result.stdout


def test_runtime_stages() -> None:
    stages = _stages()
    assert {"cpu-builder", "cpu", "gpu-builder", "gpu"} <= set(stages)
    defaults = Settings()
    for name in ("cpu", "gpu"):
        instructions = stages[name]
        words = [w for w, _ in instructions]
        user = [r for w, r in instructions if w == "USER"]
        assert user and re.fullmatch(r"[1-9]\d*:\d+", user[-1]), f"{name}: numeric non-root USER"
        entrypoint = [r for w, r in instructions if w == "ENTRYPOINT"]
        assert entrypoint and json.loads(entrypoint[-1]) == ["proxmo-server"], name
        health = [r for w, r in instructions if w == "HEALTHCHECK"]
        assert health and health[-1].endswith('CMD ["proxmo-probe", "/livez"]'), name
        exposed = {int(p) for w, r in instructions if w == "EXPOSE" for p in r.split()}
        assert exposed == {defaults.grpc_port, defaults.http_port}, name
        assert any(w == "VOLUME" and "/var/cache/proxmo" in r for w, r in instructions)
        assert ("STOPSIGNAL", "SIGTERM") in instructions
        assert "ADD" not in words
        copies = [r for w, r in instructions if w == "COPY"]
        assert any(r.startswith(f"--from={name}-builder /opt/venv") for r in copies), name
    cpu_env = " ".join(r for w, r in stages["cpu"] if w == "ENV")
    assert "PROXMO_ENCODER_BACKEND=torch-cpu" in cpu_env
    assert "HF_HUB_OFFLINE=1" in cpu_env


def test_bases_are_pinned() -> None:
    text = DOCKERFILE.read_text()
    for base in re.findall(r"^FROM (\S+)", text, flags=re.M):
        if "${" in base or base == "scratch":  # an ARG (checked below), an empty stage
            continue
        assert re.search(r":\d+\.\d+\.\d+", base), f"unpinned base {base}"
    python = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.M)
    assert python and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-bookworm", python.group(1))
    ngc = re.search(r"^ARG NGC_PYTORCH_IMAGE=(\S+)$", text, flags=re.M)
    assert ngc and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", ngc.group(1))
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for an allowlist: last match wins."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        hit = fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or (
            pat.startswith("**/") and any(fnmatch.fnmatch(part, pat[3:])
                                          for part in path.split("/")))
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = set()
    for word, rest in _instructions():
        if word == "COPY" and "--from=" not in rest:
            args = [a for a in rest.split() if not a.startswith("--")]
            sources.update(args[:-1])
    assert sources >= {"pyproject.toml", "README.md", "service", "clients/python"}
    for source in sorted(sources):
        # build/wheelhouse/ is made by `make deploy-up` (the offline build) before it is copied.
        assert source.startswith("build/wheelhouse/") or (ROOT / source).exists(), source
        assert not _ignored(source.rstrip("/").split("*")[0].rstrip("/-"), patterns), \
            f"{source} is excluded by .dockerignore"
    for excluded in (".venv", ".git", "tests", "clients/node", ".tools"):
        assert _ignored(excluded, patterns), excluded


def test_deps_except_drops_torch_and_keeps_the_rest() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy/docker/deps_except.py"), "torch,proxmo-client",
         "pyproject.toml", "clients/python/pyproject.toml"],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=True,
    )
    listed = result.stdout.split("\n")
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = [r for r in server if not re.match(r"(torch|proxmo-client)\b", r)
                or r.startswith("torch-")]
    assert [r for r in listed if r in server] == expected
    assert not any(re.match(r"torch\s*[<>=]", r) for r in listed)
    assert any(r.startswith("sentence-transformers") for r in listed)
