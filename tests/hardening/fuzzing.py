"""Hypothesis strategies for ComputeAdvantagesRequests, valid and malformed, and the checks every
answer must pass. Used by test_fuzz.py (bounded) and by ``make soak`` (10,000 cases).

Malformed on purpose: NaN, infinite and huge rewards and config values; empty, giant (over the
state limit) and arbitrary-unicode strings; empty and duplicate ids; embeddings of mismatched
sizes and non-finite values; unknown presets; enum numbers out of range (proto3 enums are open,
so any int32 arrives); thousands of groups (over the trajectory limit or not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc
from google.protobuf import json_format
from hypothesis import strategies as st
from proxmo_client.v1 import proxmo_pb2 as pb

# Codes the service may answer to any request (the contract).
ALLOWED_CODES = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                           grpc.StatusCode.RESOURCE_EXHAUSTED})
HTTP_CODES = {200: "OK", 422: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED",
              429: "RESOURCE_EXHAUSTED"}

STATES = (
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1.",
    "You arrive at cabinet 1. The cabinet 1 is closed.",
    "You open the cabinet 1. In it, you see a soapbar 1.",
    "You pick up the mug 1 from the countertop 1.",
)
MAX_STATE_CHARS = 16_384  # the server default, which the fuzz server keeps
SPECIAL_TEXTS = ("", " ", "\x00", "\u200b", "🤖 ünïcödé ∑ 日本語", "\U0010ffff",
                 "a" * MAX_STATE_CHARS)
OVERSIZE_TEXTS = ("b" * (MAX_STATE_CHARS + 1), "c" * 1_000_000)
SPECIAL_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e308, -1e308, 1e-320, math.nan, math.inf,
                  -math.inf, 1e20)

# Two families of every field: "clean" values a well-behaved trainer sends (so that many
# requests are valid and their OK answers get checked), and "any" values, malformed included.
# A request draws its family once; a malformed request still mixes in clean values.
floats = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(allow_nan=True,
                                                               allow_infinity=True))
clean_rewards = st.one_of(st.sampled_from((0.0, 0.0, 1.0, 1.0, -1.0, 10.0)),
                          st.floats(-100, 100, allow_subnormal=False))
# st.text never yields lone surrogates: proto strings must be valid UTF-8, so a client cannot
# even serialize one (the wire-level tests send invalid UTF-8 bytes instead).
clean_texts = st.one_of(st.sampled_from(STATES), st.sampled_from(SPECIAL_TEXTS),
                        st.text(max_size=30))
clean_ids = st.sampled_from(("g0", "g1", "g2", "ünï-g3"))
any_ids = st.one_of(clean_ids, st.just(""), st.text(max_size=12))


@st.composite
def configs(draw: st.DrawFn, clean: bool) -> pb.EstimatorConfig:
    presets = ("", "proxmo", "gigpo", "grpo", "rloo")
    config = pb.EstimatorConfig(preset=draw(
        st.sampled_from(presets) if clean else
        st.one_of(st.sampled_from((*presets, "nope", "PROXMO")), st.text(max_size=8))))
    for name, enum_type in (("estimator", pb.Estimator), ("episode_normalization",
                            pb.Normalization), ("step_normalization", pb.Normalization),
                            ("stats_unit", pb.StatsUnit),
                            ("success_rate_source", pb.SuccessRateSource),
                            ("similarity", pb.Similarity), ("scope", pb.Scope)):
        if draw(st.booleans()):
            numbers = [v.number for v in enum_type.DESCRIPTOR.values]
            setattr(config, name, draw(st.sampled_from(numbers) if clean else st.one_of(
                st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1))))
    ranges = {"gamma": (0.0, 1.0), "tau": (0.01, 5.0), "step_weight": (0.0, 2.0),
              "psc_alpha": (0.01, 2.0), "psc_beta": (0.0, 2.0),
              "invalid_action_penalty": (0.0, 1.0), "success_threshold": (0.0, 1.0),
              "history_half_life": (0.5, 100.0), "history_prior": (0.0, 4.0),
              "psc_range": (0.0, 0.5)}
    for name, (low, high) in ranges.items():
        if draw(st.integers(0, 3)) == 0 and not (clean and name == "psc_range"):
            setattr(config, name, draw(st.floats(low, high) if clean else floats))
    if draw(st.booleans()):
        config.psc_enabled = draw(st.booleans())
    return config


@st.composite
def trajectories(draw: st.DrawFn, index: int, dim: int, clean: bool) -> pb.Trajectory:
    ids = clean_ids if clean else any_ids
    group_id = draw(ids)
    trajectory = pb.Trajectory(
        trajectory_id=f"t{index}" if clean else draw(st.one_of(st.just(f"t{index}"), any_ids)),
        group_id=group_id,
        # Clean: one task per group, as the contract asks.
        task_id=f"task-{group_id}" if clean else draw(st.one_of(st.just(""), ids)),
    )
    if draw(st.booleans()):
        trajectory.success = draw(st.booleans())
    with_keys = draw(st.integers(0, 4)) == 0
    rewards = clean_rewards if clean else st.one_of(clean_rewards, floats)
    for _ in range(draw(st.integers(1 if clean else 0, 6))):
        step = trajectory.steps.add(state=draw(clean_texts), reward=draw(rewards),
                                    invalid_action=draw(st.integers(0, 5)) == 0)
        if with_keys:
            step.state_key = draw(clean_texts)
        if dim:
            size = dim if clean or draw(st.integers(0, 9)) else draw(st.integers(0, 10))
            values = st.floats(width=32, min_value=-1, max_value=1)
            step.state_embedding.extend(draw(st.lists(
                values if clean else st.one_of(values, st.floats(width=32)),
                min_size=size, max_size=size)))
    return trajectory


@st.composite
def small_requests(draw: st.DrawFn) -> pb.ComputeAdvantagesRequest:
    """Up to 12 trajectories of up to 6 steps, every field drawn; clean or malformed."""
    clean = draw(st.booleans())
    dim = draw(st.sampled_from((0, 0, 0, 3, 8)))
    request = pb.ComputeAdvantagesRequest(
        request_id=draw(st.one_of(st.just(""), st.text(max_size=16))),
        config=draw(configs(clean)),
        dry_run=draw(st.booleans()),
    )
    for i in range(draw(st.integers(1 if clean else 0, 12))):
        request.trajectories.append(draw(trajectories(i, dim, clean)))
    if not clean and request.trajectories and draw(st.integers(0, 3)) == 0:
        # Over the state-length limit (RESOURCE_EXHAUSTED), somewhere in the request.
        trajectory = draw(st.sampled_from(list(request.trajectories)))
        if trajectory.steps:
            trajectory.steps[-1].state = draw(st.sampled_from(OVERSIZE_TEXTS))
    return request


def many_groups_request(groups: int, steps: int) -> pb.ComputeAdvantagesRequest:
    """``groups`` groups of 2 trajectories: over the 4096-trajectory limit from 2049 groups."""
    request = pb.ComputeAdvantagesRequest(dry_run=True)
    for g in range(groups):
        for k in range(2):
            trajectory = request.trajectories.add(trajectory_id=f"t{g}-{k}", group_id=f"g{g}")
            for t in range(steps):
                trajectory.steps.add(state=STATES[(g + k + t) % len(STATES)],
                                     reward=float(k == 0 and t == steps - 1))
    return request


# --- corners (docs/algorithm.md section 5a): extreme finite values, at and beyond every bound -----

SUBNORMAL = 5e-324
MAX_ABS_REWARD = 1e15  # the service's accepted ranges (docs/server.md "Accepted value ranges")
MAX_STEPS = 1000  # the server's default max_steps_per_trajectory
EDGE_REWARDS = (MAX_ABS_REWARD, -MAX_ABS_REWARD, 1e-300, -1e-300, SUBNORMAL, -SUBNORMAL,
                2.2250738585072014e-308, -0.0, 0.0, 1.0)
BEYOND_REWARDS = (1e308, -1e308, MAX_ABS_REWARD * (1 + 1e-12), -MAX_ABS_REWARD * 1.5, 1e16)
# float32 on the wire: 1e15 and the float32 subnormal 1e-45 are exact enough to stay in range
EDGE_EMBEDDINGS = (1e15, -1e15, 1e-45, -0.0, 1e-30, 1.0)
BEYOND_EMBEDDINGS = (1e16, -3e38)
# Per numeric config field: values at its bounds (or tiny / huge where it has none) ...
EDGE_CONFIG: dict[str, tuple[float, ...]] = {
    "gamma": (0.0, 1.0, -0.0, SUBNORMAL),
    "tau": (SUBNORMAL, 1e-300, 1e-12, 1e308),
    "step_weight": (0.0, 1e6, SUBNORMAL),
    "psc_alpha": (SUBNORMAL, 1e-300, 1e308),
    "psc_beta": (0.0, 4.3279, SUBNORMAL),
    "psc_range": (0.0, 1.0, SUBNORMAL),
    "invalid_action_penalty": (0.0, 1e15, SUBNORMAL),
    "success_threshold": (-1e308, 1e308, -0.0, SUBNORMAL),
    "history_half_life": (SUBNORMAL, 1e308),
    "history_prior": (0.0, 1e9),
    "hgpo_alpha": (-16.0, 16.0),
    "graph_success_value": (0.0, 1e15),
    "episode_weight": (0.0, 1e6),
}
# ... and beyond them (every one refused, naming the field).
BEYOND_CONFIG: dict[str, tuple[float, ...]] = {
    "gamma": (-SUBNORMAL, 1.0000000000000002, 1e308),
    "tau": (0.0, -0.0, -SUBNORMAL, -1e308),
    "step_weight": (-SUBNORMAL, 1e6 * (1 + 1e-12), 1e308),
    "psc_alpha": (0.0, -0.0, -1.0),
    "psc_beta": (-SUBNORMAL, 4.33, 1e308),
    "psc_range": (-SUBNORMAL, 1.0000000000000002),
    "invalid_action_penalty": (-SUBNORMAL, 1e15 * (1 + 1e-12), 1e308),
    "history_half_life": (0.0, -1.0),
    "history_prior": (-SUBNORMAL, 1e9 * (1 + 1e-12), 1e308),
    "hgpo_alpha": (-16.000000000000004, 17.0),
    "graph_success_value": (-SUBNORMAL, 1e16),
    "episode_weight": (-SUBNORMAL, 1e6 * (1 + 1e-12)),
}
_CONFIG_FIELDS = pb.EstimatorConfig.DESCRIPTOR.fields_by_name


@st.composite
def edge_requests(draw: st.DrawFn, valid: bool) -> pb.ComputeAdvantagesRequest:
    """A well-formed request at the corners: groups of one trajectory of one step, trajectories
    of 1 .. 1000 steps, rewards and embedding values at the bounds, subnormal and -0.0, numeric
    config fields at their bounds. ``valid``: every value accepted (the answer must be OK and
    finite); else exactly one thing beyond its bound (a reward, an embedding value, a config
    field, or 1001 steps), which must be refused with INVALID_ARGUMENT or RESOURCE_EXHAUSTED."""
    config = pb.EstimatorConfig(preset=draw(st.sampled_from(
        ("", "proxmo", "paper", "proxmo-rl", "gigpo", "grpo", "rloo"))))
    config.similarity = draw(st.sampled_from(
        (pb.SIMILARITY_TFIDF, pb.SIMILARITY_EXACT, pb.SIMILARITY_PRECOMPUTED)))
    edge_names = [n for n in EDGE_CONFIG if n in _CONFIG_FIELDS]
    names = draw(st.lists(st.sampled_from(edge_names), unique=True, max_size=5))
    for name in names:
        if name == "psc_range" and "psc_beta" in names:
            continue  # one of the two only
        setattr(config, name, draw(st.sampled_from(EDGE_CONFIG[name])))
    request = pb.ComputeAdvantagesRequest(config=config, dry_run=draw(st.booleans()))
    dim = 3
    for g in range(draw(st.integers(1, 3))):
        for k in range(draw(st.sampled_from((1, 1, 2, 3)))):
            trajectory = request.trajectories.add(trajectory_id=f"g{g}-t{k}", group_id=f"g{g}")
            n = draw(st.sampled_from((1, 1, 2, 5, 300, MAX_STEPS)))
            rewards = draw(st.lists(st.sampled_from(EDGE_REWARDS), min_size=n, max_size=n))
            for t in range(n):
                step = trajectory.steps.add(state=STATES[(g + k + t) % len(STATES)],
                                            reward=rewards[t],
                                            invalid_action=(t % 7 == 3))
                step.state_embedding.extend(
                    draw(st.lists(st.sampled_from(EDGE_EMBEDDINGS), min_size=dim, max_size=dim)))
    if not valid:
        target = draw(st.sampled_from(("reward", "embedding", "config", "steps")))
        trajectory = draw(st.sampled_from(list(request.trajectories)))
        step = trajectory.steps[draw(st.integers(0, len(trajectory.steps) - 1))]
        if target == "reward":
            step.reward = draw(st.sampled_from(BEYOND_REWARDS))
        elif target == "embedding":
            step.state_embedding[0] = draw(st.sampled_from(BEYOND_EMBEDDINGS))
        elif target == "config":
            name = draw(st.sampled_from([n for n in BEYOND_CONFIG if n in _CONFIG_FIELDS]))
            config = request.config
            config.ClearField("psc_beta")
            config.ClearField("psc_range")
            setattr(config, name, draw(st.sampled_from(BEYOND_CONFIG[name])))
        else:
            for t in range(MAX_STEPS + 1 - len(trajectory.steps)):
                trajectory.steps.add(state=STATES[t % len(STATES)], reward=0.0)
    return request


requests = st.one_of(
    small_requests(), small_requests(), small_requests(), small_requests(),
    small_requests(), small_requests(),
    st.builds(many_groups_request, st.integers(1000, 2600), st.integers(1, 2)),
    edge_requests(valid=True), edge_requests(valid=False),
)


def stream_of_requests(draw_from: st.SearchStrategy[pb.ComputeAdvantagesRequest] = requests,
                       ) -> st.SearchStrategy[list[pb.ComputeAdvantagesRequest]]:
    return st.lists(draw_from, min_size=1, max_size=4)


# --- checks --------------------------------------------------------------------------------------


def check_shaped_like(request: pb.ComputeAdvantagesRequest,
                      response: pb.ComputeAdvantagesResponse) -> None:
    """An OK answer: one entry per trajectory in request order, one value per step in each of
    the four arrays, everything finite, one report per group."""
    assert len(response.trajectories) == len(request.trajectories)
    for sent, got in zip(request.trajectories, response.trajectories, strict=True):
        assert got.trajectory_id == sent.trajectory_id
        n = len(sent.steps)
        for name in ("advantages", "episode_advantages", "step_advantages", "returns"):
            values = getattr(got, name)
            assert len(values) == n, (name, len(values), n)
            assert all(math.isfinite(v) for v in values), (name, list(values))
    group_ids = {t.group_id for t in request.trajectories}
    assert {g.group_id for g in response.groups} == group_ids
    assert sum(g.num_trajectories for g in response.groups) == len(request.trajectories)
    for group in response.groups:
        for name in ("success_rate", "weight_success", "weight_failure", "singleton_fraction",
                     "mean_effective_neighbors"):
            assert math.isfinite(getattr(group, name)), (name, group)
        assert 0.0 <= group.success_rate <= 1.0
    if request.request_id:
        assert response.request_id == request.request_id


def grpc_outcome(call: object, request: pb.ComputeAdvantagesRequest,
                 metadata: Sequence[tuple[str, str]] = ()) -> tuple[grpc.StatusCode,
                                                                    pb.ComputeAdvantagesResponse
                                                                    | None, str]:
    try:
        response = call(request, timeout=60, metadata=metadata)  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code(), None, error.details() or ""
    return grpc.StatusCode.OK, response, ""


def rest_body(request: pb.ComputeAdvantagesRequest) -> str:
    return json_format.MessageToJson(request, indent=None)


def parse_rest_answer(status: int, text: str) -> tuple[str, pb.ComputeAdvantagesResponse | None]:
    """(gRPC code name, response when 200); asserts the error body's shape."""
    assert status in HTTP_CODES, (status, text[:500])
    if status != 200:
        import json

        error = json.loads(text)["error"]
        assert error["code"] == HTTP_CODES[status] and error["message"], error
        return HTTP_CODES[status], None
    response = pb.ComputeAdvantagesResponse()
    json_format.Parse(text, response)
    return "OK", response


def json_float32_overflow(text: str) -> bool:
    """A REST refusal of a float32 near +-FLT_MAX: protobuf's MessageToJson prints FLT_MAX as
    the shortest float32 repr, 3.4028235e+38, which is above FLT_MAX as a double, and its JSON
    parser refuses it ("too large" / "too small"). The REST door then answers INVALID_ARGUMENT
    naming the body where gRPC (binary floats, exact) may answer something else. A protobuf
    JSON quirk, not the server's."""
    import json

    error = json.loads(text).get("error", {})
    message = error.get("message", "")
    return error.get("field") == "body" and (
        "Float value too large" in message or "Float value too small" in message)


def advantages_of(response: pb.ComputeAdvantagesResponse) -> list[list[float]]:
    return [list(t.advantages) for t in response.trajectories]
