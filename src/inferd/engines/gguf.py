"""The GGUF file signature, shared by the llama.cpp engine's loader and the quantization job.

Both check it before handing a path to llama.cpp, whose own error for a wrong file is a
cryptic log line; each caller words the failure for its own context.
"""

from __future__ import annotations

import os

GGUF_MAGIC = b"GGUF"


def file_magic(path: str | os.PathLike[str]) -> bytes:
    """The first four bytes of ``path`` (``OSError`` when it cannot be read)."""
    with open(path, "rb") as f:
        return f.read(4)
