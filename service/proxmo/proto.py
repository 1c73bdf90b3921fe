"""The service's one seam to the generated protobuf code.

The messages and gRPC stubs are generated from ``protos/proxmo/v1/proxmo.proto`` into the
client package (``proxmo_client.v1``), which the service depends on for them; every service
module imports them from here, so that dependency shows in this one place::

    from proxmo.proto import pb
"""

from proxmo_client.v1 import proxmo_pb2 as pb
from proxmo_client.v1 import proxmo_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
