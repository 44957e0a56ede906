"""Object detection on onnxruntime (plain Python; no gRPC here).

* ``geometry``: letterbox, decoding of the YOLOv8/YOLO11 output, per-class NMS in numpy.
* ``yolo``: ``YoloDetector`` (model, class names, input size) -> ``Detection`` boxes.

Images are read by ``inferd.engines.images`` (path, base64 or data: URI).
"""

from inferd.engines.detect.geometry import Box, Letterbox, decode, letterbox, nms
from inferd.engines.detect.yolo import Detection, ModelFormatError, YoloDetector, read_names_file

__all__ = [
    "Box",
    "Detection",
    "Letterbox",
    "ModelFormatError",
    "YoloDetector",
    "decode",
    "letterbox",
    "nms",
    "read_names_file",
]
