"""Regenerate the Python stubs in ``src/inferd/proto`` from ``proto/*.proto``.

Why a script: grpcio-tools writes absolute imports (``import backend_pb2``) that only
work when the output folder is on ``sys.path``; we rewrite them to package-relative
imports so the stubs live inside ``inferd.proto`` (and name the messages' module
``inferd.proto.X_pb2`` so they pickle). The output is deterministic for a
given grpcio-tools version (pinned in pyproject), and ``tests/test_proto_stubs.py``
fails when the committed stubs drift from the .proto files.

Usage: python scripts/gen_proto.py [OUTPUT_DIR]
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "src" / "inferd" / "proto"
PROTOS = ("backend.proto", "llm.proto", "inference.proto")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every .proto and return the files written."""
    from grpc_tools import protoc  # imported late: only a dev/build dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(PROTO_DIR / p) for p in PROTOS],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for path in sorted(Path(tmp).iterdir()):
            text = path.read_text()
            text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
            # Messages take their __module__ from this name: the import path makes them
            # picklable (Ray Serve pickles requests from its gRPC proxy to the replicas).
            text = re.sub(r"BuildTopDescriptorsAndMessages\(DESCRIPTOR, '(\w+_pb2)'",
                          r"BuildTopDescriptorsAndMessages(DESCRIPTOR, 'inferd.proto.\1'", text)
            target = out_dir / path.name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for f in generate(out):
        print(f.relative_to(out.parent) if out == DEFAULT_OUT else f)
