"""The lifecycle gate (issue 10, defect 2): LoadModel/Free against calls in flight.

Unit tests drive ``BackendRuntime`` directly with a probe backend that records a
"violation" whenever its model is unloaded while one of its calls is still running (the
real engines crash in that case: SIGABRT, "pure virtual method called"). The stress test
at the end does the same with the real engines over gRPC, in server subprocesses, so a
crash is seen as a dead process instead of killing pytest.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from inferd import runtime as runtime_mod
from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.client import RpcError, new_client
from inferd.errors import Cancelled, Unavailable
from inferd.proto import backend_pb2 as pb
from inferd.runtime import BackendRuntime
from tests.fixtures_backend import EchoBackend
from tests.helpers import running_server


class Probe(Backend):
    """A parallel backend whose "model" must never disappear under a running call.

    ``Prompt`` = ``"work:SECONDS"`` keeps a call busy (checking the model every 10 ms);
    ``"stubborn:SECONDS"`` ignores cancellation. ``load_delay`` makes LoadModel slow.
    """

    name = "probe"
    parallel = True

    def __init__(self) -> None:
        super().__init__()
        self.model: object | None = None
        self.load_delay = 0.0
        self.active = 0
        self.violations = 0
        self.unloads = 0
        self.started = threading.Event()
        self._guard = threading.Lock()

    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        time.sleep(self.load_delay)
        self.model = object()
        return "probe loaded"

    def unload(self) -> None:
        with self._guard:
            if self.active:
                self.violations += 1
            self.unloads += 1
        self.model = None

    def _work(self, prompt: str, ctx: CallContext) -> None:
        kind, _, seconds = prompt.partition(":")
        end = time.monotonic() + float(seconds or 0)
        self.started.set()
        while time.monotonic() < end:
            if self.model is None:
                self.violations += 1
            if kind != "stubborn":
                ctx.check()
            time.sleep(0.01)

    def _track(self, delta: int) -> None:
        with self._guard:
            self.active += delta

    def predict(self, request: pb.PredictOptions, ctx: CallContext) -> pb.Reply:
        self._track(1)
        try:
            self._work(request.Prompt, ctx)
            return pb.Reply(message=b"done")
        finally:
            self._track(-1)

    def predict_stream(self, request: pb.PredictOptions, ctx: CallContext) -> Iterator[pb.Reply]:
        self._track(1)
        try:
            for i in range(int(request.Tokens)):
                self._work(request.Prompt or "work:0.02", ctx)
                yield pb.Reply(message=str(i).encode())
        finally:
            self._track(-1)


def _ctx(rpc: str) -> CallContext:
    return CallContext(rpc)


async def _loaded(backend: Backend, **kw: float) -> BackendRuntime:
    rt = BackendRuntime(backend, max_workers=8, **kw)
    result = await rt.load_model(pb.ModelOptions(Model="m"), _ctx("LoadModel"))
    assert result.success, result.message
    return rt


async def test_free_cancels_streams_waits_for_unary_calls_then_unloads():
    backend = Probe()
    rt = await _loaded(backend)
    try:
        stream_replies: list[bytes] = []

        async def consume() -> None:
            async for r in rt.stream("PredictStream", pb.PredictOptions(Tokens=10_000), _ctx("PredictStream")):
                stream_replies.append(r.message)

        stream_task = asyncio.create_task(consume())
        unary_task = asyncio.create_task(rt.unary("Predict", pb.PredictOptions(Prompt="work:0.6"), _ctx("Predict")))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        freed = await rt.free(_ctx("Free"))
        assert freed.success and freed.message == "model freed"
        # the unary call was allowed to finish (it had 0.4 s left) and answered normally
        assert (await unary_task).message == b"done"
        assert time.monotonic() - t0 >= 0.3
        with pytest.raises(Unavailable, match="model is being unloaded"):
            await stream_task
        assert stream_replies  # it was really streaming when withdrawn
        assert backend.violations == 0 and backend.unloads == 1
        assert backend.lifecycle.in_flight() == 0 and not backend.busy()
    finally:
        rt.shutdown()


async def test_new_calls_are_refused_while_loading_and_health_status_answer():
    backend = Probe()
    rt = await _loaded(backend)
    try:
        backend.load_delay = 0.8
        load = asyncio.create_task(rt.load_model(pb.ModelOptions(Model="m2"), _ctx("LoadModel")))
        await asyncio.sleep(0.2)
        with pytest.raises(Unavailable, match="model is being loaded"):
            await rt.unary("Predict", pb.PredictOptions(Prompt="work:0"), _ctx("Predict"))
        with pytest.raises(Unavailable, match="model is being loaded"):
            async for _ in rt.stream("PredictStream", pb.PredictOptions(Tokens=1), _ctx("PredictStream")):
                pass
        t0 = time.monotonic()
        assert (await rt.unary("Health", pb.HealthMessage(), _ctx("Health"))).message == b"OK"
        status = await rt.unary("Status", pb.HealthMessage(), _ctx("Status"))
        assert status.state == pb.StatusResponse.BUSY and status.memory.total > 0
        assert time.monotonic() - t0 < 0.5  # not behind the load
        # a second writer waits for the first (bounded), then runs
        freed = await rt.free(_ctx("Free"))
        assert load.done() and (await load).success and freed.success
        assert backend.violations == 0
    finally:
        rt.shutdown()


async def test_drain_is_bounded_and_leaves_the_model_when_calls_do_not_stop():
    backend = Probe()
    rt = await _loaded(backend, drain_timeout=0.4)
    try:
        call = asyncio.create_task(rt.unary("Predict", pb.PredictOptions(Prompt="stubborn:1.5"), _ctx("Predict")))
        await asyncio.to_thread(backend.started.wait, 5)
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=r"1 model calls \(Predict\) did not stop within 0.4s"):
            await rt.free(_ctx("Free"))
        assert time.monotonic() - t0 < 1.0
        assert backend.loaded and backend.model is not None and backend.unloads == 0
        # the stubborn call ignored the withdrawal; the model was left intact, so its result stands
        assert (await call).message == b"done"
        # the gate reopened: the next call and the next Free work
        assert (await rt.unary("Predict", pb.PredictOptions(Prompt="work:0"), _ctx("Predict"))).message == b"done"
        assert (await rt.free(_ctx("Free"))).success
        assert backend.violations == 0
    finally:
        rt.shutdown()


async def test_stubborn_load_is_bounded_and_its_late_model_discarded():
    backend = Probe()
    rt = BackendRuntime(backend, max_workers=4, load_timeout=0.3)
    try:
        backend.load_delay = 1.0
        t0 = time.monotonic()
        result = await rt.load_model(pb.ModelOptions(Model="slow"), _ctx("LoadModel"))
        assert time.monotonic() - t0 < 0.8
        assert not result.success and "did not finish within 0.3s" in result.message
        # the load still runs: the gate stays closed, nothing sees a half-loaded model
        with pytest.raises(Unavailable, match="model is being loaded"):
            await rt.unary("Predict", pb.PredictOptions(Prompt="work:0"), _ctx("Predict"))
        for _ in range(300):
            if not backend.lifecycle.writing:
                break
            await asyncio.sleep(0.01)
        assert not backend.lifecycle.writing
        assert not backend.loaded and backend.model is None and backend.unloads == 1
        backend.load_delay = 0.0
        assert (await rt.load_model(pb.ModelOptions(Model="fast"), _ctx("LoadModel"))).success
    finally:
        rt.shutdown()


async def test_cancelled_caller_is_bounded_but_its_worker_keeps_the_model(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(runtime_mod, "CANCEL_WAIT_S", 0.2)
    backend = Probe()
    rt = await _loaded(backend)
    try:
        call = asyncio.create_task(rt.unary("Predict", pb.PredictOptions(Prompt="stubborn:1.2"), _ctx("Predict")))
        await asyncio.to_thread(backend.started.wait, 5)
        t_cancel = time.monotonic()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert time.monotonic() - t_cancel < 0.6  # the caller was not held for the whole call
        assert backend.lifecycle.in_flight() == 1  # ... but the worker still holds its lease
        assert (await rt.free(_ctx("Free"))).success  # Free waited for the worker
        assert time.monotonic() - t_cancel >= 1.0
        assert backend.violations == 0
    finally:
        rt.shutdown()


async def test_cancelled_stream_with_a_stubborn_worker_is_not_closed_under_it(monkeypatch: pytest.MonkeyPatch):
    """The consumer goes away while next() is still running: no "generator already executing",
    the caller returns within the bound, and Free waits for the worker."""
    monkeypatch.setattr(runtime_mod, "CANCEL_WAIT_S", 0.2)
    backend = Probe()
    rt = await _loaded(backend)
    try:
        got: list[bytes] = []

        async def consume() -> None:
            async for r in rt.stream("PredictStream", pb.PredictOptions(Prompt="stubborn:0.8", Tokens=3),
                                     _ctx("PredictStream")):
                got.append(r.message)

        task = asyncio.create_task(consume())
        while not got:
            await asyncio.sleep(0.01)
        t_cancel = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t_cancel < 0.7
        assert (await rt.free(_ctx("Free"))).success
        assert backend.violations == 0 and backend.lifecycle.in_flight() == 0
    finally:
        rt.shutdown()


async def test_serialized_backend_queued_calls_and_free():
    """A non-parallel backend: Free while one call runs and one waits for the call lock."""
    backend = EchoBackend()
    rt = BackendRuntime(backend, max_workers=4)
    try:
        assert (await rt.load_model(pb.ModelOptions(Model="test-model"), _ctx("LoadModel"))).success
        running = asyncio.create_task(rt.unary("Predict", pb.PredictOptions(Prompt="block:0.5"), _ctx("Predict")))
        await asyncio.to_thread(backend.started.wait, 5)
        queued = asyncio.create_task(rt.unary("Predict", pb.PredictOptions(Prompt="hi"), _ctx("Predict")))
        await asyncio.sleep(0.05)
        assert (await rt.free(_ctx("Free"))).success
        assert (await running).message == b"block:0.5"
        # the queued call either ran before the unload or was refused; never an error or a hang
        try:
            assert (await queued).message == b"hi"
        except Unavailable:
            pass
        assert not backend.call_lock.locked() and not backend.busy()
    finally:
        rt.shutdown()


async def test_stream_withdrawn_by_free_answers_unavailable_over_grpc():
    backend = EchoBackend()
    async with running_server(backend) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        try:
            await client.load_model(Model="test-model")
            words = " ".join(f"w{i}" for i in range(400))
            got: list[str] = []

            async def consume() -> None:
                async for r in client.predict_stream(Prompt=f"slow:0.01 {words}", timeout=30):
                    got.append(r.message.decode())

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.3)
            assert (await client.free()).success
            with pytest.raises(RpcError) as err:
                await task
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert "model is being unloaded" in err.value.details
            assert 0 < len(got) < 400
            with pytest.raises(RpcError) as err:
                await client.predict(Prompt="x")
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await client.close()


async def test_cancelled_error_inside_backend_after_withdrawal_is_unavailable():
    """A backend raising Cancelled because the gate cancelled it answers UNAVAILABLE, not CANCELLED."""
    backend = Probe()
    rt = await _loaded(backend, drain_timeout=3.0)
    try:
        ctx = _ctx("Predict")
        call = asyncio.create_task(rt.unary("Predict", pb.PredictOptions(Prompt="work:5"), ctx))
        await asyncio.to_thread(backend.started.wait, 5)
        await backend.lifecycle.drain("model is being unloaded", timeout=3.0, unary_grace=0.1)
        with pytest.raises(Unavailable, match="Predict: model is being unloaded") as err:
            await call
        assert isinstance(err.value.__cause__, Cancelled)
    finally:
        rt.shutdown()
