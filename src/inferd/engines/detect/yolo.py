"""``YoloDetector``: an Ultralytics YOLOv8/YOLO11 detection export on onnxruntime.

Class names come from, in order: a names file the user gives (one name per line, as
darknet's ``coco.names``; or a JSON list, or a JSON object ``{"0": "person", ...}``), the
``names`` entry Ultralytics writes into the ONNX metadata (a Python dict literal, read
with ``ast.literal_eval``, never ``eval``), else ``class_0``, ``class_1``, ... The input
size is the graph's fixed input size, else the ``imgsz`` metadata, else 640, unless the
user sets one (a multiple of 32, the YOLO stride).

At load a blank image is run once: a graph whose output is not ``[1, 4 + classes,
anchors]`` (or that transposed) is refused at LoadModel, not at the first Detect.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inferd.engines.detect.geometry import Box, decode, letterbox

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_IMAGE_SIZE = 640
STRIDE = 32


class ModelFormatError(ValueError):
    """The ONNX graph is not a YOLOv8/YOLO11-layout detector (or its names do not fit it)."""


@dataclass(frozen=True)
class Detection:
    """One detected object in the input image's pixels (top-left corner and size)."""

    x: float
    y: float
    width: float
    height: float
    confidence: float
    class_name: str


def read_names_file(path: Path) -> list[str]:
    """Class names from a darknet-style list (one per line), a JSON list or a JSON {id: name} map."""
    text = path.read_text(encoding="utf-8")
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except ValueError as exc:
            raise ModelFormatError(f"names file {str(path)!r} is not valid JSON: {exc}") from None
        return _names_from(data, f"names file {str(path)!r}")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _names_from(data: object, where: str) -> list[str]:
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        return list(data)
    if isinstance(data, dict):
        try:
            by_id = {int(k): str(v) for k, v in data.items()}
        except (TypeError, ValueError):
            raise ModelFormatError(f"{where}: class ids must be integers") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise ModelFormatError(f"{where}: class ids must be 0..{len(by_id) - 1}")
        return [by_id[i] for i in range(len(by_id))]
    raise ModelFormatError(f"{where}: expected a list of names or an {{id: name}} map")


def metadata_names(meta: dict[str, str]) -> list[str] | None:
    raw = meta.get("names")
    if not raw:
        return None
    try:
        data = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        try:
            data = json.loads(raw)
        except ValueError:
            raise ModelFormatError("the model's 'names' metadata is neither a dict literal nor JSON") from None
    return _names_from(data, "the model's 'names' metadata")


def metadata_image_size(meta: dict[str, str]) -> tuple[int, int] | None:
    raw = meta.get("imgsz")
    if not raw:
        return None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])  # Ultralytics writes [height, width]
    return None


class YoloDetector:
    """One detection model; ``detect`` is thread-safe (one onnxruntime session, no shared state)."""

    def __init__(self, onnx_path: Path, *, names_file: Path | None = None, image_size: int = 0,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        opts.inter_op_num_threads = 1
        self.threads = opts.intra_op_num_threads
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ModelFormatError(f"expected one NCHW image input, the graph has {[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.height, self.width = self._input_size(inputs[0].shape, meta, image_size)
        names = read_names_file(names_file) if names_file is not None else metadata_names(meta)
        self.names = self._check_layout(names)

    @staticmethod
    def _input_size(shape: list, meta: dict[str, str], requested: int) -> tuple[int, int]:
        fixed_h, fixed_w = shape[2], shape[3]
        if isinstance(fixed_h, int) and isinstance(fixed_w, int) and fixed_h > 0 and fixed_w > 0:
            if requested and (requested, requested) != (fixed_h, fixed_w):
                raise ModelFormatError(f"the graph's input is fixed at {fixed_w}x{fixed_h}; image_size "
                                       f"{requested} cannot be used")
            return fixed_h, fixed_w
        if requested:
            return requested, requested
        return metadata_image_size(meta) or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)

    def _raw(self, tensor: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: tensor})[0], dtype=np.float32)

    def _check_layout(self, names: list[str] | None) -> list[str]:
        out = self._raw(np.zeros((1, 3, self.height, self.width), dtype=np.float32))
        if out.ndim != 3 or out.shape[0] != 1:
            raise ModelFormatError(f"output shape {out.shape}; a YOLOv8/YOLO11 detector gives [1, 4 + classes, anchors]")
        channels, anchors = out.shape[1], out.shape[2]
        if names is not None:
            if channels == 4 + len(names):
                self._transposed = False
            elif anchors == 4 + len(names):
                self._transposed = True
            else:
                raise ModelFormatError(f"output shape {out.shape} does not fit {len(names)} class names "
                                       f"(expected 4 + {len(names)} = {4 + len(names)} channels)")
            return names
        self._transposed = channels > anchors
        classes = (anchors if self._transposed else channels) - 4
        if classes < 1:
            raise ModelFormatError(f"output shape {out.shape} has no class scores")
        return [f"class_{i}" for i in range(classes)]

    def detect(self, image: Image.Image, *, confidence: float = 0.25, iou: float = 0.45,
               max_detections: int = 300, classes: frozenset[int] | None = None) -> list[Detection]:
        tensor, fit = letterbox(image, self.width, self.height)
        out = self._raw(tensor)[0]
        if self._transposed:
            out = out.T
        boxes: list[Box] = decode(out, fit, confidence=confidence, iou=iou, max_detections=max_detections,
                                  classes=classes)
        return [Detection(b.x, b.y, b.width, b.height, b.confidence, self.names[b.class_id]) for b in boxes]

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
