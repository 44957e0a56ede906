"""A small deterministic backend for protocol tests (no model engine needed).

It "loads" any existing file (or the name ``test-model``), echoes prompts, streams
one reply per word, tokenizes on whitespace, and has a controllable blocking call
(Predict with ``Prompt="block:SECONDS"``) so tests can observe serialization,
busy state and cancellation. It implements only these capabilities on purpose:
the rest must answer UNIMPLEMENTED.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

from inferd.backends import Backend, CallContext
from inferd.errors import Cancelled, InvalidArgument, LoadError
from inferd.proto import backend_pb2 as pb


class EchoBackend(Backend):
    name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.max_active = 0
        self.started = threading.Event()
        self.cancelled_calls = 0
        self._guard = threading.Lock()

    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        name = options.ModelFile or options.Model
        if name != "test-model" and not os.path.isfile(name):
            raise LoadError(f"model file not found: {name!r}")
        return f"loaded {name}"

    def _track(self, delta: int) -> None:
        with self._guard:
            self.active += delta
            self.max_active = max(self.max_active, self.active)

    def predict(self, request: pb.PredictOptions, ctx: CallContext) -> pb.Reply:
        if request.Tokens < 0:
            raise InvalidArgument(f"must be >= 0, got {request.Tokens}", "Tokens")
        self._track(1)
        try:
            if request.Prompt.startswith("block:"):
                self.started.set()
                end = time.monotonic() + float(request.Prompt[6:])
                while time.monotonic() < end:
                    if ctx.cancelled():
                        self.cancelled_calls += 1
                        raise Cancelled()
                    time.sleep(0.01)
            if request.Prompt == "boom":
                raise RuntimeError("kaboom")
            return pb.Reply(message=request.Prompt.encode(), tokens=len(request.Prompt.split()))
        finally:
            self._track(-1)

    def predict_stream(self, request: pb.PredictOptions, ctx: CallContext) -> Iterator[pb.Reply]:
        self._track(1)
        try:
            delay = 0.0
            words = request.Prompt.split()
            if words and words[0].startswith("slow:"):
                delay = float(words.pop(0)[5:])
            for w in words:
                if ctx.cancelled():
                    self.cancelled_calls += 1
                    return
                self.started.set()
                yield pb.Reply(message=(w + " ").encode())
                if delay:
                    time.sleep(delay)
        finally:
            self._track(-1)

    def tokenize_string(self, request: pb.PredictOptions, ctx: CallContext) -> pb.TokenizationResponse:
        tokens = [len(w) for w in request.Prompt.split()]
        return pb.TokenizationResponse(length=len(tokens), tokens=tokens)


class ParallelEchoBackend(EchoBackend):
    name = "echo-parallel"
    parallel = True
