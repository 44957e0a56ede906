"""``onnx-detect``: object detection with YOLOv8/YOLO11-layout ONNX models (Detect rpc).

Translation only; the engine is ``inferd.engines.detect`` (user view: docs/detect.md).

LoadModel
    ``ModelFile`` / ``ModelPath``+``Model`` / ``Model``: an ``.onnx`` file (a directory
    means its ``model.onnx``). Empty, or ``nudenet``: the one YOLO-layout model that ships
    in a package we can install, nudenet 3.4.2's ``320n.onnx`` (18 body-part classes
    including FACE_FEMALE / FACE_MALE). ``Threads``: onnxruntime threads. ``Options``
    (``key:value``): ``confidence`` (default 0.25), ``iou`` (NMS overlap, 0.45),
    ``max_detections`` (300), ``image_size`` (model input side, a multiple of 32; default
    the graph's, its metadata's, or 640), ``names_file`` (class names: one per line, a
    JSON list or {id: name}; default the model's metadata), ``classes`` (comma-separated
    class names to report; default all).

Detect
    ``src``: the image as a file path, base64 bytes (what LocalAI sends) or a data: URI.
    ``threshold`` > 0 overrides the confidence threshold for this call. Replies one
    ``Detection`` per object: ``x``, ``y`` (top-left corner), ``width``, ``height`` in
    pixels of the input image, ``confidence`` and ``class_name``, best first.
    ``prompt``/``points``/``boxes`` (SAM-style prompts) need a segmentation model this
    backend does not run: UNIMPLEMENTED.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.backends.options import option_float, option_int, split_options
from inferd.errors import InvalidArgument, LoadError, NoModelLoaded, Unsupported
from inferd.limits import finite_float, thread_count
from inferd.paths import confine, resolve_model_location
from inferd.proto import backend_pb2 as pb

PACKAGED_ALIASES = frozenset({"nudenet", "320n", "320n.onnx", "nudenet/320n.onnx"})


def packaged_model() -> Path | None:
    """``nudenet/320n.onnx`` of the installed nudenet package, without importing it (it needs cv2)."""
    try:
        spec = importlib.util.find_spec("nudenet")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "320n.onnx"
        if candidate.is_file():
            return candidate
    return None


def parse_options(items: Any, models_dir: str | None) -> dict[str, Any]:
    raw = {"confidence": "0.25", "iou": "0.45", "max_detections": "300", "image_size": "0",
           "names_file": "", "classes": ""}
    for key, value, _ in split_options(items):
        if key in raw:
            raw[key] = value
    confidence = option_float("confidence", raw["confidence"])
    iou = option_float("iou", raw["iou"])
    for key, value in (("confidence", confidence), ("iou", iou)):
        if not 0.0 <= value <= 1.0:  # NaN fails this too
            raise LoadError(f"Options: {key} must be within 0..1, got {value}")
    max_det = option_int("max_detections", raw["max_detections"], minimum=1)
    if max_det > 10000:
        raise LoadError(f"Options: max_detections must be <= 10000, got {max_det}")
    size = option_int("image_size", raw["image_size"], minimum=0)
    if size and (size % 32 or not 32 <= size <= 4096):
        raise LoadError(f"Options: image_size must be a multiple of 32 within 32..4096, got {size}")
    names_file = None
    if raw["names_file"].strip():
        names_file = confine(raw["names_file"].strip(), models_dir, "Options.names_file")
        if not names_file.is_file():
            raise LoadError(f"Options: names_file {str(names_file)!r} does not exist")
    classes = [c.strip() for c in raw["classes"].split(",") if c.strip()]
    return {"confidence": confidence, "iou": iou, "max_detections": max_det, "image_size": size,
            "names_file": names_file, "classes": classes}


class OnnxDetectBackend(Backend):
    """YOLO-layout ONNX detector; Detect runs on a worker thread, calls in parallel."""

    name = "onnx-detect"
    parallel = True  # onnxruntime sessions are thread-safe; nothing else is shared

    def __init__(self, settings: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self.detector: Any = None
        self.opts: dict[str, Any] = {}
        self.class_filter: frozenset[int] | None = None

    def _model_path(self, options: pb.ModelOptions, models_dir: str | None) -> Path:
        location = resolve_model_location(options.Model, options.ModelFile, options.ModelPath, models_dir)
        if location.path is not None:
            path = location.path
            if path.is_dir():
                path = path / "model.onnx"
                if not path.is_file():
                    raise LoadError(f"onnx-detect: {str(location.path)!r} is a directory without model.onnx")
            return path
        if not location.requested or (options.Model.lower() in PACKAGED_ALIASES and not options.ModelFile):
            found = packaged_model()
            if found is None:
                raise LoadError("onnx-detect: no model given and the packaged detector is not installed "
                                "(pip install --no-deps nudenet==3.4.2)")
            return found
        raise LoadError(f"onnx-detect: model not found: {location.reason()}; a name that is not a path cannot "
                        "be fetched (no model hub access): give the path of a YOLOv8/YOLO11 .onnx export")

    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        from inferd.engines.detect import ModelFormatError, YoloDetector

        models_dir = getattr(self.settings, "models_dir", None) or None
        opts = parse_options(options.Options, models_dir)
        path = self._model_path(options, models_dir)
        try:
            detector = YoloDetector(path, names_file=opts["names_file"], image_size=opts["image_size"],
                                    threads=thread_count(options.Threads, default=None))
        except ImportError as exc:
            raise LoadError(f"onnx-detect: needs onnxruntime, numpy and pillow (pip install 'inferd[detect]'): "
                            f"{exc}") from None
        except ModelFormatError as exc:
            raise LoadError(f"onnx-detect: {path} is not a YOLOv8/YOLO11 detector: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any engine failure is a load failure with its reason
            raise LoadError(f"onnx-detect: cannot load {path}: {type(exc).__name__}: {exc}") from None
        class_filter = None
        if opts["classes"]:
            unknown = [c for c in opts["classes"] if c not in detector.names]
            if unknown:
                raise LoadError(f"Options: classes {unknown} are not classes of this model "
                                f"({', '.join(detector.names)})")
            class_filter = frozenset(detector.names.index(c) for c in opts["classes"])
        self.detector, self.opts, self.class_filter = detector, opts, class_filter
        return (f"loaded {path} ({len(detector.names)} classes, input {detector.width}x{detector.height}, "
                f"confidence {opts['confidence']}, iou {opts['iou']})")

    def unload(self) -> None:
        detector, self.detector = self.detector, None
        if detector is not None:
            detector.close()

    def detect(self, request: pb.DetectOptions, ctx: CallContext) -> pb.DetectResponse:
        from inferd.engines.images import read_image

        detector = self.detector
        if detector is None:
            raise NoModelLoaded(self.name, "Detect")
        if request.prompt or len(request.points) or len(request.boxes):
            raise Unsupported(self.name, "Detect", "text/point/box prompts need a promptable segmentation "
                              "model (SAM); this backend runs YOLO-layout detectors, send only src and threshold")
        confidence = self.opts["confidence"]
        if request.threshold != 0:
            confidence = finite_float(request.threshold, "threshold", 0.0, 1.0)
        if not request.src:
            raise InvalidArgument("no image given (a file path, base64 image bytes or a data: URI)", "src")
        image = read_image(request.src, "src", getattr(self.settings, "images_dir", None) or None)
        ctx.check()  # decoding a large image takes a while: do not run the model for a caller gone
        found = detector.detect(image, confidence=confidence, iou=self.opts["iou"],
                                max_detections=self.opts["max_detections"], classes=self.class_filter)
        return pb.DetectResponse(Detections=[
            pb.Detection(x=d.x, y=d.y, width=d.width, height=d.height, confidence=d.confidence,
                         class_name=d.class_name) for d in found])
