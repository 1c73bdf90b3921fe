"""Fuzzing one real server over gRPC and REST with hypothesis-generated requests, valid and
malformed (``fuzzing.py``). Only OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED ever comes back,
both doors agree, every OK answer is finite and shaped like its request, and the server stays
healthy (same process, ready, no internal error). ``PROXMO_FUZZ_CASES`` sets the number of
cases per test (``make soak``: 10,000).

The server runs as deployed by default: with the sentence encoder (torch on CPU), so every
similarity a request can name is servable; ``--similarity tfidf`` keeps the default cheap.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import grpc
import httpx
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxmo_client.v1 import proxmo_pb2 as pb
from server.conftest import make_request

from hardening.conftest import FUZZ_CASES, ServerProcess
from hardening.fuzzing import (
    ALLOWED_CODES,
    advantages_of,
    check_shaped_like,
    edge_requests,
    grpc_outcome,
    json_float32_overflow,
    parse_rest_answer,
    requests,
    rest_body,
    stream_of_requests,
)

FUZZ = settings(max_examples=FUZZ_CASES, deadline=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
COMPUTE = "/proxmo.v1.CreditAssignmentService/ComputeAdvantages"
CORNER_CASES = max(20, FUZZ_CASES // 4)  # up to 9,000 steps each: a quarter of the cases


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(
        ["--similarity", "tfidf", "--encoder-backend", "torch-cpu", "--encoder-threads", "1"],
        tmp_path_factory.mktemp("fuzz") / "server.log", encoder=True,
    ) as server:
        server.wait_ready(timeout=180)
        yield server


@pytest.fixture(scope="module")
def http(fuzz_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.http_url, timeout=60) as client:
        yield client


def test_fuzz_both_doors(fuzz_server: ServerProcess, http: httpx.Client) -> None:
    compute = fuzz_server.stub.ComputeAdvantages
    outcomes: Counter[str] = Counter()

    @FUZZ
    @given(request=requests)
    def case(request: pb.ComputeAdvantagesRequest) -> None:
        code, response, details = grpc_outcome(compute, request)
        outcomes[code.name] += 1
        assert code in ALLOWED_CODES, (code, details)
        if response is not None:
            check_shaped_like(request, response)
        answer = http.post("/v1/advantages", content=rest_body(request),
                           headers={"content-type": "application/json"})
        rest_code, rest_response = parse_rest_answer(answer.status_code, answer.text)
        if rest_code != code.name and json_float32_overflow(answer.text):
            return  # the JSON mapping cannot carry this float32 (see json_float32_overflow)
        assert rest_code == code.name, (rest_code, code, details, answer.text[:300])
        if rest_response is not None:
            check_shaped_like(request, rest_response)
            if request.dry_run:  # nothing written in between: the same numbers
                assert advantages_of(rest_response) == advantages_of(response)  # type: ignore[arg-type]

    case()
    print(f"\nfuzz, both doors: {dict(outcomes)}")
    assert sum(outcomes.values()) >= FUZZ_CASES  # every case ran
    assert outcomes["OK"] > 0, outcomes  # and valid requests were among them


def test_fuzz_corners_both_doors(fuzz_server: ServerProcess, http: httpx.Client) -> None:
    """docs/algorithm.md section 5a at the corners (fuzzing.edge_requests): a request whose every
    value is within its accepted range is answered OK on both doors, finite and shaped like
    it, however extreme (+-1e15 rewards, subnormals, -0.0, tau 5e-324 or 1e308, groups of one,
    1000-step trajectories); one value beyond its bound is refused on both doors with
    INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming a field, never answered."""
    compute = fuzz_server.stub.ComputeAdvantages
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=CORNER_CASES)
    @given(valid=st.booleans(), data=st.data())
    def case(valid: bool, data: st.DataObject) -> None:
        request = data.draw(edge_requests(valid))
        code, response, details = grpc_outcome(compute, request)
        outcomes[f"{'valid' if valid else 'beyond'}:{code.name}"] += 1
        answer = http.post("/v1/advantages", content=rest_body(request),
                           headers={"content-type": "application/json"})
        rest_code, rest_response = parse_rest_answer(answer.status_code, answer.text)
        assert rest_code == code.name, (rest_code, code, details, answer.text[:300])
        if valid:
            assert code == grpc.StatusCode.OK, (code, details)
            check_shaped_like(request, response)  # type: ignore[arg-type]
            check_shaped_like(request, rest_response)  # type: ignore[arg-type]
        else:
            assert code in ALLOWED_CODES - {grpc.StatusCode.OK}, (code, details)
            assert answer.json()["error"]["field"], answer.text[:300]

    case()
    print(f"\nfuzz, corners, both doors: {dict(sorted(outcomes.items()))}")
    assert outcomes["valid:OK"] > 0 and sum(outcomes.values()) >= CORNER_CASES


def test_fuzz_streams(fuzz_server: ServerProcess) -> None:
    """A stream answers its requests in order until the first refused one, whose status ends
    the stream (one of the allowed codes)."""

    @settings(FUZZ, max_examples=max(10, FUZZ_CASES // 4))
    @given(batch=stream_of_requests())
    def case(batch: list[pb.ComputeAdvantagesRequest]) -> None:
        answered: list[pb.ComputeAdvantagesResponse] = []
        code = grpc.StatusCode.OK
        try:
            for response in fuzz_server.stub.StreamAdvantages(iter(batch), timeout=120):
                answered.append(response)
        except grpc.RpcError as error:
            code = error.code()
            assert code in ALLOWED_CODES, (code, error.details())
            assert error.details().startswith(f"requests[{len(answered)}]"), error.details()
        assert len(answered) == len(batch) if code == grpc.StatusCode.OK else \
            len(answered) < len(batch)
        for request, response in zip(batch, answered, strict=False):
            check_shaped_like(request, response)

    case()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """Flip, drop, insert or truncate bytes of a serialized message."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        kind = rng.randrange(4)
        if not out:
            break
        at = rng.randrange(len(out))
        if kind == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del out[at]
        elif kind == 2:
            out.insert(at, rng.randrange(256))
        else:
            del out[at:]
    return bytes(out)


def test_fuzz_wire_bytes(fuzz_server: ServerProcess, http: httpx.Client) -> None:
    """Corrupt protobuf over gRPC (including invalid UTF-8 in strings) and corrupt JSON over
    REST: refused as INVALID_ARGUMENT naming the request, or (when the bytes still decode)
    answered like any other request."""
    raw_compute = fuzz_server.channel.unary_unary(COMPUTE)
    base = make_request(groups=2, per_group=3, steps=3, dry_run=True)
    serialized = base.SerializeToString()
    body = rest_body(base).encode()

    @settings(FUZZ, max_examples=max(10, FUZZ_CASES // 2))
    @given(seed=st.integers(0, 2**32 - 1))
    def case(seed: int) -> None:
        rng = random.Random(seed)
        data = _mutate(serialized, rng)
        try:
            raw = raw_compute(data, timeout=60)
        except grpc.RpcError as error:
            assert error.code() in ALLOWED_CODES, (error.code(), error.details())
            if "cannot be decoded" in (error.details() or ""):
                assert error.details().startswith("request: ")
        else:
            request = pb.ComputeAdvantagesRequest.FromString(data)
            check_shaped_like(request, pb.ComputeAdvantagesResponse.FromString(raw))
        answer = http.post("/v1/advantages", content=_mutate(body, rng))
        parse_rest_answer(answer.status_code, answer.text)

    case()


PREFETCH = "/proxmo.v1.CreditAssignmentService/PrefetchStates"


def test_fuzz_prefetch_states(fuzz_server: ServerProcess, http: httpx.Client) -> None:
    """PrefetchStates with arbitrary texts (any unicode, duplicates, empty) and corrupt wire
    bytes and JSON: only OK / INVALID_ARGUMENT / RESOURCE_EXHAUSTED, and every OK answer
    accounts for each distinct text exactly once."""
    prefetch = fuzz_server.stub.PrefetchStates
    raw_prefetch = fuzz_server.channel.unary_unary(PREFETCH)
    texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)

    @FUZZ
    @given(states=st.lists(texts | st.sampled_from(["", "Nothing happens."]), max_size=8),
           wait=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def case(states: list[str], wait: bool, seed: int) -> None:
        request = pb.PrefetchStatesRequest(states=states, wait=wait)
        answer = prefetch(request, timeout=60)  # every such request is valid: it must succeed
        assert answer.distinct_states == len(set(states))
        assert (answer.cached_states + answer.queued_states + answer.dropped_states
                == answer.distinct_states)
        rng = random.Random(seed)
        try:
            raw_prefetch(_mutate(request.SerializeToString(), rng), timeout=60)
        except grpc.RpcError as error:
            assert error.code() in ALLOWED_CODES, (error.code(), error.details())
        body = _mutate(json_format.MessageToJson(request).encode(), rng)
        rest = http.post("/v1/prefetch", content=body)
        assert rest.status_code in (200, 413, 422), (rest.status_code, rest.text[:300])
        if rest.status_code != 200:
            assert rest.json()["error"]["field"], rest.text

    case()


def test_invalid_utf8_and_garbage_are_invalid_argument(fuzz_server: ServerProcess) -> None:
    raw_compute = fuzz_server.channel.unary_unary(COMPUTE)
    good = make_request(dry_run=True).SerializeToString()
    for data in (good.replace(b"You are", b"\xff\xfe are", 1), b"\x0a\xff\xff\xff", b"\xff"):
        with pytest.raises(grpc.RpcError) as caught:
            raw_compute(data, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("request: cannot be decoded")
    # In a stream the bad request is named by its index, after the answers before it.
    stream = fuzz_server.channel.stream_stream(
        "/proxmo.v1.CreditAssignmentService/StreamAdvantages")
    answers = []
    with pytest.raises(grpc.RpcError) as caught:
        for answer in stream(iter([good, good, b"\xff"]), timeout=30):
            answers.append(answer)
    assert len(answers) == 2
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("requests[2]: cannot be decoded")


def test_server_stayed_healthy(fuzz_server: ServerProcess) -> None:
    """Last in this module: the fuzzed server is the same process, ready, and never failed."""
    assert fuzz_server.proc.poll() is None
    assert httpx.get(f"{fuzz_server.http_url}/readyz", timeout=5).status_code == 200
    assert fuzz_server.metric("proxmo_rejected_total", reason="internal") == 0
    assert fuzz_server.metric("proxmo_requests_total", transport="grpc",
                              rpc="ComputeAdvantages", code="OK") > 0
    logs = fuzz_server.logs()
    assert "Traceback" not in logs and "internal error" not in logs, logs[-3000:]
