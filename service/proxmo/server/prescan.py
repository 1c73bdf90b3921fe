"""Count checks on a request's raw bytes, before the full parse, on both doors.

Parsing is what an oversized request costs: the protobuf decoder holds the GIL for the whole
message (8 MB of empty trajectories: seconds, on the event loop, with every other call
waiting), and the proto3 JSON parser builds a Python object per JSON value. The limits on
trajectories and steps are checked here on the bytes, so that a request over them is refused
(RESOURCE_EXHAUSTED / 413, naming the field) after work bounded by the limits themselves, not
by the request's size:

- ``check_wire_counts`` walks the protobuf wire format of a ComputeAdvantagesRequest (or the
  states of a PrefetchStatesRequest) field by field, skipping every value by its length: at
  most ``max_trajectories + max_total_steps`` fields plus a few are visited before a verdict.
  Malformed bytes stop the walk; the decoder then reports them.
- ``check_json_counts`` bounds the JSON structures of a REST body: outside string literals
  (skipped with C-speed byte operations, a megabyte at a time), each ``{`` or ``[`` opens an
  object or an array, and a request within the limits holds at most one per trajectory and per
  step (plus a few). PrefetchStates bodies also have their ``,`` counted (one per state). A
  body whose raw count is already within the bounds needs no closer look.
"""

from __future__ import annotations

import re

from proxmo.errors import LimitExceeded
from proxmo.limits import Limits
from proxmo.proto import pb

# Fields that are not trajectories or steps (ids, config, flags): a valid request has a few.
_OTHER_FIELDS = 64

_TRAJECTORIES = pb.ComputeAdvantagesRequest.DESCRIPTOR.fields_by_name["trajectories"].number
_STEPS = pb.Trajectory.DESCRIPTOR.fields_by_name["steps"].number
_STATES = pb.PrefetchStatesRequest.DESCRIPTOR.fields_by_name["states"].number
_FIXED_SIZES = {1: 8, 5: 4}  # wire type -> value bytes (fixed64, fixed32)


class _Malformed(Exception):
    """Not protobuf wire format: the decoder will say what is wrong."""


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            break
    raise _Malformed


def _fields(data: bytes, pos: int, end: int):  # type: ignore[no-untyped-def]
    """(field number, wire type, value start, value end) of each field in data[pos:end]."""
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            start = pos
            _, pos = _varint(data, pos, end)
        elif wire_type == 2:
            length, start = _varint(data, pos, end)
            pos = start + length
        elif wire_type in _FIXED_SIZES:
            start = pos
            pos += _FIXED_SIZES[wire_type]
        else:  # groups (deprecated) or garbage
            raise _Malformed
        if pos > end:
            raise _Malformed
        yield number, wire_type, start, pos


def check_wire_counts(raw: bytes, message: type, limits: Limits) -> None:
    """LimitExceeded when the wire bytes ``raw`` of a ``message`` (ComputeAdvantagesRequest or
    PrefetchStatesRequest) hold more trajectories, steps or states than ``limits`` allow."""
    try:
        if message is pb.ComputeAdvantagesRequest:
            _check_request(raw, limits)
        elif message is pb.PrefetchStatesRequest:
            _check_prefetch(raw, limits)
    except _Malformed:
        return


def _over(field: str, what: str, limit: int) -> LimitExceeded:
    return LimitExceeded(field, f"more than {limit} {what} (the limit); refused before decoding")


def _check_request(raw: bytes, limits: Limits) -> None:
    trajectories = steps = others = 0
    for number, wire_type, start, end in _fields(raw, 0, len(raw)):
        if number != _TRAJECTORIES or wire_type != 2:
            others += 1
            if others > _OTHER_FIELDS:
                raise _over("request", "fields besides trajectories", _OTHER_FIELDS)
            continue
        trajectories += 1
        if trajectories > limits.max_trajectories:
            raise _over("trajectories", "trajectories", limits.max_trajectories)
        own_steps = _count_steps(raw, start, end, trajectories - 1)
        steps += own_steps
        if own_steps > limits.max_steps_per_trajectory:
            raise _over(f"trajectories[{trajectories - 1}].steps", "steps",
                        limits.max_steps_per_trajectory)
        if steps > limits.max_total_steps:
            raise _over("trajectories", "steps in total", limits.max_total_steps)


_STEP_KEY = _STEPS << 3 | 2  # one byte: the key of a step (length-delimited)


def _count_steps(raw: bytes, pos: int, end: int, index: int) -> int:
    """Steps of the trajectory in raw[pos:end]. The hot loop of the count: a step's one-byte
    key and (mostly) one-byte length are read inline, anything else through ``_fields``."""
    steps = others = 0
    while pos < end:
        if raw[pos] == _STEP_KEY and pos + 1 < end and raw[pos + 1] < 0x80:
            pos += 2 + raw[pos + 1]
            steps += 1
            continue
        number, wire_type, _, pos = next(_fields(raw, pos, end))
        if number == _STEPS and wire_type == 2:
            steps += 1
            continue
        others += 1
        if others > _OTHER_FIELDS:
            raise _over(f"trajectories[{index}]", "fields besides steps", _OTHER_FIELDS)
    if pos > end:
        raise _Malformed
    return steps


def _check_prefetch(raw: bytes, limits: Limits) -> None:
    states = 0
    for _ in _fields(raw, 0, len(raw)):
        states += 1
        if states > limits.max_total_steps + _OTHER_FIELDS:
            raise _over("states", "states", limits.max_total_steps)


# A JSON string literal once its escapes are gone: quotes around anything but a quote.
_JSON_STRING = re.compile(rb'"[^"]*"')


def check_json_counts(body: bytes, message: type, limits: Limits) -> None:
    """LimitExceeded when the JSON ``body`` of a ``message`` holds more objects and arrays (or,
    for PrefetchStates, more values) than a request within ``limits`` can."""
    if message is pb.PrefetchStatesRequest:
        structures_bound, values_bound = _OTHER_FIELDS, limits.max_total_steps + _OTHER_FIELDS
    else:
        # One object per trajectory and per step, one steps array per trajectory, at most one
        # embedding array per step, and a few for the request and its config.
        structures_bound = 2 * (limits.max_trajectories + limits.max_total_steps) + _OTHER_FIELDS
        values_bound = None
    # Counted over the raw body (C speed) first: braces inside strings only over-count, so a
    # body under the bounds needs no closer look.
    if body.count(b"{") + body.count(b"[") <= structures_bound and (
            values_bound is None or body.count(b",") <= values_bound):
        return
    structures, values = _count_outside_strings(body)
    if values_bound is not None and values > values_bound:
        raise _over("states", "states", limits.max_total_steps)
    if structures > structures_bound:
        raise LimitExceeded(
            "body", f"{structures} JSON objects and arrays: more than a request within the "
            f"limits can hold ({structures_bound}); refused before parsing")


_CHUNK = 1 << 20


def _count_outside_strings(body: bytes) -> tuple[int, int]:
    """(``{`` and ``[``, ``,``) outside string literals. Escaped backslashes, then escaped
    quotes, go first; what is left between two quotes is a string. Done a megabyte at a time,
    so that a thread running it lets the event loop in between (each step is C and holds the
    GIL)."""
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structures = values = 0
    inside = False  # a string opened in an earlier chunk is still open
    for start in range(0, len(text), _CHUNK):
        chunk = text[start:start + _CHUNK]
        if inside:
            close = chunk.find(b'"')
            if close < 0:
                continue
            chunk, inside = chunk[close + 1:], False
        if chunk.count(b'"') % 2:  # a string opens here and ends in a later chunk
            chunk, inside = chunk[:chunk.rfind(b'"')], True
        bare = _JSON_STRING.sub(b"", chunk)
        structures += bare.count(b"{") + bare.count(b"[")
        values += bare.count(b",")
    return structures, values
