"""The default deadline of a batch the server must encode.

With ENCODER similarity, a server encodes every distinct state text its cache does not hold
yet: on a CPU server ~200 texts a second, so a cold 64-group batch (~9,500 distinct states)
needs ~50 s, beyond the client's default 30 s. When a call leaves ``timeout`` to the client, the
client sizes its deadline from the batch instead:

    deadline = default + ENCODE_HEADROOM * distinct states / the server's measured states/s

(the server publishes that rate in ``GetServerInfo().encoder.states_per_second``, read once a
minute) for batches of at least MIN_STATES distinct states: smaller ones fit the default on
any server that encodes >= 34 states a second, and cost no extra call. It is only an upper
bound: a batch whose states are cached (prefetched) answers in milliseconds anyway. A server
that cannot finish in time still answers DEADLINE_EXCEEDED just before the deadline, saying
how far the encoding got; what it encoded is kept, so a retry continues from there.
"""

from __future__ import annotations

import time

from .v1 import proxmo_pb2 as pb

# The measured rate moves with text lengths and with other work on the server's cores: on a
# heavily shared 2-core server a cold 16-group batch took 438 s against a 1.5x deadline of
# ~447 s (measured), too close; twice leaves room.
ENCODE_HEADROOM = 2.0
MIN_STATES = 1000


def uses_encoder(request: pb.ComputeAdvantagesRequest, info: pb.GetServerInfoResponse) -> bool:
    """Whether the server will run its encoder on this request's states: ENCODER similarity
    asked for, or left to the preset (the server's default preset when none is named)."""
    similarity = request.config.similarity
    if similarity == pb.SIMILARITY_UNSPECIFIED:
        name = request.config.preset or info.default_preset
        preset = next((p for p in info.presets if p.name == name), None)
        similarity = preset.config.similarity if preset is not None else info.default_similarity
    return similarity == pb.SIMILARITY_ENCODER


def distinct_states(request: pb.ComputeAdvantagesRequest) -> int:
    return len({step.state for trajectory in request.trajectories for step in trajectory.steps})


def may_need_encoding_time(request: pb.ComputeAdvantagesRequest) -> bool:
    """Whether the batch is big enough for its deadline to depend on the encoder's rate."""
    return distinct_states(request) >= MIN_STATES


def encoder_deadline_s(
    request: pb.ComputeAdvantagesRequest, info: pb.GetServerInfoResponse | None,
    default_s: float,
) -> float:
    """``default_s``, extended by the time the server may need to encode the batch's distinct
    states cold (unknown rate or no encoder: ``default_s``)."""
    if info is None or not uses_encoder(request, info):
        return default_s
    rate = info.encoder.states_per_second
    if not rate > 0.0:
        return default_s
    return default_s + ENCODE_HEADROOM * distinct_states(request) / rate


SERVER_INFO_MAX_AGE_S = 60.0  # the measured rate is refreshed this often
SERVER_INFO_TIMEOUT_S = 5.0


class ServerInfoCache:
    """A client's last GetServerInfo answer (None: the call failed), for sizing deadlines."""

    def __init__(self) -> None:
        self.info: pb.GetServerInfoResponse | None = None
        self._at: float | None = None

    @staticmethod
    def sized(timeout: float | None, default_s: float | None,
              request: pb.ComputeAdvantagesRequest) -> bool:
        """Whether this call's deadline is the client's to size (no explicit ``timeout``)."""
        return timeout is None and default_s is not None and may_need_encoding_time(request)

    def needs_refresh(self, timeout: float | None, default_s: float | None,
                      request: pb.ComputeAdvantagesRequest) -> bool:
        stale = self._at is None or time.monotonic() - self._at > SERVER_INFO_MAX_AGE_S
        return stale and self.sized(timeout, default_s, request)

    def put(self, info: pb.GetServerInfoResponse | None) -> None:
        self.info, self._at = info, time.monotonic()

    def timeout(self, timeout: float | None, default_s: float | None,
                request: pb.ComputeAdvantagesRequest) -> float | None:
        """The call's deadline: ``timeout`` when given, else (None: the client's default)
        the default sized for the batch."""
        if not self.sized(timeout, default_s, request):
            return timeout
        assert default_s is not None
        return encoder_deadline_s(request, self.info, default_s)
