"""Free releases the model's memory (seed 002's ClearMemory), visible in Status."""

from __future__ import annotations

from inferd.backends import Backend, CallContext
from inferd.client import new_client
from inferd.proto import backend_pb2 as pb
from tests.helpers import running_server

SIZE = 256 * 1024 * 1024


class MemoryHog(Backend):
    """Holds a 256 MiB buffer as its 'model', touched so it is resident."""

    name = "memory-hog"

    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        self.weights = bytearray(SIZE)
        for i in range(0, SIZE, 4096):
            self.weights[i] = 1
        return "loaded"

    def unload(self) -> None:
        del self.weights


async def test_free_returns_memory_to_the_os():
    async with running_server(MemoryHog()) as server:
        client = new_client(f"127.0.0.1:{server.port}")
        before = (await client.status()).memory.total
        assert (await client.load_model(Model="x")).success
        loaded = (await client.status()).memory.total
        assert loaded - before > 0.8 * SIZE
        assert (await client.free()).success
        freed = (await client.status()).memory.total
        assert loaded - freed > 0.8 * SIZE
        assert (await client.status()).state == pb.StatusResponse.UNINITIALIZED
        await client.close()
