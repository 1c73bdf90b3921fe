"""The error hierarchy: each error's status codes and field-first message."""

from __future__ import annotations

import pytest
from proxmo.core.batch import ValidationError
from proxmo.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotReady,
    Overloaded,
    ProxmoError,
)


@pytest.mark.parametrize(
    ("error", "grpc_code", "http_status"),
    [
        (InvalidArgument("trajectories[3].steps[7].reward", "must be finite, got nan"),
         "INVALID_ARGUMENT", 422),
        (LimitExceeded("trajectories", "5000 trajectories exceed the limit of 4096"),
         "RESOURCE_EXHAUSTED", 413),
        (FailedPrecondition("config.similarity", "no encoder"), "FAILED_PRECONDITION", 400),
        (Overloaded(), "RESOURCE_EXHAUSTED", 429),
        (NotReady(), "UNAVAILABLE", 503),
        (DeadlineExceeded(), "DEADLINE_EXCEEDED", 504),
    ],
)
def test_codes(error: ProxmoError, grpc_code: str, http_status: int) -> None:
    assert isinstance(error, ProxmoError)
    assert (error.grpc_code, error.http_status) == (grpc_code, http_status)


def test_message_names_the_field() -> None:
    error = InvalidArgument("trajectories[3].steps[7].reward", "must be finite, got nan")
    assert str(error) == "trajectories[3].steps[7].reward: must be finite, got nan"
    assert error.field == "trajectories[3].steps[7].reward"
    assert str(Overloaded("busy")) == "busy" and Overloaded().field == ""


def test_validation_error_keeps_its_field() -> None:
    core_error = ValidationError("config.tau", "must be > 0, got 0.0")
    error = InvalidArgument.from_validation(core_error)
    assert (error.field, error.message) == ("config.tau", "must be > 0, got 0.0")
    assert str(error) == str(core_error)
