"""The RPC table of LocalAI's ``backend.Backend`` service, read from the generated descriptor.

Everything that needs to enumerate the contract (the servicer, both client transports,
the CLI's ``call`` command, the tests) uses this table, so adding an rpc to the .proto
and regenerating the stubs is the whole change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import symbol_database

from inferd.proto import backend_pb2, llm_pb2

SERVICE_NAME = "backend.Backend"
LLM_SERVICE_NAME = "entity.grpc.LLMService"

# rpcs that work without a loaded model. Everything else answers FAILED_PRECONDITION
# until LoadModel succeeded (after UNIMPLEMENTED, which wins when the backend lacks it).
NO_MODEL_NEEDED = frozenset(
    {
        "Health",
        "LoadModel",
        "Free",
        "Status",
        "ModelMetadata",
        "GetMetrics",
        "StartFineTune",
        "FineTuneProgress",
        "StopFineTune",
        "ListCheckpoints",
        "ExportModel",
        "StartQuantization",
        "QuantizationProgress",
        "StopQuantization",
    }
)


def snake_case(name: str) -> str:
    """``PredictStream`` -> ``predict_stream``, ``TTS`` -> ``tts``, ``VAD`` -> ``vad``."""
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s)
    return s.lower()


@dataclass(frozen=True)
class Rpc:
    """One method of a service: its wire name, Python name and message classes."""

    name: str
    method: str  # snake_case Python name used by backends and clients
    request: Any  # protobuf message class
    response: Any
    streaming: bool
    needs_model: bool
    service: str = SERVICE_NAME

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def _table(file_desc: Any, service: str) -> dict[str, Rpc]:
    db = symbol_database.Default()
    svc = file_desc.services_by_name[service.rsplit(".", 1)[-1]]
    out: dict[str, Rpc] = {}
    for m in svc.methods:
        out[m.name] = Rpc(
            name=m.name,
            method=snake_case(m.name),
            request=db.GetSymbol(m.input_type.full_name),
            response=db.GetSymbol(m.output_type.full_name),
            streaming=m.server_streaming,
            needs_model=m.name not in NO_MODEL_NEEDED,
            service=service,
        )
    return out


RPCS: dict[str, Rpc] = _table(backend_pb2.DESCRIPTOR, SERVICE_NAME)
LLM_RPCS: dict[str, Rpc] = _table(llm_pb2.DESCRIPTOR, LLM_SERVICE_NAME)
