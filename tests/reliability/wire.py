"""Protobuf wire encoding by hand, so the fuzzer can send what the protobuf API refuses to build.

Invalid UTF-8 in string fields, enums outside their range, packed and unpacked repeated
scalars, unknown and mistyped fields: ``tests.reliability.fuzzing`` composes cases from these
few primitives and the message descriptors.
"""

from __future__ import annotations

import struct
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

WT_VARINT, WT_I64, WT_LEN, WT_SGROUP, WT_EGROUP, WT_I32 = 0, 1, 2, 3, 4, 5


def varint(n: int) -> bytes:
    """Base-128 varint; negative numbers as their 64-bit two's complement (10 bytes), as protobuf does."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, WT_LEN) + varint(len(payload)) + payload


def zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


T = FieldDescriptor
_INT_RANGES = {
    T.TYPE_INT32: (-(2**31), 2**31 - 1), T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    T.TYPE_SFIXED32: (-(2**31), 2**31 - 1), T.TYPE_UINT32: (0, 2**32 - 1), T.TYPE_FIXED32: (0, 2**32 - 1),
    T.TYPE_INT64: (-(2**63), 2**63 - 1), T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    T.TYPE_SFIXED64: (-(2**63), 2**63 - 1), T.TYPE_UINT64: (0, 2**64 - 1), T.TYPE_FIXED64: (0, 2**64 - 1),
}


def encode_scalar(ftype: int, value: Any) -> tuple[int, bytes]:
    """(wire type, encoded value) of one scalar of protobuf type ``ftype``."""
    if ftype in (T.TYPE_INT32, T.TYPE_INT64, T.TYPE_UINT32, T.TYPE_UINT64, T.TYPE_ENUM):
        return WT_VARINT, varint(int(value))
    if ftype == T.TYPE_BOOL:
        return WT_VARINT, varint(int(value))
    if ftype in (T.TYPE_SINT32, T.TYPE_SINT64):
        return WT_VARINT, varint(zigzag(int(value)))
    if ftype == T.TYPE_FLOAT:
        return WT_I32, struct.pack("<f", value)
    if ftype == T.TYPE_DOUBLE:
        return WT_I64, struct.pack("<d", value)
    if ftype in (T.TYPE_FIXED32, T.TYPE_SFIXED32):
        return WT_I32, struct.pack("<I", int(value) & 0xFFFFFFFF)
    if ftype in (T.TYPE_FIXED64, T.TYPE_SFIXED64):
        return WT_I64, struct.pack("<Q", int(value) & (2**64 - 1))
    if ftype in (T.TYPE_STRING, T.TYPE_BYTES):
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return WT_LEN, varint(len(data)) + data
    raise ValueError(f"not a scalar type: {ftype}")


def is_repeated(fd: FieldDescriptor) -> bool:
    return bool(getattr(fd, "is_repeated", None) if hasattr(fd, "is_repeated")
                else fd.label == FieldDescriptor.LABEL_REPEATED)  # protobuf < 5
