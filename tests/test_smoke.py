from inferd.client import new_client
from inferd.proto import backend_pb2 as pb


async def test_echo_roundtrip(echo_server):
    client = new_client(f"127.0.0.1:{echo_server.port}")
    try:
        assert await client.health_check()
        res = await client.load_model(Model="test-model")
        assert res.success, res.message
        reply = await client.predict(pb.PredictOptions(Prompt="hi there"))
        assert reply.message == b"hi there"
        words = [r.message async for r in client.predict_stream(Prompt="a b c")]
        assert words == [b"a ", b"b ", b"c "]
    finally:
        await client.close()
