"""The numeric half of YOLO detection: letterbox, decode the raw output, NMS, map back.

Ultralytics' YOLOv8/YOLO11 detection exports (``model.export(format="onnx")``) take one
RGB image scaled to [0, 1], NCHW, letterboxed to the training size (aspect ratio kept,
the rest padded with grey 114), and return ``[batch, 4 + classes, anchors]``: per anchor
a box as centre x, centre y, width, height in letterboxed pixels, then one sigmoid score
per class (no objectness column, unlike YOLOv5). NMS is not in the graph: it is done
here, per class, in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

PAD_VALUE = 114
#: Candidates kept for NMS after the confidence filter (Ultralytics' max_nms).
MAX_NMS_CANDIDATES = 30000


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the model's input, to map boxes back."""

    scale: float
    pad_x: float
    pad_y: float
    width: int  # original image size
    height: int


@dataclass(frozen=True)
class Box:
    """One detection in the ORIGINAL image's pixels: top-left corner, size, score, class."""

    x: float
    y: float
    width: float
    height: float
    confidence: float
    class_id: int


def letterbox(image: Image.Image, target_w: int, target_h: int) -> tuple[np.ndarray, Letterbox]:
    """``image`` resized into target_w x target_h keeping its aspect ratio, padded centred.

    Returns the float32 NCHW tensor in [0, 1] and the transform to undo.
    """
    from PIL import Image

    w, h = image.size
    scale = min(target_w / w, target_h / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    left, top = (target_w - new_w) // 2, (target_h - new_h) // 2
    canvas = Image.new("RGB", (target_w, target_h), (PAD_VALUE,) * 3)
    resized = image if (new_w, new_h) == (w, h) else image.resize((new_w, new_h), Image.BILINEAR)
    canvas.paste(resized, (left, top))
    tensor = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1)[None] / np.float32(255.0)
    return np.ascontiguousarray(tensor), Letterbox(scale, float(left), float(top), w, h)


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns the kept indices, best score first."""
    x1, y1, x2, y2 = boxes_xyxy.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(x1[i], x1[rest])
        yy1 = np.maximum(y1[i], y1[rest])
        xx2 = np.minimum(x2[i], x2[rest])
        yy2 = np.minimum(y2[i], y2[rest])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def decode(output: np.ndarray, fit: Letterbox, *, confidence: float, iou: float, max_detections: int,
           classes: frozenset[int] | None = None) -> list[Box]:
    """Boxes from one image's raw output ``[4 + classes, anchors]``, in original-image pixels."""
    preds = output.T  # [anchors, 4 + classes]
    scores_all = preds[:, 4:]
    class_ids = scores_all.argmax(axis=1)
    scores = scores_all[np.arange(len(preds)), class_ids]
    mask = scores >= confidence
    if classes is not None:
        mask &= np.isin(class_ids, np.fromiter(classes, dtype=np.int64))
    preds, scores, class_ids = preds[mask], scores[mask], class_ids[mask]
    if len(scores) > MAX_NMS_CANDIDATES:
        top = np.argsort(-scores)[:MAX_NMS_CANDIDATES]
        preds, scores, class_ids = preds[top], scores[top], class_ids[top]
    if not len(scores):
        return []
    cx, cy, bw, bh = preds[:, 0], preds[:, 1], preds[:, 2], preds[:, 3]
    xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    # per-class NMS in one pass: shift each class's boxes to its own region of the plane
    offset = class_ids[:, None].astype(np.float32) * (float(xyxy.max()) + 1.0)
    keep = nms(xyxy + offset, scores, iou)[:max_detections]
    out: list[Box] = []
    for i in keep:
        x1 = (xyxy[i, 0] - fit.pad_x) / fit.scale
        y1 = (xyxy[i, 1] - fit.pad_y) / fit.scale
        x2 = (xyxy[i, 2] - fit.pad_x) / fit.scale
        y2 = (xyxy[i, 3] - fit.pad_y) / fit.scale
        x1, x2 = float(np.clip(x1, 0, fit.width)), float(np.clip(x2, 0, fit.width))
        y1, y2 = float(np.clip(y1, 0, fit.height)), float(np.clip(y2, 0, fit.height))
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            continue
        out.append(Box(x1, y1, x2 - x1, y2 - y1, float(scores[i]), int(class_ids[i])))
    return out
