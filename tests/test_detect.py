"""``onnx-detect``: a YOLOv8-layout ONNX detector on REAL photos.

The model is the one YOLO-layout export that ships in an installable package: nudenet
3.4.2's ``320n.onnx`` (18 classes, among them FACE_FEMALE / FACE_MALE). The photos are
real photographs shipped in scikit-image's wheel (installed with ``--no-deps``, only its
data files are read): ``astronaut.png`` (NASA portrait of Eileen Collins, 512x512) and two
photos without a person, ``coffee.png`` and ``chelsea.png`` (a cat). The face's position
in astronaut.png was labelled by hand from the picture (x 180-270, y 75-180), not taken
from the detector's output.

The geometry (letterbox, mapping back, NMS) is also checked on synthetic model outputs
whose right answer is known exactly.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import math
from pathlib import Path

import grpc
import numpy as np
import pytest

from inferd.backends.context import CallContext
from inferd.backends.onnx_detect import OnnxDetectBackend, packaged_model
from inferd.client import new_client
from inferd.client.errors import RpcError
from inferd.engines.detect import Letterbox, decode, letterbox, nms
from inferd.proto import backend_pb2 as pb
from tests.helpers import running_server
from tests.helpers import test_settings as settings_for_test


def _photos_dir() -> Path | None:
    spec = importlib.util.find_spec("skimage")  # find, not import: only the data files are used
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    return path if (path / "astronaut.png").is_file() else None


PHOTOS = _photos_dir()
pytestmark = pytest.mark.skipif(
    packaged_model() is None or PHOTOS is None,
    reason="needs nudenet (pip install --no-deps nudenet==3.4.2) and the photos of scikit-image "
           "(pip install --no-deps scikit-image==0.26.0)")
FACE_TRUTH = (180.0, 75.0, 270.0, 180.0)  # hand-labelled face in astronaut.png, x1 y1 x2 y2
FACES = {"FACE_FEMALE", "FACE_MALE"}


def iou(box: pb.Detection, truth: tuple[float, float, float, float]) -> float:
    x1, y1, x2, y2 = box.x, box.y, box.x + box.width, box.y + box.height
    ix = max(0.0, min(x2, truth[2]) - max(x1, truth[0]))
    iy = max(0.0, min(y2, truth[3]) - max(y1, truth[1]))
    inter = ix * iy
    return inter / ((x2 - x1) * (y2 - y1) + (truth[2] - truth[0]) * (truth[3] - truth[1]) - inter)


@pytest.fixture(scope="module")
def loaded() -> OnnxDetectBackend:
    backend = OnnxDetectBackend()
    backend.load(pb.ModelOptions(), CallContext("LoadModel"))
    backend._mark_loaded("nudenet")
    yield backend
    backend._free()


def _client(server):
    return new_client(f"127.0.0.1:{server.port}", parallel=True)


def _b64(name: str) -> str:
    assert PHOTOS is not None
    return base64.b64encode((PHOTOS / name).read_bytes()).decode()


def _small_jpeg_b64() -> str:
    import io

    from PIL import Image

    assert PHOTOS is not None
    buffer = io.BytesIO()
    with Image.open(PHOTOS / "chelsea.png") as img:
        img.convert("RGB").resize((48, 32)).save(buffer, format="JPEG", quality=60)
    return base64.b64encode(buffer.getvalue()).decode()


# ---- real photos ----------------------------------------------------------------------------
async def test_face_box_where_the_face_is_and_none_without_a_person(loaded):
    assert PHOTOS is not None
    async with running_server(loaded) as server:
        client = _client(server)
        try:
            person = await client.detect(src=str(PHOTOS / "astronaut.png"))
            as_base64 = await client.detect(src=_b64("astronaut.png"))  # what LocalAI sends
            as_data_uri = await client.detect(src="data:image/png;base64," + _b64("astronaut.png"))
            coffee = await client.detect(src=str(PHOTOS / "coffee.png"))
            cat = await client.detect(src=_b64("chelsea.png"))
        finally:
            await client.close()
    faces = [d for d in person.Detections if d.class_name in FACES]
    assert len(faces) == 1, person
    face = faces[0]
    assert face.class_name == "FACE_FEMALE" and face.confidence > 0.6
    assert iou(face, FACE_TRUTH) > 0.6, face
    centre = (face.x + face.width / 2, face.y + face.height / 2)
    assert FACE_TRUTH[0] < centre[0] < FACE_TRUTH[2] and FACE_TRUTH[1] < centre[1] < FACE_TRUTH[3]
    for other in (as_base64, as_data_uri):
        assert [(d.class_name, round(d.x, 3), round(d.y, 3)) for d in other.Detections] == \
               [(d.class_name, round(d.x, 3), round(d.y, 3)) for d in person.Detections]
    assert not [d for d in coffee.Detections if d.class_name in FACES], coffee
    assert not [d for d in cat.Detections if d.class_name in FACES], cat


async def test_threshold_per_call(loaded):
    src = _b64("astronaut.png")
    strict = await asyncio.to_thread(loaded.detect, pb.DetectOptions(src=src, threshold=0.95), CallContext("Detect"))
    assert list(strict.Detections) == []  # the face scores ~0.83
    loose = await asyncio.to_thread(loaded.detect, pb.DetectOptions(src=src, threshold=0.02), CallContext("Detect"))
    default = await asyncio.to_thread(loaded.detect, pb.DetectOptions(src=src), CallContext("Detect"))
    assert len(loose.Detections) > len(default.Detections) >= 1
    assert all(d.confidence >= 0.02 for d in loose.Detections)
    scores = [d.confidence for d in loose.Detections]
    assert scores == sorted(scores, reverse=True)


async def test_every_load_option(tmp_path):
    assert PHOTOS is not None
    names = [f"thing_{i}" for i in range(18)]
    names[1] = "woman_face"
    names_file = tmp_path / "body.names"
    names_file.write_text("\n".join(names) + "\n")
    backend = OnnxDetectBackend()
    async with running_server(backend) as server:
        client = _client(server)
        try:
            ok = await client.load_model(Threads=1, Options=[
                f"names_file:{names_file}", "confidence:0.03", "iou:0.3", "max_detections:2", "image_size:640"])
            assert ok.success, ok.message
            assert "input 640x640" in ok.message and "confidence 0.03" in ok.message
            out = await client.detect(src=str(PHOTOS / "astronaut.png"))
            assert 1 <= len(out.Detections) <= 2  # max_detections
            assert out.Detections[0].class_name == "woman_face"  # names from the file
            assert iou(out.Detections[0], FACE_TRUTH) > 0.6  # 640 input: same face, mapped back
            ok = await client.load_model(Options=["classes:FACE_MALE,FEET_COVERED", "confidence:0.01"])
            assert ok.success, ok.message
            out = await client.detect(src=str(PHOTOS / "astronaut.png"))
            assert {d.class_name for d in out.Detections} <= {"FACE_MALE", "FEET_COVERED"}
            json_names = tmp_path / "names.json"
            json_names.write_text(json.dumps({str(i): n.upper() for i, n in enumerate(names)}))
            ok = await client.load_model(Model="nudenet", Options=[f"names_file:{json_names}"])
            assert ok.success, ok.message
            out = await client.detect(src=str(PHOTOS / "astronaut.png"))
            assert out.Detections[0].class_name == "WOMAN_FACE"
        finally:
            await client.close()
            backend._free()


@pytest.mark.parametrize(("options", "needle"), [
    (["confidence:1.5"], "confidence must be within 0..1"),
    (["iou:nan"], "iou must be within 0..1"),
    (["image_size:100"], "multiple of 32"),
    (["max_detections:0"], "max_detections must be >= 1"),
    (["classes:UNICORN"], "not classes of this model"),
    (["names_file:/nonexistent/names.txt"], "does not exist"),
])
def test_bad_options_fail_the_load(options, needle):
    backend = OnnxDetectBackend()
    with pytest.raises(Exception, match=needle):
        backend.load(pb.ModelOptions(Options=options), CallContext("LoadModel"))


async def test_models_that_are_not_yolo_detectors_are_refused_at_load(tmp_path):
    from inferd.engines.rerank import packaged_model_dir

    wrong_names = tmp_path / "three.names"
    wrong_names.write_text("a\nb\nc\n")
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("not a graph")
    backend = OnnxDetectBackend()
    async with running_server(backend) as server:
        client = _client(server)
        try:
            r = await client.load_model(Options=[f"names_file:{wrong_names}"])
            assert not r.success and "does not fit 3 class names" in r.message
            r = await client.load_model(ModelFile=str(not_onnx))
            assert not r.success and "cannot load" in r.message
            r = await client.load_model(ModelFile=str(tmp_path))  # a directory: its model.onnx
            assert not r.success and "cannot load" in r.message
            r = await client.load_model(Model="yolov8n")
            assert not r.success and "no model hub" in r.message
            reranker = packaged_model_dir()
            if reranker is not None:  # an ONNX graph that is not a detector
                r = await client.load_model(ModelFile=str(reranker / "model.onnx"))
                assert not r.success and "not a YOLOv8/YOLO11 detector" in r.message
        finally:
            await client.close()


@pytest.mark.parametrize(("request_fields", "code", "needle"), [
    ({"src": ""}, grpc.StatusCode.INVALID_ARGUMENT, "src"),
    ({"src": "/nonexistent/photo.jpg"}, grpc.StatusCode.NOT_FOUND, "no such file"),
    ({"src": "not base64 at all!"}, grpc.StatusCode.INVALID_ARGUMENT, "src"),
    ({"src": base64.b64encode(b"plain text, not an image").decode()}, grpc.StatusCode.INVALID_ARGUMENT,
     "not a readable image"),
    ({"src": "data:image/png,raw"}, grpc.StatusCode.INVALID_ARGUMENT, "data: URI"),
    ({"src": "x", "threshold": math.nan}, grpc.StatusCode.INVALID_ARGUMENT, "threshold"),
    ({"src": "x", "threshold": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "threshold"),
    ({"src": "x", "prompt": "a face"}, grpc.StatusCode.UNIMPLEMENTED, "SAM"),
    ({"src": "x", "points": [1.0, 2.0, 1.0]}, grpc.StatusCode.UNIMPLEMENTED, "SAM"),
])
async def test_bad_requests_get_precise_codes(loaded, request_fields, code, needle):
    async with running_server(loaded) as server:
        client = _client(server)
        try:
            with pytest.raises(RpcError) as info:
                await client.detect(**request_fields)
        finally:
            await client.close()
    assert info.value.code == code, info.value.details
    assert needle in info.value.details


async def test_images_dir_confines_paths_and_a_text_file_is_not_an_image(tmp_path):
    assert PHOTOS is not None
    (tmp_path / "notes.png").write_text("hello")
    backend = OnnxDetectBackend(settings=settings_for_test(images_dir=str(tmp_path)))
    backend.load(pb.ModelOptions(), CallContext("LoadModel"))
    backend._mark_loaded("nudenet")
    (tmp_path / "me.png").symlink_to(PHOTOS / "astronaut.png")  # a symlink out of the root is refused too
    try:
        async with running_server(backend) as server:
            client = _client(server)
            try:
                for src, code in ((str(PHOTOS / "astronaut.png"), grpc.StatusCode.INVALID_ARGUMENT),
                                  ("me.png", grpc.StatusCode.INVALID_ARGUMENT),
                                  ("notes.png", grpc.StatusCode.INVALID_ARGUMENT)):
                    with pytest.raises(RpcError) as info:
                        await client.detect(src=src)
                    assert info.value.code == code and info.value.details.startswith("src"), info.value.details
                ok = await client.detect(src=_b64("astronaut.png"))  # bytes are not paths
                assert any(d.class_name == "FACE_FEMALE" for d in ok.Detections)
                # every JPEG's base64 starts with "/9j/": image bytes, not an absolute path
                jpeg = _small_jpeg_b64()
                assert jpeg.startswith("/9j/") and len(jpeg) < 4096
                assert isinstance(await client.detect(src=jpeg), pb.DetectResponse)
            finally:
                await client.close()
    finally:
        backend._free()


async def test_free_and_load_while_detections_are_in_flight():
    src = _b64("astronaut.png")
    allowed = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE}
    backend = OnnxDetectBackend()
    async with running_server(backend) as server:
        client = _client(server)
        try:
            with pytest.raises(RpcError) as info:
                await client.detect(src=src)
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert (await client.load_model()).success
            calls = [asyncio.create_task(client.detect(src=src)) for _ in range(6)]
            await asyncio.sleep(0.05)
            assert (await client.free()).success
            for r in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(r, RpcError):
                    assert r.code in allowed, (r.code, r.details)
                else:
                    assert any(d.class_name == "FACE_FEMALE" for d in r.Detections)
            calls = [asyncio.create_task(client.detect(src=src)) for _ in range(4)]
            assert (await client.load_model(Options=["confidence:0.5"])).success
            for r in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(r, RpcError):
                    assert r.code in allowed, (r.code, r.details)
            after = await client.detect(src=src)
            assert [d.class_name for d in after.Detections] == ["FACE_FEMALE"]
        finally:
            await client.close()
            backend._free()


def test_localai_starts_it_as_an_external_backend(tmp_path):
    from tests.test_localai_compat import localai_backend

    with localai_backend("onnx-detect", tmp_path) as (stub, _, _):
        result = stub.LoadModel(pb.ModelOptions(Model="nudenet", ModelPath=str(tmp_path)), timeout=120)
        assert result.success, result.message
        reply = stub.Detect(pb.DetectOptions(src=_b64("astronaut.png")), timeout=60)
        assert [d.class_name for d in reply.Detections] == ["FACE_FEMALE"]


# ---- the geometry on synthetic outputs -------------------------------------------------------
def test_letterbox_pads_centred_and_decode_maps_boxes_back_to_image_pixels():
    from PIL import Image

    image = Image.new("RGB", (200, 100), (255, 0, 0))
    tensor, fit = letterbox(image, 320, 320)
    assert tensor.shape == (1, 3, 320, 320) and tensor.dtype == np.float32
    assert fit == Letterbox(scale=1.6, pad_x=0.0, pad_y=80.0, width=200, height=100)
    assert math.isclose(float(tensor[0, 0, 0, 0]), 114 / 255, rel_tol=1e-6)  # grey padding above
    assert float(tensor[0, 0, 160, 160]) == 1.0 and float(tensor[0, 1, 160, 160]) == 0.0  # the red image
    # a box at x 50..150, y 20..60 in the image is at x 80..240, y 112..176 in the letterbox
    out = np.zeros((4 + 3, 5), dtype=np.float32)
    out[:4, 0] = [160, 144, 160, 64]
    out[4 + 2, 0] = 0.9
    boxes = decode(out, fit, confidence=0.25, iou=0.45, max_detections=10)
    assert len(boxes) == 1
    b = boxes[0]
    assert (b.class_id, round(b.x, 3), round(b.y, 3), round(b.width, 3), round(b.height, 3)) == (2, 50, 20, 100, 40)
    assert math.isclose(b.confidence, 0.9, rel_tol=1e-6)


def test_nms_is_per_class_and_keeps_the_best():
    fit = Letterbox(1.0, 0.0, 0.0, 100, 100)
    out = np.zeros((4 + 2, 4), dtype=np.float32)
    out[:4, 0], out[4, 0] = [50, 50, 20, 20], 0.9   # class 0
    out[:4, 1], out[4, 1] = [51, 50, 20, 20], 0.8   # class 0, overlaps the first: suppressed
    out[:4, 2], out[5, 2] = [51, 50, 20, 20], 0.7   # class 1, same place: kept (other class)
    out[:4, 3], out[4, 3] = [10, 10, 8, 8], 0.1     # below the confidence threshold
    boxes = decode(out, fit, confidence=0.25, iou=0.45, max_detections=10)
    assert [(b.class_id, round(b.confidence, 2)) for b in boxes] == [(0, 0.9), (1, 0.7)]
    only_1 = decode(out, fit, confidence=0.25, iou=0.45, max_detections=10, classes=frozenset({1}))
    assert [b.class_id for b in only_1] == [1]
    kept = nms(np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=np.float32),
               np.array([0.5, 0.9, 0.3], dtype=np.float32), 0.5)
    assert kept.tolist() == [1, 2]
    # boxes are clipped to the image
    edge = np.zeros((5, 1), dtype=np.float32)
    edge[:4, 0], edge[4, 0] = [95, 50, 20, 20], 0.9
    (clipped,) = decode(edge, fit, confidence=0.25, iou=0.45, max_detections=10)
    assert (clipped.x, clipped.x + clipped.width) == (85.0, 100.0)
