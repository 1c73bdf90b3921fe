"""A real gRPC server on a free loopback port, for testing the client's own behaviour.

``ScriptedServicer`` implements the generated CreditAssignmentServiceServicer: it can fail the
first N calls with UNAVAILABLE (or another code, e.g. CANCELLED as a terminating replica
answers), sleep, or fail with a chosen status, and it records every call's request_id, metadata
and request. Its advantages are a fixed function of the input (advantage of a step =
its reward * 10 + its step index), so results can be checked exactly.
The real proxmo server is tested in its own area; this one tests retries, deadlines and metadata
over a real socket.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health
from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc


@dataclass
class Call:
    method: str
    request_id: str
    metadata: dict[str, str]
    request: Any = None


@dataclass
class ScriptedServicer(pb_grpc.CreditAssignmentServiceServicer):
    fail_first: int = 0  # fail this many calls (of any method) with fail_first_code
    fail_first_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    fail_with: grpc.StatusCode | None = None  # then fail every call with this code
    fail_details: str = "scripted failure"
    delay_s: float = 0.0
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(
        self, method: str, request_id: str, context: grpc.ServicerContext, request: Any = None
    ) -> None:
        metadata = dict(context.invocation_metadata())
        with self.lock:
            self.calls.append(Call(method, request_id, metadata, request))
            failing = len(self.calls) <= self.fail_first
        if failing:
            code = self.fail_first_code
            unavailable = code is grpc.StatusCode.UNAVAILABLE
            context.abort(code, "scripted: not ready" if unavailable else f"scripted: {code.name}")
        if self.fail_with is not None:
            context.abort(self.fail_with, self.fail_details)
        if self.delay_s:
            time.sleep(self.delay_s)

    @staticmethod
    def answer(request: pb.ComputeAdvantagesRequest) -> pb.ComputeAdvantagesResponse:
        response = pb.ComputeAdvantagesResponse(request_id=request.request_id)
        for trajectory in request.trajectories:
            values = [s.reward * 10 + t for t, s in enumerate(trajectory.steps)]
            response.trajectories.add(
                trajectory_id=trajectory.trajectory_id,
                advantages=values,
                episode_advantages=values,
                step_advantages=[0.0] * len(values),
                returns=[s.reward for s in trajectory.steps],
            )
        return response

    def ComputeAdvantages(self, request, context):  # noqa: N802 (generated name)
        self._enter("ComputeAdvantages", request.request_id, context)
        return self.answer(request)

    def StreamAdvantages(self, request_iterator, context):  # noqa: N802
        for request in request_iterator:
            self._enter("StreamAdvantages", request.request_id, context)
            yield self.answer(request)

    def PrefetchStates(self, request, context):  # noqa: N802
        """All distinct texts queued, or (``wait``) already embedded by the time of the answer."""
        self._enter("PrefetchStates", "", context, request)
        distinct = len(set(request.states))
        if request.wait:
            return pb.PrefetchStatesResponse(distinct_states=distinct, cached_states=distinct)
        return pb.PrefetchStatesResponse(distinct_states=distinct, queued_states=distinct)

    def GetSuccessRates(self, request, context):  # noqa: N802
        self._enter("GetSuccessRates", "", context)
        return pb.GetSuccessRatesResponse(
            tasks=[pb.TaskSuccessRate(task_id=t, success_rate=0.5) for t in request.task_ids],
            next_page_token=request.prefix,
        )

    def ResetSuccessRates(self, request, context):  # noqa: N802
        self._enter("ResetSuccessRates", "", context)
        return pb.ResetSuccessRatesResponse(deleted=len(request.task_ids) or 7)

    def GetServerInfo(self, request, context):  # noqa: N802
        self._enter("GetServerInfo", "", context)
        return pb.GetServerInfoResponse(version="test-0", default_preset="proxmo")


@dataclass
class RunningServer:
    target: str
    servicer: ScriptedServicer
    health: health.HealthServicer
