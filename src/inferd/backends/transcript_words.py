"""Word timings on ``TranscriptSegment`` as LocalAI sends them, although our stubs lack the field.

LocalAI's current contract (``backend/backend.proto``) adds ``message TranscriptWord {int64
start = 1; int64 end = 2; string text = 3;}`` and ``repeated TranscriptWord words = 7`` to
``TranscriptSegment``; its Go side reads them in ``core/backend/transcript.go``
(``transcriptResultFromProto``: ``time.Duration(w.Start)``, so nanoseconds). Our proto is
the older revision (seed 004), so the words are written as field 7 on the wire: a LocalAI
built from the newer proto decodes them as words, and older readers skip an unknown field,
exactly as protobuf intends. ``read_words`` reads them back (clients, tests).
"""

from __future__ import annotations

from collections.abc import Iterable

from inferd.proto import backend_pb2 as pb

WORDS_FIELD = 7


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 on the wire: two's complement, 10 bytes when negative
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _word(start_ns: int, end_ns: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"\x08" + _varint(start_ns) + b"\x10" + _varint(end_ns) + b"\x1a" + _varint(len(raw)) + raw


def add_words(segment: pb.TranscriptSegment, words: Iterable[tuple[int, int, str]]) -> None:
    """Append ``(start_ns, end_ns, text)`` words to ``segment`` as field 7 (kept as unknown fields)."""
    tag = _varint((WORDS_FIELD << 3) | 2)
    blob = b"".join(tag + _varint(len(w)) + w for w in (_word(s, e, t) for s, e, t in words))
    if blob:
        segment.MergeFromString(blob)


def read_words(segment: pb.TranscriptSegment) -> list[tuple[int, int, str]]:
    """The ``(start_ns, end_ns, text)`` words carried in field 7 of ``segment``."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    words = []
    for f in UnknownFieldSet(segment):
        if f.field_number != WORDS_FIELD or f.wire_type != 2:
            continue
        inner = pb.HealthMessage()  # a message with no fields: all of the word's are unknown fields
        inner.MergeFromString(bytes(f.data))
        start = end = 0
        text = ""
        for g in UnknownFieldSet(inner):
            if g.field_number == 1:
                start = g.data - (1 << 64) if g.data >= 1 << 63 else g.data
            elif g.field_number == 2:
                end = g.data - (1 << 64) if g.data >= 1 << 63 else g.data
            elif g.field_number == 3:
                text = bytes(g.data).decode("utf-8", "replace")
        words.append((start, end, text))
    return words
