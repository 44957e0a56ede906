"""``POST /v1/audio/transcriptions`` and ``POST /v1/audio/speech`` over AudioTranscription / TTS.

The backend protocol passes audio as file paths (``TranscriptRequest.dst``,
``TTSRequest.dst``), so the front stages the upload in, and reads the synthesized
file from, a private directory under ``INFERD_AUDIO_DIR`` when it is set (backends
confine audio paths to it) or the system temp dir. Files are removed after the call.
A model whose backend lacks the rpc answers 501 naming the backend. Segment times are
LocalAI's nanoseconds on the wire and seconds in the JSON, as OpenAI returns them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from inferd.http.deps import call_scope
from inferd.http.errors import bad_request
from inferd.http.schemas import SpeechRequest
from inferd.proto import backend_pb2 as pb

router = APIRouter()
MAX_UPLOAD = 100 * 1024 * 1024


def _stage_dir() -> str:
    base = os.environ.get("INFERD_AUDIO_DIR") or None
    return tempfile.mkdtemp(prefix="inferd-http-", dir=base)


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request, file: UploadFile = File(...), model: str = Form(...),  # noqa: B008
                         language: str = Form(""), prompt: str = Form(""), temperature: float = Form(0.0),
                         response_format: str = Form("json")) -> Any:
    if response_format not in ("json", "text", "verbose_json"):
        raise bad_request("one of json, text, verbose_json", "response_format")
    scope = call_scope(request, model)
    data = await file.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise bad_request(f"larger than {MAX_UPLOAD} bytes", "file")
    if not data:
        raise bad_request("is empty", "file")
    folder = _stage_dir()
    path = Path(folder) / ("upload" + Path(file.filename or "audio.wav").suffix[:16])
    try:
        path.write_bytes(data)
        reply = await scope.unary("AudioTranscription", pb.TranscriptRequest(
            dst=str(path), language=language, prompt=prompt, temperature=temperature))
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
            os.rmdir(folder)
    scope.finished(None)
    if response_format == "text":
        return PlainTextResponse(reply.text)
    body: dict[str, Any] = {"text": reply.text}
    if response_format == "verbose_json":
        body.update(task="transcribe", language=reply.language, duration=reply.duration,
                    segments=[{"id": s.id, "start": s.start / 1e9,
                               "end": s.end / 1e9, "text": s.text,
                               "tokens": list(s.tokens)} for s in reply.segments])
    return JSONResponse(body, headers={"X-Request-Id": scope.correlation_id})


@router.post("/v1/audio/speech")
async def speech(body: SpeechRequest, request: Request) -> Any:
    scope = call_scope(request, body.model)
    folder = _stage_dir()
    path = Path(folder) / "speech.wav"
    try:
        req = pb.TTSRequest(text=body.input, model=body.model, dst=str(path), voice=body.voice)
        if body.language:
            req.language = body.language
        result = await scope.unary("TTS", req)
        if not result.success:
            raise bad_request(result.message or "synthesis failed", "input")
        audio = path.read_bytes()
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
            os.rmdir(folder)
    scope.finished(None)
    return Response(audio, media_type="audio/wav", headers={"X-Request-Id": scope.correlation_id})
