"""`proxmo compute`: the real console script on JSON and JSON Lines files, and stdin/stdout."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from proxmo.cli import main
from proxmo.core.config import Similarity
from proxmo.engine import Engine
from proxmo.store.memory import MemoryStore
from proxmo_client.v1 import proxmo_pb2 as pb

PROXMO = Path(sys.executable).with_name("proxmo")

STATES = (
    "You arrive at cabinet 1. The cabinet 1 is closed.",
    "You open the cabinet 1. In it, you see a soapbar 1.",
    "You arrive at countertop 1. On the countertop 1, you see a apple 2.",
)


def _request(request_id: str, outcomes: tuple[bool, ...], preset: str = "paper") -> dict[str, Any]:
    """A request in the proto3 JSON mapping, camelCase."""
    trajectories = []
    for k, ok in enumerate(outcomes):
        steps = [{"state": STATES[t % 3], "reward": 0.0} for t in range(1 + k % 3)]
        steps[-1]["reward"] = 1.0 if ok else 0.0
        if k == 1:
            steps[0]["invalidAction"] = True
        trajectories.append({"trajectoryId": f"t{k}", "groupId": "g0", "steps": steps})
    return {"requestId": request_id, "config": {"preset": preset, "gamma": 0.9},
            "trajectories": trajectories}


def _snake(value: Any) -> Any:
    """The same request with snake_case field names (both spellings are accepted)."""
    names = {"requestId": "request_id", "trajectoryId": "trajectory_id", "groupId": "group_id",
             "invalidAction": "invalid_action"}
    if isinstance(value, dict):
        return {names.get(k, k): _snake(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snake(v) for v in value]
    return value


def _proxmo(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PROXMO), *args], input=stdin, capture_output=True, text=True,
                          timeout=120, check=False)


def _parse(text: str) -> pb.ComputeAdvantagesResponse:
    return json_format.Parse(text, pb.ComputeAdvantagesResponse())


def _without_timing(response: pb.ComputeAdvantagesResponse) -> pb.ComputeAdvantagesResponse:
    response.ClearField("timing")
    return response


def _in_process(requests: list[dict[str, Any]]) -> list[pb.ComputeAdvantagesResponse]:
    """The same requests through one in-process Engine (one store, like one CLI run)."""
    async def go() -> list[pb.ComputeAdvantagesResponse]:
        engine = Engine(store=MemoryStore(), embedder=None, default_similarity=Similarity.TFIDF,
                        compute_threads=1)
        try:
            return [await engine.compute(json_format.ParseDict(r, pb.ComputeAdvantagesRequest()))
                    for r in requests]
        finally:
            engine.close()
    return asyncio.run(go())


def test_json_file_camel_and_snake_give_identical_outputs(tmp_path: Path) -> None:
    request = _request("r1", (True, False, False, True))
    camel, snake = tmp_path / "camel.json", tmp_path / "snake.json"
    camel.write_text(json.dumps(request, indent=2))
    snake.write_text(json.dumps(_snake(request)))
    out = tmp_path / "out.json"
    first = _proxmo("compute", "--input", str(camel), "--output", str(out))
    assert first.returncode == 0, first.stderr
    second = _proxmo("compute", "--input", str(snake), "--similarity", "tfidf")
    assert second.returncode == 0, second.stderr

    text = out.read_text()
    assert text.startswith("{\n  ")  # indented for a single request
    assert '"trajectoryId"' in text and '"resolvedConfig"' in text  # camelCase names
    from_file, from_stdout = _parse(text), _parse(second.stdout)
    assert _without_timing(from_file) == _without_timing(from_stdout)

    (expected,) = _in_process([request])
    assert _without_timing(from_file) == _without_timing(expected)
    assert from_file.resolved_config.gamma == 0.9
    assert len(from_file.trajectories[2].advantages) == 3


def test_json_lines_one_response_per_line_sharing_history(tmp_path: Path) -> None:
    requests = [_request(f"r{k}", outcomes, preset="proxmo")
                for k, outcomes in enumerate([(True, False, False, True),
                                              (True, True, True, False),
                                              (False, False, False, True)])]
    requests.append(requests[1])  # a retried request: a replay within the run
    path = tmp_path / "batches.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in requests[:2]) + "\n\n"
                    + "\n".join(json.dumps(r) for r in requests[2:]) + "\n")
    result = _proxmo("compute", "-i", str(path), "--similarity", "tfidf")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4  # blank line skipped, one compact line per response
    responses = [_parse(line) for line in lines]
    expected = _in_process(requests)
    for got, want in zip(responses, expected, strict=True):
        assert _without_timing(got) == _without_timing(want)
    # HISTORY accumulated across the lines of the run: the second p is not its batch p.
    rho = 0.5 ** (1 / 8)
    assert math.isclose(responses[1].groups[0].success_rate, (rho * 2 + 3) / (rho * 4 + 4))
    assert responses[3].replayed and not responses[1].replayed
    assert responses[3].groups[0].success_rate == responses[1].groups[0].success_rate


def test_stdin_to_stdout_compact() -> None:
    request = _request("stdin", (True, False))
    result = _proxmo("compute", "--input", "-", "--output", "-", "--compact",
                     stdin=json.dumps(request))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert _without_timing(_parse(result.stdout)) == _without_timing(_in_process([request])[0])


def test_bad_input_exits_2_naming_the_field(tmp_path: Path) -> None:
    request = _request("bad", (True, False, True))
    request["trajectories"][2]["steps"][0]["reward"] = "NaN"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(request))
    result = _proxmo("compute", "--input", str(path))
    assert result.returncode == 2
    assert result.stderr == (
        "proxmo: error: trajectories[2].steps[0].reward: must be finite, got nan\n"
    )
    assert result.stdout == ""


def test_bad_line_of_json_lines_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _request("ok", (True, False))
    bad = _request("bad", (True, False))
    bad["config"]["tau"] = 0
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n" + json.dumps(good) + "\n")
    assert main(["compute", "-i", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == "proxmo: error: line 2: config.tau: must be > 0, got 0.0\n"
    # The answers to the lines before the bad one were written.
    assert len(captured.out.splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"trajectories": [], "bogus": 1}', "input: not a ComputeAdvantagesRequest: "),
        ('{"trajectories": [{"trajectoryId": "a", "groupId": "g"}]}', "trajectories[0].steps: "),
        ('{"config": {"preset": "nope"}, "trajectories": [{"trajectoryId": "a", "groupId": "g",'
         ' "steps": [{}]}]}', "config.preset: unknown preset 'nope'"),
        ("", "input: no request found"),
    ],
)
def test_more_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                         message: str) -> None:
    path = tmp_path / "in.json"
    path.write_text(text)
    assert main(["compute", "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"proxmo: error: {message}") and err.count("\n") == 1


def test_missing_input_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compute", "--input", "/nonexistent/request.json"]) == 2
    assert capsys.readouterr().err.startswith("proxmo: error: input: cannot read")


def test_version() -> None:
    result = _proxmo("--version")
    assert result.returncode == 0 and result.stdout.startswith("proxmo 0.1.0")


def test_lazy_embedder_has_every_method_of_the_engines_protocol() -> None:
    """The CLI's encoder stand-in is the engine's TextEmbedder, method for method, signature for
    signature (a method missing here would fail only when the engine first calls it)."""
    import inspect

    from proxmo.cli import _LazyEmbedder
    from proxmo.engine import TextEmbedder

    wanted = [name for name, member in vars(TextEmbedder).items()
              if inspect.isfunction(member) and not name.startswith("_")]
    assert {"embed_detailed", "prefetch"} <= set(wanted)
    for name in wanted:
        assert name in vars(_LazyEmbedder), f"_LazyEmbedder lacks {name}"
        assert inspect.signature(getattr(_LazyEmbedder, name)) == \
            inspect.signature(getattr(TextEmbedder, name)), name


def test_lazy_embedder_hands_prefetch_to_the_loaded_encoder() -> None:
    from proxmo.cli import _LazyEmbedder

    class LoadedEncoder:
        async def prefetch(self, texts: list[str], *, wait: bool = False) -> tuple[list[str], bool]:
            return list(texts), wait

    lazy = _LazyEmbedder()
    lazy._embedder = LoadedEncoder()  # as if loaded; loading torch would cost seconds
    assert asyncio.run(lazy.prefetch(["a", "b"], wait=True)) == (["a", "b"], True)
