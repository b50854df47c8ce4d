"""The generated Open Inference Protocol modules, generated on first use when missing.

``pb`` holds the messages and ``pb_grpc`` the service stubs/servicer base of
``protos/inference/grpc_predict_v2.proto``. Importing this module regenerates the stubs when
the proto changed (a sub-second, stamp-checked no-op otherwise), so a fresh checkout works
without ``make protos``.
"""

from __future__ import annotations

from services.runtime.codegen import ensure_generated

ensure_generated()

from services.runtime._gen.inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from services.runtime._gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

__all__ = ["SERVICE_NAME", "pb", "pb_grpc"]
