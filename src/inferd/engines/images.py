"""Reading an image a request names: a file path, raw base64, or a ``data:`` URI.

LocalAI's HTTP front resolves whatever the user gave (URL, data URI, base64) and sends
backends the image as plain base64 text (``DetectOptions.src``, via its
``GetContentURIAsBase64``); direct gRPC callers and LocalAI's image-to-image path send a
file path. Detection and image-to-image generation accept all three, decided in this
order: ``data:`` prefix -> base64 whose bytes start like an image file -> an existing file
-> "looks like a path" (NOT_FOUND) -> other base64 (INVALID_ARGUMENT: not an image) or
neither (INVALID_ARGUMENT).

Hostile input gets a precise error, never a hang or an INTERNAL: the decoded size and the
pixel count are bounded (Pillow's decompression-bomb guard raised to an error), and a
file that is not an image is INVALID_ARGUMENT naming the field. Paths go through
``inferd.paths.confine`` when the operator set a root.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from inferd.errors import InvalidArgument, NotFound
from inferd.paths import confine

if TYPE_CHECKING:
    from PIL import Image

#: Largest encoded image accepted (the gRPC message limit is 100 MiB by default).
MAX_IMAGE_BYTES = 64 << 20
#: Largest decoded image: 8192 x 8192 (an RGB copy is 200 MB).
MAX_PIXELS = 8192 * 8192
#: How image files start (PNG, JPEG, GIF, BMP, WebP/RIFF, TIFF both byte orders).
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
_PATH_LIKE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.lower().endswith(_PATH_LIKE_SUFFIXES)


def _decode(data: bytes, field: str, what: str) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidArgument(f"{what} is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}", field)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise InvalidArgument(f"{what} is {width}x{height}; at most {MAX_PIXELS} pixels", field)
            img.load()
            return img.convert("RGB")
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidArgument(f"{what} is not a readable image ({type(exc).__name__}: {exc})", field) from None


def read_image(src: str, field: str = "src", root: str | os.PathLike[str] | None = None,
               root_name: str = "INFERD_IMAGES_DIR") -> Image.Image:
    """The image ``src`` names, as RGB; see the module docstring for the accepted forms.

    Base64 whose bytes start like an image is taken as image bytes BEFORE any path check:
    every JPEG's base64 starts with ``/9j/``, which would otherwise read as an absolute path
    (and be refused as outside ``INFERD_IMAGES_DIR``).
    """
    text = src.strip()
    if not text:
        raise InvalidArgument("no image given (a file path, base64 image bytes or a data: URI)", field)
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidArgument("a data: URI must be data:<mime>;base64,<payload>", field)
        return _decode(_b64(payload, field), field, "the data: URI's image")
    data = _b64_or_none(text, field)
    if data is not None and data.startswith(_IMAGE_MAGIC):
        return _decode(data, field, "the base64 image")
    if len(text) < 4096 and "\n" not in text:
        path = confine(text, root, field, root_name)
        if path.is_file():
            return read_image_file(path, field)
        if path.exists():
            raise InvalidArgument(f"{text!r} is not a file", field)
    if _looks_like_path(text):
        raise NotFound(f"{field}: no such file: {text!r}")
    if data is None:
        raise InvalidArgument("neither an existing file nor base64 image bytes", field)
    return _decode(data, field, "the base64 image")


def read_image_file(path: Path, field: str) -> Image.Image:
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise InvalidArgument(f"{str(path)!r} is {size} bytes; the limit is {MAX_IMAGE_BYTES}", field)
    return _decode(path.read_bytes(), field, repr(str(path)))


def _b64(text: str, field: str) -> bytes:
    data = _b64_or_none(text, field)
    if data is None:
        raise InvalidArgument("not valid base64", field)
    return data


def _b64_or_none(text: str, field: str) -> bytes | None:
    """The bytes ``text`` encodes, None when it is not base64; too long -> InvalidArgument."""
    compact = "".join(text.split())
    if len(compact) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InvalidArgument(f"base64 payload is {len(compact)} characters; the limit is {MAX_IMAGE_BYTES} bytes",
                              field)
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
