"""LocalAI's model-identity check: refuse a call meant for another model.

LocalAI (``pkg/grpc/server.go`` ``checkModelIdentity``, ``backend/python/common/
model_identity.py``) sends the model a request is for in the request message's own
``ModelIdentity`` field (PredictOptions = 54, ...; set from the same ``ModelConfig.Model``
that became ``ModelOptions.Model`` at LoadModel) so a backend reached through a recycled
port refuses instead of answering from the wrong model. Our stubs predate the field, so it
is read from the message's unknown fields by number. ``claimed`` is the same value sent as
metadata (``MODEL_IDENTITY_KEY``) by clients whose stubs lack the field.

Either side empty skips the check (an older LocalAI, a load that named no model): a false
rejection is worse than the miss. A mismatch is NOT_FOUND with "model identity mismatch"
in the message: LocalAI's router requires both (``grpcerrors.IsModelMismatch``) before it
drops its stale route.
"""

from __future__ import annotations

from typing import Any

from inferd.errors import NotFound

#: Metadata form of LocalAI's model identity, for clients whose stubs lack the field.
MODEL_IDENTITY_KEY = "x-model-identity"

#: LocalAI's field numbers of ``ModelIdentity`` (backend/backend.proto).
_FIELD_NUMBERS = {
    "PredictOptions": 54, "TranscriptRequest": 11, "GenerateImageRequest": 13,
    "GenerateVideoRequest": 15, "TTSRequest": 8, "VADRequest": 2,
    "SoundGenerationRequest": 18, "DetectOptions": 6, "RerankRequest": 4,
}


def requested_identity(claimed: str | None, request: Any = None) -> str:
    """The model a call says it is for: metadata first, then the request's (unknown) field."""
    requested = claimed or ""
    if not requested and request is not None:
        requested = getattr(request, "ModelIdentity", "") or ""
        number = _FIELD_NUMBERS.get(type(request).__name__)
        if not requested and number is not None:
            from google.protobuf.unknown_fields import UnknownFieldSet

            for f in UnknownFieldSet(request):
                if f.field_number == number and f.wire_type == 2:  # length-delimited string
                    requested = bytes(f.data).decode("utf-8", "replace")
    return requested


def check_model_identity(backend_name: str, loaded: str, claimed: str | None, request: Any = None) -> None:
    """NotFound ("model identity mismatch") if the call names a model other than ``loaded``."""
    requested = requested_identity(claimed, request)
    if requested and loaded and requested != loaded:
        raise NotFound(f"{backend_name}: model identity mismatch: loaded {loaded!r}, requested {requested!r}")
